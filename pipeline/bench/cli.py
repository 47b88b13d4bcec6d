"""`pipeline bench ...`: each command prints its figures and ratios and fails when a target is missed.

Benchmarks (speed and memory, against the compute limit; bench.py):
    extract   full `extract` vs the bare encoder forward; limits: throughput ratio, peak memory per process
    train     `train` from the cache vs the bare decoder step and vs the notebook way; limits: ratio, speed-up
    scst      an SCST step vs a cross-entropy step; limit: the reward's share of the step
Ablations and quality runs (caption scores, not speed):
    blind     the decoder trained seeing the images and image-blind (ablations.py); limit: CIDEr ratio
    quality   the whole pipeline on real photos (quality.py); limits: CIDEr, the ratio to a blind decoder
    demo      the demo's table from `make demo`'s metrics (demo.py); limit: SCST keeps the all-right share
Standalone scripts beside them: `python -m pipeline.bench.memory` (peak memory per training rank),
`pipeline.bench.synthetic_cache` (a COCO-sized cache for it), `pipeline.bench.cider_speed`,
`pipeline.bench.draft_effect`.
"""

from __future__ import annotations

import click

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.settings import click_options
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.scst.config import ScstConfig
from pipeline.train.config import TrainConfig


@click.group()
def bench():
    """Benchmarks (extract, train, scst: speed) and ablations/quality runs (blind, quality): each prints its
    figures and fails (exit status 1) when a target is missed."""


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


def _write(json_out, res) -> None:
    if json_out:
        from pipeline.core.fileio import write_json

        write_json(json_out, res)


@bench.command("extract")
@click.option("--images", "images", multiple=True, default=["data/demo/train"], show_default=True,
              help="Image files, folders or globs to run over (repeatable); the default is the demo's (make demo).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(0), help="Use the first N images (0: all).")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1),
              help="Read the images this many times (a small folder, e.g. the 200 full-size photos, x5).")
@click_options(ExtractConfig)
@click.option("--target-ratio", default=0.85, show_default=True, type=click.FloatRange(0),
              help="Least full-extract (steady state) / bare-forward throughput ratio.")
@click.option("--max-memory-mb", default=2048, show_default=True, type=click.FloatRange(0),
              help="Most peak resident memory of any one process (main or decode worker).")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_extract_cmd(images, limit, repeat, target_ratio, max_memory_mb, json_out, **options):
    """Bare encoder forward vs full `extract` throughput on the same images, and their ratio."""
    from pipeline.bench.bench import bench_extract

    cfg, _ = ExtractConfig.pick(options)
    res = bench_extract(list(images), cfg, limit=limit, repeat=repeat, log=click.echo)
    _write(json_out, res)
    check_targets([("ratio extract (steady) / bare", res["ratio"], target_ratio, ">="),
                   ("peak memory MB", max(res["peak_rss_main_mb"], res["peak_rss_worker_mb"]), max_memory_mb, "<=")])


@bench.command("train")
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(),
              help="A prepared and extracted cache.")
@click_options(TrainConfig)
@click.option("--max-batches", default=0, show_default=True, type=click.IntRange(0),
              help="Time only the first N batches of the epoch (0: the whole epoch).")
@click.option("--notebook-batches", default=10, show_default=True, type=click.IntRange(1),
              help="Batches timed the notebook way (ResNet at every step).")
@click.option("--target-ratio", default=0.9, show_default=True, type=click.FloatRange(0),
              help="Least train-from-cache / bare-decoder-step throughput ratio.")
@click.option("--target-speedup", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Least speed-up of training from the cache over the notebook way.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_train_cmd(cache_dir, max_batches, notebook_batches, target_ratio, target_speedup, json_out, **options):
    """Bare decoder step vs `train` from the cache vs the ResNet-every-step notebook way."""
    from pipeline.bench.bench import bench_train

    cfg, _ = TrainConfig.pick(options)
    res = bench_train(cache_dir, cfg, notebook_batches=notebook_batches, max_batches=max_batches, log=click.echo)
    _write(json_out, res)
    check_targets([("ratio train / bare", res["ratio"], target_ratio, ">="),
                   ("speed-up over the notebook way", res["speedup_vs_notebook"], target_speedup, ">=")])


@bench.command("blind")
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(),
              help="A prepared and extracted cache with train, val and SPLIT images.")
