"""`pipeline bench quality DIR`: caption quality on real photos, through the normal stages, in one command.

DIR is a folder in Flickr8k's own layout (Flickr8k.token.txt, the Flickr_8k.*Images.txt split lists, the
photos, as `pipeline download flickr8k` leaves it). The run prepares, extracts (a pretrained encoder),
trains the decoder with cross-entropy, continues with SCST, trains an image-blind decoder the same way,
and scores all three on the test split beside the published Flickr8k figures. Settings come from a
recipe file (configs/flickr8k.yaml): the same sections as params.yaml.

Splits: the test split is Flickr8k's test list when DIR has it. Where it is withheld (as in this
project's shared copy), the dev list is the test split instead, and `holdout` training photos, drawn
by a seeded shuffle, are the validation split: epochs, early stopping and SCST's best model are chosen
on them, never on the test split.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

from pipeline.caption.caption import caption_images, write_html
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import write_json, write_text
from pipeline.core.manifest import load_manifest
from pipeline.core.settings import read_params
from pipeline.decoder.checkpoint import load_checkpoint, needs_grid
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.evaluate import evaluate
from pipeline.extract.config import ExtractConfig
from pipeline.extract.extract import extract
from pipeline.prepare.config import PrepareConfig
from pipeline.prepare.prepare import prepare
from pipeline.scst.config import ScstConfig
from pipeline.scst.scst import scst
from pipeline.train.config import TrainConfig
from pipeline.train.train import train

TOKENS = "Flickr8k.token.txt"
LISTS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# Published Flickr8k test-split figures of this model family (- where the paper gives none).
ANCHORS = {
    "Karpathy & Fei-Fei 2015 (NeuralTalk)": {"BLEU-1": 0.579, "BLEU-2": 0.383, "BLEU-3": 0.245, "BLEU-4": 0.160},
    "Show, Attend and Tell, soft (Xu et al. 2015)": {"BLEU-1": 0.670, "BLEU-2": 0.448, "BLEU-3": 0.299,
                                                     "BLEU-4": 0.195, "METEOR": 0.189},
    "Show, Attend and Tell, hard (Xu et al. 2015)": {"BLEU-1": 0.670, "BLEU-2": 0.457, "BLEU-3": 0.314,
                                                     "BLEU-4": 0.213, "METEOR": 0.203},
}
GALLERY_IMAGES = 24


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_lists(data_dir: Path, out: Path, holdout: int, seed: int = 0) -> dict[str, int]:
    """Write the split lists the run uses into `out` (Flickr8k's names, so prepare reads them as dev -> val)
    beside a copy of the token file; returns the image count of each split."""
    missing = [n for n in (TOKENS, LISTS["train"], LISTS["dev"]) if not (data_dir / n).is_file()]
    if missing:
        raise PipelineError(f"{data_dir} is not a Flickr8k folder (no {', '.join(missing)}): get one with "
                            f"`pipeline download flickr8k {data_dir}`")
    train, dev = _read_list(data_dir / LISTS["train"]), _read_list(data_dir / LISTS["dev"])
    if (data_dir / LISTS["test"]).is_file():
        val, test = dev, _read_list(data_dir / LISTS["test"])
    else:  # the test list is withheld: dev is the test split, and a part of train the validation split
        if not 0 < holdout < len(train):
            raise PipelineError(f"--holdout {holdout}: need 0 < holdout < {len(train)} training photos")
        shuffled = sorted(train)
        random.Random(seed).shuffle(shuffled)
        val, train, test = sorted(shuffled[:holdout]), sorted(shuffled[holdout:]), dev
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in ((LISTS["train"], train), (LISTS["dev"], val), (LISTS["test"], test)):
        write_text(out / name, "\n".join(rows) + "\n")
    write_text(out / TOKENS, (data_dir / TOKENS).read_text(encoding="utf-8"))
    return {"train": len(train), "val": len(val), "test": len(test)}


def load_recipe(path: str) -> dict:
    """The recipe's sections as checked configs (unknown settings refused, naming the file)."""
    params = read_params(path)
    configs = {"prepare": PrepareConfig, "extract": ExtractConfig, "train": TrainConfig, "scst": ScstConfig,
               "evaluate": EvaluateConfig}
    out = {}
    for name, cls in configs.items():
        section = dict(params.get(name) or {})
        if name == "prepare":
            section.update(dataset="flickr8k", annotations=["-"], images=["-"])  # the run's own, below
        out[name] = cls.from_dict(section, where=f"{path}: {name}")
    return out


def bench_quality(data_dir: str, recipe: str = "configs/flickr8k.yaml", work: str = "runs/flickr8k",
                  holdout: int = 1000, compare: str = "", log=print) -> dict:
    """The whole run (see the module docstring); writes WORK/quality.json and WORK/gallery.html.

    `compare` (showtell | attend): also train and score that decoder from the same cache, the same way, as
    "<compare> cross-entropy" and "<compare> SCST"; its stages are timed apart from the benchmark's own."""
    data, work_dir = Path(data_dir), Path(work)
    cfg = load_recipe(recipe)
    if compare and compare == cfg["train"].decoder:
        raise PipelineError(f"--compare {compare}: the recipe's decoder is {compare} already; compare the other one")
    if compare == "attend" and cfg["extract"].features != "grid":
        raise PipelineError("--compare attend needs the grid: set extract.features: grid in the recipe")
    t0, seconds, compared = time.perf_counter(), {}, set()  # compared: the --compare stages, timed apart
    counts = split_lists(data, work_dir / "lists", holdout)
    log(f"splits: train {counts['train']}, val {counts['val']}, test {counts['test']} photos")
    cache = work_dir / "cache"

    def stage(name: str, fn, extra: bool = False):
        t = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t, 1)
        if extra:
            compared.add(name)
        log(f"{name}: {seconds[name]:.0f} s" + (f"  {result.line()}" if hasattr(result, "line") else ""))
        return result

    # DIR itself as the image folder: read_flickr8k also looks in its usual subfolders (Flicker8k_Dataset, images)
    stage("prepare", lambda: prepare(replace(cfg["prepare"], annotations=[str(work_dir / "lists")],
                                             images=[str(data)]), cache))
    stage("extract", lambda: extract(cache, cfg["extract"], progress=False))
    runs = {"cross-entropy": work_dir / "xe", "SCST": work_dir / "scst", "image-blind": work_dir / "blind"}
    ours = set(runs)
    # the image-blind floor is a Show-and-Tell decoder: blind, an attention decoder is the same language model
    # at several times the cost (its regions are all the mean feature)
    trains = {"cross-entropy": cfg["train"], "image-blind": replace(cfg["train"], blind=True, decoder="showtell")}
    inits = {"SCST": "cross-entropy"}
    if compare:  # the other decoder beside the recipe's, on the same cache
        runs.update({f"{compare} cross-entropy": work_dir / f"{compare}_xe", f"{compare} SCST": work_dir / f"{compare}_scst"})
        trains[f"{compare} cross-entropy"] = replace(cfg["train"], decoder=compare)
        inits[f"{compare} SCST"] = f"{compare} cross-entropy"
    for folder in runs.values():  # every decoder is trained afresh (a killed earlier run's last.pt included)
        shutil.rmtree(folder, ignore_errors=True)
    for name, tcfg in trains.items():
        stage(f"train {name}", lambda o=runs[name], c=tcfg: train(
            cache, out=o, metrics_dir=o / "metrics", cfg=c, progress=False, log=lambda m: None), name not in ours)
    for name, init in inits.items():
        stage(name, lambda n=name, i=init: scst(cache, init=runs[i] / "best.pt", out=runs[n],
                                                metrics_dir=runs[n] / "metrics", cfg=cfg["scst"], progress=False,
                                                log=lambda m: None), name not in ours)
    ecfg = replace(cfg["evaluate"], split="test")
    scores = {}
    for name in runs:
        ev = stage(f"evaluate {name}", lambda n=name: evaluate(
            runs[n] / "best.pt", cache, ecfg, out=runs[n] / "eval.json", results=runs[n] / "captions.json"),
                   name not in ours)
        scores[name] = {k: round(ev.scores[k], 4) for k in KEYS if k in ev.scores}
    gallery = stage("gallery", lambda: write_gallery(work_dir, runs["SCST"] / "best.pt", ecfg, table(scores)))
    total = time.perf_counter() - t0
    extra = sum(seconds[name] for name in compared)
    report = {"data": str(data), "recipe": recipe, "splits": counts, "encoder": cfg["extract"].arch,
              "scores": scores, "anchors": ANCHORS,
              "seconds": {**seconds, "total": round(total, 1), "benchmark": round(total - extra, 1)},
              "cider_seeing_over_blind": _ratio(scores["cross-entropy"], scores["image-blind"]),
              "gallery": str(gallery)}
    write_json(work_dir / "quality.json", report)
    log(table(scores))
    log(f"CIDEr seeing / blind (cross-entropy): {report['cider_seeing_over_blind']:.2f}x;  "
        f"{report['seconds']['benchmark'] / 60:.1f} min" + (f" ({total / 60:.1f} with --compare {compare})"
                                                           if compare else "") + f";  gallery: {gallery}")
    return report


