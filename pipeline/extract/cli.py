"""`pipeline extract`: the frozen ResNet over every image of the manifest, once, into features.h5."""

from __future__ import annotations

import click

from pipeline.core import paths
from pipeline.core.settings import click_options
from pipeline.extract.config import ExtractConfig


@click.command()
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(),
              help="Folder with manifest.json; features.h5 is written there.")
@click.option("--out", default=None, type=click.Path(), help="Feature file [default: CACHE_DIR/features.h5].")
@click_options(ExtractConfig)
@click.option("--force", is_flag=True, help="Rebuild even if a cache with other settings exists.")
@click.option("--retry-failed", is_flag=True,
              help="Also redo the images that failed before (images whose file changed are always redone).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(cache_dir, out, force, retry_failed, quiet, **options):
    """Run the frozen ResNet once over every image and store pooled features in HDF5.

    Resumable: rerun the same command after an interruption and it continues where it stopped.
    """
    from pipeline.core import distributed
    from pipeline.extract.extract import extract as run

    cfg, _ = ExtractConfig.pick(options)
    summary = run(cache_dir, cfg, out=out, force=force, progress=not quiet, retry_failed=retry_failed)
    if distributed.context().is_main:
        for path, reason in summary.failures[:20]:
            click.echo(f"  failed: {path}: {reason}", err=True)
        if len(summary.failures) > 20:
            click.echo(f"  ... and {len(summary.failures) - 20} more (see the `errors` dataset)", err=True)
        click.echo(summary.line())


extract.params_sections = {ExtractConfig: ""}
