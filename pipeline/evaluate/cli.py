"""`pipeline evaluate`: decode a split from the cache and score it."""

from __future__ import annotations

import click

from pipeline.core.settings import click_options
from pipeline.evaluate.config import EvaluateConfig


@click.command()
@click.option("--checkpoint", default="checkpoints/best.pt", show_default=True, type=click.Path())
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path())
@click.option("--out", default="metrics/eval.json", show_default=True, type=click.Path(), help="Metrics JSON.")
@click.option("--results", default=None, type=click.Path(),
              help="COCO results JSON [default: results/captions_SPLIT.json].")
@click_options(EvaluateConfig)
def evaluate(checkpoint, cache_dir, out, results, **options):
    """Decode a split from the cached features and score it (BLEU-1..4, METEOR, ROUGE-L, CIDEr)."""
    from pipeline.evaluate.evaluate import evaluate as run

    cfg, _ = EvaluateConfig.pick(options)
    summary = run(checkpoint, cache_dir, cfg, out=out, results=results)
    click.echo(summary.table())
    click.echo(f"metrics -> {summary.metrics_path}, captions -> {summary.results_path}")


evaluate.params_sections = {EvaluateConfig: ""}
