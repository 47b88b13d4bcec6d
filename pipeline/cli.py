"""The `pipeline` command: a thin click layer over the library functions of each stage.

Every command's work lives in a module that tests call directly; here we only parse options,
call it, and print its summary. A `PipelineError` becomes one `Error: ...` line and exit status 1.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from pipeline.core.errors import PipelineError

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


class Group(click.Group):
    """Turns user-fixable errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            from pipeline.core import distributed

            if isinstance(e, distributed.SharedError) and not distributed.context().is_main:
                sys.exit(1)  # under torchrun, rank 0 prints the shared message once
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished work is kept; rerun the same command to continue", err=True)
            sys.exit(130)


# Which params.yaml sections feed which command, and renamed keys (section key -> option name).
PARAMS_SECTIONS = {
    "prepare": {"data": {}, "vocab": {"threshold": "vocab_threshold"}},
    "extract": {"encoder": {}},
    "train": {"model": {}, "train": {}},
    "evaluate": {"eval": {}},
    "caption": {"eval": {"split": None, "tokenizer": None, "max_images": None}},
    "bench.blind": {"model": {"blind": None}, "train": {}, "eval": {"max_length": "eval_max_length", "max_images": None}},
}


def params_defaults(path: str) -> dict:
    """params.yaml -> click default_map: each command takes its defaults from its own sections."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="--params") from None
    except yaml.YAMLError as e:
        raise click.BadParameter(f"{path} is not valid YAML: {e}", param_hint="--params") from None
    out: dict = {}
    for command, sections in PARAMS_SECTIONS.items():
        for section, renames in sections.items():
            for key, value in (params.get(section) or {}).items():
                name = renames.get(key, key)
                if name is not None:
                    node = out
                    for part in command.split("."):  # "bench.blind": a subcommand's own default_map
                        node = node.setdefault(part, {})
                    node[name] = value
    return out


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pipeline")
@click.option("--params", "params_file", default=None, type=click.Path(dir_okay=False),
              help="Take option defaults from this params.yaml (sections data, vocab, encoder, model, train, "
                   "eval); options given on the command line still win.")
@click.pass_context
def main(ctx: click.Context, params_file: str | None) -> None:
    """Show-and-Tell image captioning: cache frozen-ResNet features once, retrain decoders in minutes.

    Stages: prepare -> extract -> train -> evaluate, plus caption for new images.
    `dvc repro` runs them all from params.yaml (see dvc.yaml).
    """
    if params_file:
        ctx.default_map = params_defaults(params_file)


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
    from pipeline.prepare.prepare import prepare as run

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
    from pipeline.extract.extract import extract as run

    summary = run(cache_dir=cache_dir, out=out, arch=arch, weights=weights, batch_size=batch_size, workers=workers,
                  device=device, dtype=dtype, resize=resize, crop=crop, amp=amp, chunk_size=chunk_size,
                  force=force, progress=not quiet)
    from pipeline.core import distributed

    if distributed.context().is_main:
        for path, reason in summary.failures[:20]:
            click.echo(f"  failed: {path}: {reason}", err=True)
        if len(summary.failures) > 20:
            click.echo(f"  ... and {len(summary.failures) - 20} more (see the `errors` dataset)", err=True)
        click.echo(summary.line())


# ----------------------------------------------------------------------------------------------- train
def train_options(f, blind: bool = True):
    """Model and training options shared by `train` and `bench blind`, so both train the same way."""
    options = [
        click.option("--epochs", default=10, show_default=True, type=click.IntRange(1)),
        click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1), help="Captions per batch."),
        click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option("--amsgrad", is_flag=True, help="Use Adam's AMSGrad variant."),
        click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(0)),
        click.option("--clip", default=5.0, show_default=True, type=click.FloatRange(0), help="Max gradient norm (0: off)."),
        click.option("--lr-decay", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="Multiply the learning rate by this every --lr-decay-every epochs."),
        click.option("--lr-decay-every", default=1, show_default=True, type=click.IntRange(1)),
        click.option("--accumulate", default=1, show_default=True, type=click.IntRange(1),
                     help="Gradient accumulation: one optimizer step every N batches."),
        click.option("--patience", default=0, show_default=True, type=click.IntRange(0),
                     help="Early stopping: stop after N epochs without a better validation CIDEr (0: off)."),
        click.option("--save-every", default=1, show_default=True, type=click.IntRange(1),
                     help="Write last.pt every N epochs."),
        click.option("--print-every", default=100, show_default=True, type=click.IntRange(1),
                     help="Steps between loss updates on the progress bar."),
        click.option("--val-images", default=5000, show_default=True, type=click.IntRange(0),
                     help="Validation images decoded per epoch for CIDEr/BLEU-4 (0: all)."),
        click.option("--max-length", default=20, show_default=True, type=click.IntRange(1),
                     help="Longest caption decoded for validation."),
        click.option("--embed-size", default=256, show_default=True, type=click.IntRange(1)),
        click.option("--hidden-size", default=512, show_default=True, type=click.IntRange(1)),
        click.option("--num-layers", default=1, show_default=True, type=click.IntRange(1)),
        click.option("--dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
        click.option("--batchnorm/--no-batchnorm", default=False, show_default=True,
                     help="BatchNorm after the image projection."),
        click.option("--blind/--no-blind", default=False, show_default=True,
                     help="Image-blind baseline: replace every image feature by the mean feature.") if blind else None,
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"]),
                     help="Autocast precision on CUDA. Ignored on CPU."),
    ]
    for opt in reversed([o for o in options if o is not None]):
        f = opt(f)
    return f


def split_train_options(options: dict) -> tuple[dict, "TrainConfig"]:
    """train_options' values -> (the decoder's keyword arguments, TrainConfig): what TrainConfig does not
    name is a model setting."""
    from dataclasses import fields

    from pipeline.train.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    model = {k: v for k, v in options.items() if k not in names}
    return model, TrainConfig(**{k: v for k, v in options.items() if k in names})


@main.command()
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(),
              help="Folder with features.h5, labels.h5, vocab.json and manifest.json.")
@click.option("--out", default="checkpoints", show_default=True, type=click.Path(),
              help="Checkpoint folder (last.pt, best.pt).")
@click.option("--metrics-dir", default="metrics", show_default=True, type=click.Path(),
              help="train_steps.csv, train_epochs.json, train.json and train.png go here.")
@train_options
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (ends where an uninterrupted run would).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(cache_dir, out, metrics_dir, resume, quiet, **options):
    """Train the projection + LSTM decoder from the feature cache (the CNN is never run)."""
    from pipeline.core import distributed
    from pipeline.train.train import train as run

    model, cfg = split_train_options(options)
    is_main = distributed.context().is_main
    summary = run(cache_dir=cache_dir, out=out, metrics_dir=metrics_dir, cfg=cfg, **model, resume=resume,
                  progress=not quiet, log=(lambda m: click.echo(m, err=True)) if is_main else (lambda m: None))
    if is_main:
        click.echo(summary.line())


# -------------------------------------------------------------------------------------------- evaluate
def decoding_options(f):
    """Options shared by `evaluate` and `caption`."""
    for opt in reversed([
        click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1), help="1 = greedy."),
        click.option("--max-length", default=20, show_default=True, type=click.IntRange(1), help="Most words per caption."),
        click.option("--length-penalty", default=0.0, show_default=True, type=float,
                     help="GNMT length penalty alpha (0: rank by total log-probability)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.option("--checkpoint", default="checkpoints/best.pt", show_default=True, type=click.Path())
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path())
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--out", default="metrics/eval.json", show_default=True, type=click.Path(), help="Metrics JSON.")
@click.option("--results", default=None, type=click.Path(),
              help="COCO results JSON [default: results/captions_SPLIT.json].")
@decoding_options
@click.option("--tokenizer", default="auto", show_default=True, type=click.Choice(["auto", "ptb", "simple"]),
              help="auto: pycocoevalcap's PTB tokenizer when Java is present, else a pure-Python one.")
@click.option("--max-images", default=0, show_default=True, type=click.IntRange(0), help="Score only the first N (0: all).")
def evaluate(checkpoint, cache_dir, split, out, results, beam_size, max_length, length_penalty, device, tokenizer,
             max_images):
    """Decode a split from the cached features and score it (BLEU-1..4, METEOR, ROUGE-L, CIDEr)."""
    from pipeline.evaluate.evaluate import evaluate as run

    summary = run(checkpoint=checkpoint, cache_dir=cache_dir, split=split, out=out, results=results,
                  beam_size=beam_size, max_length=max_length, length_penalty=length_penalty, device=device,
                  tokenizer=tokenizer, max_images=max_images)
    click.echo(summary.table())
    click.echo(f"metrics -> {summary.metrics_path}, captions -> {summary.results_path}")


# --------------------------------------------------------------------------------------------- caption
@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", default="checkpoints/best.pt", show_default=True, type=click.Path())
@decoding_options
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--encoder-weights", default=None, type=click.Path(),
              help="The local weights file the encoder was made with, if it has moved since extraction.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the COCO results format here.")
@click.option("--html", "html_out", default=None, type=click.Path(), help="Also write a page of thumbnails and captions.")
def caption(inputs, checkpoint, beam_size, max_length, length_penalty, device, batch_size, encoder_weights,
            json_out, html_out):
    """Caption image files: IMAGE, DIR or GLOB... Prints path<TAB>caption."""
    from pipeline.caption.caption import caption_images, write_html, write_results_json

    results = caption_images(checkpoint, list(inputs), beam_size=beam_size, max_length=max_length,
                             length_penalty=length_penalty, device=device, batch_size=batch_size,
                             encoder_weights=encoder_weights)
    for r in results:
        if r.error:
            click.echo(f"skipped {r.path}: {r.error}", err=True)
        else:
            click.echo(f"{r.path}\t{r.caption}")
    if json_out:
        write_results_json(results, json_out)
    if html_out:
        write_html(results, html_out)
    bad = sum(1 for r in results if r.error)
    click.echo(f"captioned {len(results) - bad} images, {bad} unreadable", err=True)


# -------------------------------------------------------------------------------------------- download
@main.group()
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


# ------------------------------------------------------------------------------------------- demo-data
@main.command("demo-data")
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


# ----------------------------------------------------------------------------------------------- bench
@main.group()
def bench():
    """Benchmarks that print their figures and ratios, and fail (exit status 1) when a target is missed."""


def check_targets(checks: list[tuple[str, float, float, str]]) -> None:
    """checks: (what, measured, target, ">=" or "<="). Prints each; one Error line lists every miss."""
    missed = []
    for what, value, target, op in checks:
        ok = value >= target if op == ">=" else value <= target
        click.echo(f"  target {what} {op} {target:g}: {'met' if ok else 'MISSED'} ({value:.3g})")
        if not ok:
            missed.append(f"{what} {value:.3g} (target {op} {target:g})")
    if missed:
        raise PipelineError("benchmark target missed: " + "; ".join(missed))


@bench.command("extract")
@click.option("--images", "images", multiple=True, default=["../shared/data/flickr8k/images"], show_default=True,
              help="Image files, folders or globs to run over (repeatable).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(0), help="Use the first N images (0: all).")
@extract_options
@click.option("--target-ratio", default=0.85, show_default=True, type=click.FloatRange(0),
              help="Least full-extract / bare-forward throughput ratio.")
@click.option("--max-memory-mb", default=2048, show_default=True, type=click.FloatRange(0),
              help="Most peak resident memory of any one process (main or decode worker).")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_extract_cmd(images, limit, arch, weights, batch_size, workers, device, resize, crop, amp, target_ratio,
                      max_memory_mb, json_out):
    """Bare encoder forward vs full `extract` throughput on the same images, and their ratio."""
    from pipeline.bench.bench import bench_extract
    from pipeline.core.fileio import write_json

    res = bench_extract(list(images), arch=arch, weights=weights, batch_size=batch_size, workers=workers,
                        device=device, resize=resize, crop=crop, amp=amp, limit=limit, log=click.echo)
    if json_out:
        write_json(json_out, res)
    check_targets([("ratio extract / bare", res["ratio"], target_ratio, ">="),
                   ("peak memory MB", max(res["peak_rss_main_mb"], res["peak_rss_worker_mb"]), max_memory_mb, "<=")])


@bench.command("train")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(),
              help="A prepared and extracted cache.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--embed-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--hidden-size", default=512, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True)
@click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"]))
@click.option("--max-batches", default=0, show_default=True, type=click.IntRange(0),
              help="Time only the first N batches of the epoch (0: the whole epoch).")
@click.option("--notebook-batches", default=10, show_default=True, type=click.IntRange(1),
              help="Batches timed the notebook way (ResNet at every step).")
@click.option("--target-ratio", default=0.9, show_default=True, type=click.FloatRange(0),
              help="Least train-from-cache / bare-decoder-step throughput ratio.")
@click.option("--target-speedup", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Least speed-up of training from the cache over the notebook way.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_train_cmd(cache_dir, batch_size, embed_size, hidden_size, device, amp, max_batches, notebook_batches,
                    target_ratio, target_speedup, json_out):
    """Bare decoder step vs `train` from the cache vs the ResNet-every-step notebook way."""
    from pipeline.bench.bench import bench_train
    from pipeline.core.fileio import write_json

    res = bench_train(cache_dir, batch_size=batch_size, embed_size=embed_size, hidden_size=hidden_size,
                      device=device, amp=amp, notebook_batches=notebook_batches, max_batches=max_batches,
                      log=click.echo)
    if json_out:
        write_json(json_out, res)
    check_targets([("ratio train / bare", res["ratio"], target_ratio, ">="),
                   ("speed-up over the notebook way", res["speedup_vs_notebook"], target_speedup, ">=")])


@bench.command("blind")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(),
              help="A prepared and extracted cache with train, val and SPLIT images.")
@functools.partial(train_options, blind=False)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1), help="1 = greedy.")
@click.option("--eval-max-length", default=20, show_default=True, type=click.IntRange(1),
              help="Most words per evaluated caption.")
@click.option("--length-penalty", default=0.0, show_default=True, type=float)
@click.option("--tokenizer", default="auto", show_default=True, type=click.Choice(["auto", "ptb", "simple"]))
@click.option("--target", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Least CIDEr ratio seeing / blind.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_blind_cmd(cache_dir, split, beam_size, eval_max_length, length_penalty, tokenizer, target, json_out,
                    **options):
    """Train and evaluate the decoder seeing the images and image-blind; compare their CIDEr.

    With `pipeline --params params.yaml bench blind`, both runs use params.yaml's model, train and
    eval settings, so the blind decoder is trained exactly as `dvc repro` trains the real one.
    """
    from pipeline.bench.bench import bench_blind
    from pipeline.core.fileio import write_json

    model, cfg = split_train_options(options)
    click.echo(f"bench blind: {cache_dir}, {cfg.epochs} epochs, hidden {model['hidden_size']}, {split} split")
    res = bench_blind(cache_dir, model, cfg, split=split, beam_size=beam_size, max_length=eval_max_length,
                      length_penalty=length_penalty, tokenizer=tokenizer, log=click.echo)
    res["target"] = target
    if json_out:
        write_json(json_out, res)
    check_targets([("CIDEr seeing / blind", res["cider_ratio"], target, ">=")])


if __name__ == "__main__":
    main()