@click_options(TrainConfig, exclude=("blind",))
@click_options(EvaluateConfig, prefix="eval_")
@click.option("--target", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Least CIDEr ratio seeing / blind.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_blind_cmd(cache_dir, target, json_out, **options):
    """An ablation: train and evaluate the decoder seeing the images and image-blind; compare their CIDEr.

    With `pipeline --params params.yaml bench blind`, both runs use params.yaml's train and evaluate
    settings, so the blind decoder is trained exactly as `dvc repro` trains the real one.
    """
    from pipeline.bench.ablations import bench_blind

    cfg, rest = TrainConfig.pick(options)
    ecfg, _ = EvaluateConfig.pick(rest, prefix="eval_")
    click.echo(f"bench blind: {cache_dir}, {cfg.epochs} epochs, hidden {cfg.hidden_size}, {ecfg.split} split")
    res = bench_blind(cache_dir, cfg, ecfg, log=click.echo)
    res["target"] = target
    _write(json_out, res)
    check_targets([("CIDEr seeing / blind", res["cider_ratio"], target, ">=")])


@bench.command("scst")
@click.option("--cache-dir", default=paths.CACHE_DIR, show_default=True, type=click.Path(),
              help="A prepared and extracted cache.")
@click_options(ScstConfig)
@click_options(TrainConfig, prefix="train_")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1), help="Steps timed of each kind.")
@click.option("--max-reward-share", default=0.25, show_default=True, type=click.FloatRange(0, 1),
              help="Most share of an SCST step spent computing the reward.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_scst_cmd(cache_dir, steps, max_reward_share, json_out, **options):
    """An SCST step vs a cross-entropy step on the same cache (captions/s), and the reward's share."""
    from pipeline.bench.bench import bench_scst

    cfg, rest = ScstConfig.pick(options)
    tcfg, _ = TrainConfig.pick(rest, prefix="train_")
    res = bench_scst(cache_dir, cfg, tcfg, steps=steps, log=click.echo)
    _write(json_out, res)
    check_targets([("reward share of an SCST step", res["reward_share"], max_reward_share, "<=")])


bench_scst_cmd.params_sections = {ScstConfig: "", TrainConfig: "train_"}
bench_extract_cmd.params_sections = {ExtractConfig: ""}
bench_train_cmd.params_sections = {TrainConfig: ""}
bench_blind_cmd.params_sections = {TrainConfig: "", EvaluateConfig: "eval_"}


@bench.command("quality")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--recipe", default="configs/flickr8k.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Settings of every stage (params.yaml's sections).")
@click.option("--work", default="runs/flickr8k", show_default=True, type=click.Path(file_okay=False),
              help="Where the cache, checkpoints, scores and gallery go.")
@click.option("--holdout", default=1000, show_default=True, type=click.IntRange(1),
              help="Training photos held out as the validation split when DIR withholds the test list.")
@click.option("--min-cider", "min_cider", default=(0.50, 0.58), show_default=True, type=(float, float),
              help="Least test CIDEr of the cross-entropy and of the SCST decoder.")
@click.option("--min-bleu4", "min_bleu4", default=(0.20, 0.22), show_default=True, type=(float, float),
              help="Least test BLEU-4 of the cross-entropy and of the SCST decoder.")
@click.option("--min-blind-ratio", default=3.0, show_default=True, type=click.FloatRange(0),
              help="Least CIDEr ratio of the seeing decoder to the image-blind one.")
@click.option("--max-minutes", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Most wall-clock minutes of the benchmark (without --compare's stages).")
@click.option("--compare", default="", type=click.Choice(["", "showtell", "attend"]),
              help="Also train and score this decoder the same way, from the same cache.")
def bench_quality_cmd(data_dir, recipe, work, holdout, min_cider, min_bleu4, min_blind_ratio, max_minutes, compare):
    """Caption quality on real photos (Flickr8k's layout): prepare, extract, train, scst, evaluate, a blind baseline."""
    from pipeline.bench.quality import bench_quality

    res = bench_quality(data_dir, recipe, work, holdout, compare, log=click.echo)
    s = res["scores"]
    check_targets([("cross-entropy CIDEr", s["cross-entropy"]["CIDEr"], min_cider[0], ">="),
                   ("cross-entropy BLEU-4", s["cross-entropy"]["BLEU-4"], min_bleu4[0], ">="),
                   ("SCST CIDEr", s["SCST"]["CIDEr"], min_cider[1], ">="),
                   ("SCST BLEU-4", s["SCST"]["BLEU-4"], min_bleu4[1], ">="),
                   ("CIDEr seeing / blind", res["cider_seeing_over_blind"], min_blind_ratio, ">="),
                   ("minutes", res["seconds"]["benchmark"] / 60, max_minutes, "<=")])


@bench.command("demo")
@click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False),
              help="The project folder `make demo` ran in (its metrics/).")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the figures as JSON.")
def bench_demo_cmd(root, json_out):
    """The demo's results table (as in the README) from the metrics `make demo` wrote, and the machine's load;
    fails when SCST lowered the share of test captions with every attribute right."""
    from pipeline.bench.demo import demo_report, markdown

    res = demo_report(root)
    _write(json_out, res)
    click.echo(markdown(res))
    xe, sc = (res["rows"][k]["attributes"]["all_right"] for k in ("cross-entropy", "after SCST"))
    check_targets([("all-right captions after SCST - before", sc - xe, 0.0, ">=")])
