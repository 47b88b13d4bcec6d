"""`pipeline evaluate`: decode a split from the cache and score it."""

from __future__ import annotations

import click

from pipeline.core import paths
from pipeline.core.settings import click_options
from pipeline.evaluate.config import EvaluateConfig


@click.command()
@click.option("--checkpoint", default=paths.FINAL_CHECKPOINT, show_default=True, type=click.Path())
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path())
@click.option("--out", default=paths.EVAL_METRICS, show_default=True, type=click.Path(), help="Metrics JSON.")
@click.option("--results", default=None, type=click.Path(),
              help="COCO results JSON [default: captions_SPLIT.json beside --out].")
@click_options(EvaluateConfig)
@click.option("--allow-overlap", is_flag=True,
              help="Score images the checkpoint was trained on (refused by default: such scores flatter it).")
def evaluate(checkpoint, cache_dir, out, results, allow_overlap, **options):
    """Decode a split from the cached features and score it (BLEU-1..4, METEOR, ROUGE-L, CIDEr)."""
    from pipeline.evaluate.evaluate import evaluate as run

    cfg, _ = EvaluateConfig.pick(options)
    summary = run(checkpoint, cache_dir, cfg, out=out, results=results, allow_overlap=allow_overlap)
    click.echo(summary.table())
    click.echo(f"metrics -> {summary.metrics_path}, captions -> {summary.results_path}")


evaluate.params_sections = {EvaluateConfig: ""}
