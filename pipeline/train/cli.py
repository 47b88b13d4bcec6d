"""`pipeline train`: the projection + LSTM decoder from the feature cache."""

from __future__ import annotations

import click

from pipeline.core import paths
from pipeline.core.settings import click_options
from pipeline.train.config import TrainConfig


@click.command()
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(),
              help="Folder with features.h5, labels.h5, vocab.json and manifest.json.")
@click.option("--out", default=paths.XE_DIR, show_default=True, type=click.Path(),
              help="Checkpoint folder (last.pt, best.pt).")
@click.option("--metrics-dir", default=paths.XE_METRICS, show_default=True, type=click.Path(),
              help="train_steps.csv, train_epochs.json, train.json and train.png go here.")
@click_options(TrainConfig)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (ends where an uninterrupted run would).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(cache_dir, out, metrics_dir, resume, quiet, **options):
    """Train the projection + LSTM decoder from the feature cache (the CNN is never run)."""
    from pipeline.core import distributed
    from pipeline.train.train import train as run

    cfg, _ = TrainConfig.pick(options)
    is_main = distributed.context(cfg.dist_timeout).is_main
    summary = run(cache_dir=cache_dir, out=out, metrics_dir=metrics_dir, cfg=cfg, resume=resume,
                  progress=not quiet, log=lambda m: click.echo(m, err=True))
    if is_main:
        click.echo(summary.line())


train.params_sections = {TrainConfig: ""}
