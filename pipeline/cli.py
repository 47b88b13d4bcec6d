"""The `pipeline` command: a thin click layer over the library functions of each stage.

Every command's work lives in a module that tests call directly; here we only parse options,
call it, and print its summary. A `PipelineError` becomes one `Error: ...` line and exit status 1.
"""

from __future__ import annotations

import os
import sys

import click

from pipeline.errors import PipelineError

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


class Group(click.Group):
    """Turns user-fixable errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished work is kept; rerun the same command to continue", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pipeline")
def main() -> None:
    """Show-and-Tell image captioning: cache frozen-ResNet features once, retrain decoders in minutes.

    Stages: prepare -> extract -> train -> evaluate, plus caption for new images.
    `dvc repro` runs them all from params.yaml.
    """


# --------------------------------------------------------------------------------------------- prepare
@main.command()
@click.option("--dataset", type=click.Choice(["coco", "karpathy", "flickr8k"]), required=True,
              help="Annotation format: COCO captions JSON, Karpathy's dataset_*.json, or Flickr8k's text files.")
@click.option("--annotations", "annotations", multiple=True, required=True, type=click.Path(),
              help="Annotation file (or Flickr8k folder). Repeat for several (e.g. COCO train + val).")
@click.option("--images", "images", multiple=True, required=True, type=click.Path(),
              help="Image folder. Repeat for several (e.g. train2014 and val2014).")
@click.option("--out-dir", default="cache", show_default=True, type=click.Path(), help="Where to write the outputs.")
@click.option("--vocab-threshold", default=5, show_default=True, type=click.IntRange(1),
              help="Keep words seen at least this often in the training captions.")
@click.option("--max-length", default=20, show_default=True, type=click.IntRange(1),
              help="Cut captions to this many words (20 keeps ~99% of COCO captions whole).")
@click.option("--strict", is_flag=True, help="Fail when an annotated image is missing on disk (default: skip and count).")
def prepare(dataset, annotations, images, out_dir, vocab_threshold, max_length, strict):
    """Read a dataset into manifest.json, vocab.json and labels.h5 under --out-dir."""
    from pipeline.prepare import prepare as run

    summary = run(dataset=dataset, annotations=list(annotations), images=list(images), out_dir=out_dir,
                  vocab_threshold=vocab_threshold, max_length=max_length, strict=strict)
    click.echo(summary.line())


# --------------------------------------------------------------------------------------------- extract
def extract_options(f):
    """Options shared by `extract` and `bench extract`, so both describe the same run."""
    for opt in reversed([
        click.option("--arch", default="resnet152", show_default=True,
                     type=click.Choice(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]),
                     help="Frozen ImageNet ResNet."),
        click.option("--weights", default="imagenet", show_default=True,
                     help="'imagenet' (torchvision's IMAGENET1K weights, downloaded once into its cache), "
                          "a path to a local state-dict file, or 'none' (seeded random init, offline)."),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1)),
        click.option("--workers", default=None, type=click.IntRange(0),
                     help="DataLoader decode workers [default: 1 on CPU, cores-1 on CUDA]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--resize", default=256, show_default=True, type=click.IntRange(1),
                     help="Resize the shorter side to this many pixels..."),
        click.option("--crop", default=224, show_default=True, type=click.IntRange(1),
                     help="...then center-crop a square this size."),
        click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"]),
                     help="Autocast precision on CUDA (auto: bf16 where supported). Ignored on CPU."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(),
              help="Folder with manifest.json; features.h5 is written there.")
@click.option("--out", default=None, type=click.Path(), help="Feature file [default: CACHE_DIR/features.h5].")
@extract_options
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Storage type of the features.")
@click.option("--chunk-size", default=1024, show_default=True, type=click.IntRange(1),
              help="Rows per durable chunk: an interrupted run loses at most one chunk of work.")
@click.option("--force", is_flag=True, help="Rebuild even if a cache with other settings exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(cache_dir, out, arch, weights, batch_size, workers, device, resize, crop, amp, dtype, chunk_size,
            force, quiet):
    """Run the frozen ResNet once over every image and store pooled features in HDF5.

    Resumable: rerun the same command after an interruption and it continues where it stopped.
    """
    from pipeline.extract import extract as run

    summary = run(cache_dir=cache_dir, out=out, arch=arch, weights=weights, batch_size=batch_size, workers=workers,
                  device=device, dtype=dtype, resize=resize, crop=crop, amp=amp, chunk_size=chunk_size,
                  force=force, progress=not quiet)
    from pipeline import distributed

    if distributed.context().is_main:
        for path, reason in summary.failures[:20]:
            click.echo(f"  failed: {path}: {reason}", err=True)
        if len(summary.failures) > 20:
            click.echo(f"  ... and {len(summary.failures) - 20} more (see the `errors` dataset)", err=True)
        click.echo(summary.line())


if __name__ == "__main__":
    main()
