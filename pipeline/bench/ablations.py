"""Ablations: the decoder trained and evaluated twice the same way, with one thing taken away, and the
ratio of their scores (`pipeline bench blind`). Quality, not speed: see bench.py for the speed benchmarks.

bench blind: once seeing the images and once image-blind (every feature replaced by the mean feature);
             the ratio of their CIDEr says how much the captions depend on the picture.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.core import paths
from pipeline.evaluate.config import EvaluateConfig
from pipeline.train.config import TrainConfig

SCORE_KEYS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def bench_blind(cache_dir: str = paths.CACHE_DIR, cfg: TrainConfig | None = None, ecfg: EvaluateConfig | None = None,
                log=print) -> dict:
    """Train with and without the images (same settings, same seed), evaluate both on `ecfg.split`.

    Returns both score dicts and the CIDEr ratio seeing/blind.
    """
    from pipeline.evaluate.evaluate import evaluate
    from pipeline.train.train import train

    cfg, ecfg = cfg or TrainConfig(), ecfg or EvaluateConfig()
    split = ecfg.split
    scores = {}
    with tempfile.TemporaryDirectory(prefix="bench-blind-") as tmp:
        for name, blind in (("seeing", False), ("blind", True)):
            t0 = time.perf_counter()
            run = train(cache_dir, out=Path(tmp, name), metrics_dir=Path(tmp, name, "metrics"),
                        cfg=replace(cfg, blind=blind), progress=False, log=lambda m: None)
            ev = evaluate(Path(tmp, name, "best.pt"), cache_dir, ecfg, out=Path(tmp, name, "eval.json"),
                          results=Path(tmp, name, "captions.json"))
            scores[name] = ev.scores
            log(f"  {name:<7} trained {run.epochs_run} epochs (best {run.best_epoch}), {time.perf_counter() - t0:.0f} s: "
                + "  ".join(f"{k} {ev.scores[k]:.3f}" for k in SCORE_KEYS if k in ev.scores))
    blind_cider = scores["blind"]["CIDEr"]
    ratio = scores["seeing"]["CIDEr"] / blind_cider if blind_cider > 0 else float("inf")
    log(f"  {split} CIDEr seeing / blind:     {ratio:.2f}x")
    return {"split": split, "seeing": scores["seeing"], "blind": scores["blind"], "cider_ratio": ratio}
