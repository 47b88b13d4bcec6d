"""`pipeline download` and `pipeline demo-data`: getting a dataset onto the disk."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def download():
    """Download public datasets."""


@download.command("coco2014")
@click.argument("dest", type=click.Path())
@click.option("--base-url", default=None, help="Mirror of images.cocodataset.org (same layout).")
@click.option("--karpathy-url", default=None, help="Mirror of Karpathy's caption_datasets.zip.")
@click.option("--delete-archives", is_flag=True, help="Delete each zip once it is extracted.")
def download_coco2014(dest, base_url, karpathy_url, delete_archives):
    """COCO 2014 train+val images, captions and Karpathy's split into DEST (resumable)."""
    from pipeline.acquire.download import download_coco2014 as run

    summary = run(dest, base_url=base_url, karpathy_url=karpathy_url, keep_archives=not delete_archives,
                  log=lambda m: click.echo(m, err=True))
    click.echo(summary.line())


@download.command("flickr8k")
@click.argument("dest", type=click.Path())
@click.option("--base-url", default=None,
              help="Mirror of github.com/jbrownlee/Datasets/releases/download/Flickr8k/ (same file names).")
@click.option("--delete-archives", is_flag=True, help="Delete each zip once it is extracted.")
def download_flickr8k(dest, base_url, delete_archives):
    """Flickr8k photos, captions and splits into DEST (resumable), ready for `pipeline prepare`."""
    from pipeline.acquire.download import download_flickr8k as run
    from pipeline.acquire.download import flickr8k_prepare_command

    summary = run(dest, base_url=base_url, keep_archives=not delete_archives, log=lambda m: click.echo(m, err=True))
    click.echo(summary.line())
    click.echo(f"next: {flickr8k_prepare_command(dest)}")


@click.command("demo-data")
@click.argument("dest", type=click.Path())
@click.option("--train", "n_train", default=1200, show_default=True, type=click.IntRange(1))
@click.option("--val", "n_val", default=150, show_default=True, type=click.IntRange(1))
@click.option("--test", "n_test", default=150, show_default=True, type=click.IntRange(1))
@click.option("--size", "image_size", default=128, show_default=True, type=click.IntRange(32), help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, type=int)
def demo_data(dest, n_train, n_val, n_test, image_size, seed):
    """Generate the offline demo dataset (COCO captions format) into DEST, deterministically."""
    from pipeline.acquire.demo_data import make_demo_data

    info = make_demo_data(dest, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)
    counts = ", ".join(f"{split} {n}" for split, n in info["counts"].items())
    click.echo(f"demo data -> {dest}: {sum(info['counts'].values())} images ({counts}), "
               f"{sum(info['n_captions'].values())} captions, {len(info['vocabulary'])} distinct words; "
               f"annotations in {Path(dest) / 'annotations'}")
