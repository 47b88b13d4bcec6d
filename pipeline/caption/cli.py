"""`pipeline caption`: sentences for new image files."""

from __future__ import annotations

import os
import sys

import click

from pipeline.core import paths
from pipeline.core.settings import click_options
from pipeline.decoder.decode import DecodeConfig, EvaluateConfig


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", default=paths.FINAL_CHECKPOINT, show_default=True, type=click.Path())
@click_options(DecodeConfig)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per batch.")
@click.option("--encoder-weights", default=None, type=click.Path(),
              help="The local weights file the encoder was made with, if it has moved since extraction.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the COCO results format here.")
@click.option("--html", "html_out", default=None, type=click.Path(), help="Also write a page of thumbnails and captions.")
@click.option("--attention", is_flag=True, help="With --html and an attention decoder (train.decoder: attend): "
              "show where it looked for each word.")
@click.option("--references", default=None, type=click.Path(dir_okay=False),
              help="A COCO captions file: the page shows its captions of each image (matched by file_name).")
def caption(inputs, checkpoint, batch_size, encoder_weights, json_out, html_out, attention, references, **options):
    """Caption image files: IMAGE, DIR or GLOB... Prints path<TAB>caption.

    Where the images' folder says their attributes (the demo's attributes.json), it also prints how often the
    captions say them rightly, and the page shows it and what each caption gets wrong."""
    from pipeline.caption.caption import (
        attribute_report,
        caption_images,
        read_references,
        write_html,
        write_results_json,
    )
    from pipeline.core.errors import PipelineError
    from pipeline.core.storage import reporting_disk_errors

    cfg, _ = DecodeConfig.pick(options)
    results = caption_images(checkpoint, list(inputs), cfg, batch_size=batch_size, encoder_weights=encoder_weights,
                             attention=attention)
    bad = sum(1 for r in results if r.error)
    if bad == len(results):  # nothing to write: an empty JSON or page would pass for a result
        print_results(results)
        raise PipelineError(f"none of the {len(results)} images could be captioned (each is unreadable, see the "
                            f"`skipped` lines above): nothing written; pass image files PIL can read")
    # The files first: a reader that stops early (`| head`) must not cost the page or the JSON.
    if json_out:
        with reporting_disk_errors(json_out, "free space, or choose another --json"):
            note = write_results_json(results, json_out)
        if note:
            click.echo(f"note: {note}", err=True)
    summary, misses = attribute_report(results)
    if html_out:
        refs = read_references(references, results) if references else {}
        with reporting_disk_errors(html_out, "free space, or choose another --html"):
            write_html(results, html_out, title=f"Captions by {checkpoint}", references=refs, summary=summary,
                       misses=misses)
    print_results(results)
    click.echo(f"captioned {len(results) - bad} images, {bad} unreadable", err=True)
    if summary:
        click.echo(summary, err=True)


def print_results(results) -> None:
    """path<TAB>caption lines on stdout (skipped images on stderr); stops quietly when stdout's reader has
    gone (`| head -n 8`), since the files are written and the reader has what it asked for."""
    reader_gone = False
    for r in results:
        if r.error:
            click.echo(f"skipped {r.path}: {r.error}", err=True)
        elif not reader_gone:
            try:
                click.echo(f"{r.path}\t{r.caption}")
            except BrokenPipeError:
                reader_gone = True
                # Python would hit the broken pipe again when it flushes stdout at exit: point it at devnull.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)


caption.params_sections = {EvaluateConfig: ""}  # its decoding settings; the rest are evaluate's own
