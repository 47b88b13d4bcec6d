"""`pipeline scst`: self-critical training of a cross-entropy decoder, from the cache."""

from __future__ import annotations

import click

from pipeline.core import paths
from pipeline.core.settings import click_options
from pipeline.scst.config import ScstConfig


@click.command()
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(),
              help="Folder with features.h5, labels.h5, vocab.json and manifest.json.")
@click.option("--init", default=paths.XE_CHECKPOINT, show_default=True, type=click.Path(),
              help="The cross-entropy checkpoint to start from.")
@click.option("--out", default=paths.SCST_DIR, show_default=True, type=click.Path(),
              help="Checkpoint folder (last.pt, best.pt).")
@click.option("--metrics-dir", default=paths.SCST_METRICS, show_default=True, type=click.Path(),
              help="scst_steps.csv, scst_epochs.json, scst.json and scst.png go here.")
@click_options(ScstConfig)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (ends where an uninterrupted run would).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def scst(cache_dir, init, out, metrics_dir, resume, quiet, **options):
    """Self-critical sequence training: optimise CIDEr-D directly, starting from a cross-entropy checkpoint."""
    from pipeline.core import distributed
    from pipeline.scst.scst import scst as run

    cfg, _ = ScstConfig.pick(options)
    summary = run(cache_dir, init, out, metrics_dir, cfg, resume=resume, progress=not quiet,
                  log=lambda m: click.echo(m, err=True))
    if distributed.context().is_main:
        click.echo(summary.line())


scst.params_sections = {ScstConfig: ""}