def _ratio(seeing: dict, blind: dict) -> float:
    return seeing["CIDEr"] / blind["CIDEr"] if blind.get("CIDEr", 0) > 0 else float("inf")


def table(scores: dict) -> str:
    """Our rows and the published ones, one metric per column (- where a paper gives none)."""
    width = max(map(len, [*scores, *ANCHORS])) + 2
    lines = [f"{'test split':<{width}}" + "".join(f"{k:>9}" for k in KEYS)]
    for name, row in [*scores.items(), *ANCHORS.items()]:
        lines.append(f"{name:<{width}}" + "".join(f"{row[k]:>9.3f}" if k in row else f"{'-':>9}" for k in KEYS))
    return "\n".join(lines)


def write_gallery(work_dir: Path, checkpoint: Path, ecfg: EvaluateConfig, summary: str) -> Path:
    """The first GALLERY_IMAGES test photos with the model's caption and their human references."""
    manifest = load_manifest(work_dir / "cache")
    test = [r for r in manifest.images if r.split == "test"][:GALLERY_IMAGES]
    paths = [str(Path(manifest.image_dirs[r.dir]) / r.file) for r in test]
    results = caption_images(checkpoint, paths, ecfg, attention=needs_grid(load_checkpoint(checkpoint)))
    refs = {p: list(r.captions) for p, r in zip(paths, test)}
    path = work_dir / "gallery.html"
    write_html(results, path, title=f"Flickr8k test photos, {checkpoint}", references=refs, summary=summary)
    write_json(work_dir / "gallery.json", [{"file": r.path, "caption": r.caption, "references": refs[r.path]}
                                           for r in results])
    return path
