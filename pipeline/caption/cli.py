"""`pipeline caption`: sentences for new image files."""

from __future__ import annotations

import click

from pipeline.core.settings import click_options
from pipeline.decoder.decode import DecodeConfig


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", default="checkpoints/best.pt", show_default=True, type=click.Path())
@click_options(DecodeConfig)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per batch.")
@click.option("--encoder-weights", default=None, type=click.Path(),
              help="The local weights file the encoder was made with, if it has moved since extraction.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the COCO results format here.")
@click.option("--html", "html_out", default=None, type=click.Path(), help="Also write a page of thumbnails and captions.")
def caption(inputs, checkpoint, batch_size, encoder_weights, json_out, html_out, **options):
    """Caption image files: IMAGE, DIR or GLOB... Prints path<TAB>caption."""
    from pipeline.caption.caption import caption_images, write_html, write_results_json
    from pipeline.core.storage import reporting_disk_errors

    cfg, _ = DecodeConfig.pick(options)
    results = caption_images(checkpoint, list(inputs), cfg, batch_size=batch_size, encoder_weights=encoder_weights)
    for r in results:
        if r.error:
            click.echo(f"skipped {r.path}: {r.error}", err=True)
        else:
            click.echo(f"{r.path}\t{r.caption}")
    if json_out:
        with reporting_disk_errors(json_out, "free space, or choose another --json"):
            write_results_json(results, json_out)
    if html_out:
        with reporting_disk_errors(html_out, "free space, or choose another --html"):
            write_html(results, html_out)
    bad = sum(1 for r in results if r.error)
    click.echo(f"captioned {len(results) - bad} images, {bad} unreadable", err=True)


caption.params_sections = {DecodeConfig: ""}
