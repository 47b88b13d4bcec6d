"""`pipeline prepare`: dataset files -> manifest.json, vocab.json, labels.h5."""

from __future__ import annotations

import click

from pipeline.core import paths
from pipeline.core.settings import click_options
from pipeline.prepare.config import PrepareConfig


@click.command()
@click.option("--out-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(), help="Where to write the outputs.")
@click_options(PrepareConfig)
def prepare(out_dir, **options):
    """Read a dataset into manifest.json, vocab.json and labels.h5 under --out-dir."""
    from pipeline.prepare.prepare import prepare as run

    cfg, _ = PrepareConfig.pick(options)
    click.echo(run(cfg, out_dir=out_dir).line())


prepare.params_sections = {PrepareConfig: ""}
