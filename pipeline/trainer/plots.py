"""Training curves as PNGs: train's loss per step and validation scores per epoch; scst's reward and
baseline per step and validation CIDEr per epoch.

Why a PNG beside DVC's own plots: `dvc plots show` writes an HTML page that loads Vega from a CDN, so
offline it renders nothing. This picture opens anywhere, and dvc.yaml declares it as an image plot,
so `dvc plots show` and `dvc plots diff` embed it too.

Uses matplotlib's object API (`Figure`, no pyplot): no display, no global state, safe in any process.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.fileio import atomic_path

SCORES = ("CIDEr", "BLEU-4")


def plot_training(steps: list[dict], epochs: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Write the curves of one training run to `out` (PNG, atomically) and return its path.

    steps:  [{"step", "loss", ...}]   one per optimizer step (train_steps.csv)
    epochs: [{"epoch", "step", "val_loss", "CIDEr", "BLEU-4", ...}]   one per epoch (train_epochs.json)
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)

    if steps:
        x = [r["step"] for r in steps]
        y = [r["loss"] for r in steps]
        loss_ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        loss_ax.plot(x, _moving_average(y, max(1, len(y) // 50)), color="tab:blue", label="train (smoothed)")
    val = [(r["step"], r["val_loss"]) for r in epochs if "val_loss" in r]
    if val:
        loss_ax.plot(*zip(*val), "o-", color="tab:orange", label="validation (per epoch)")
    loss_ax.set(xlabel="step", ylabel="cross-entropy per word", title="loss", yscale="log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.6, 2 rather than 6x10^-1, 2x10^0 on the log axis
    loss_ax.yaxis.set_major_formatter(plain)
    loss_ax.yaxis.set_minor_formatter(plain)
    loss_ax.grid(alpha=0.3)
    if steps or val:
        loss_ax.legend()

    for key, colour in zip(SCORES, ("tab:green", "tab:purple")):
        pts = [(r["epoch"], r[key]) for r in epochs if key in r]
        if pts:
            score_ax.plot(*zip(*pts), "o-", color=colour, label=key)
    best = max((r for r in epochs if "CIDEr" in r), key=lambda r: r["CIDEr"], default=None)
    if best is not None:
        score_ax.axvline(best["epoch"], color="gray", linestyle="--", linewidth=1,
                         label=f"best: epoch {best['epoch']}, CIDEr {best['CIDEr']:.3f}")
    score_ax.set(xlabel="epoch", ylabel="score (BLEU 0-1, CIDEr 0-10)",
                 title="validation, greedy decoding")
    score_ax.grid(alpha=0.3)
    if epochs:
        score_ax.legend()
        score_ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out, title)


def plot_scst(steps: list[dict], epochs: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Reward, baseline and sampled length per step (left); validation CIDEr per epoch (right).

    steps:  [{"step", "reward", "baseline", "length", ...}]   (scst_steps.csv)
    epochs: [{"epoch", "CIDEr", ...}], epoch 0 = the cross-entropy checkpoint   (scst_epochs.json)
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if steps:
        x = [r["step"] for r in steps]
        left.plot(x, [r["reward"] for r in steps], color="tab:green", label="mean reward (CIDEr-D)")
        left.plot(x, [r["baseline"] for r in steps], color="tab:gray", linestyle="--", label="mean baseline (loo: equals the mean reward)")
        length_ax = left.twinx()
        length_ax.plot(x, [r["length"] for r in steps], color="tab:orange", alpha=0.5, label="sampled length")
        length_ax.set_ylabel("tokens per sample")
        length_ax.legend(loc="lower right")
        left.legend(loc="upper left")
    left.set(xlabel="step", ylabel="CIDEr-D of the samples", title="training samples")
    left.grid(alpha=0.3)
    pts = [(r["epoch"], r["CIDEr"]) for r in epochs if "CIDEr" in r]
    if pts:
        right.plot(*zip(*pts), "o-", color="tab:purple", label="validation CIDEr (greedy)")
        right.axhline(pts[0][1], color="gray", linestyle=":", label=f"cross-entropy start {pts[0][1]:.3f}")
        right.legend()
        right.xaxis.get_major_locator().set_params(integer=True)
    right.set(xlabel="epoch (0: cross-entropy checkpoint)", ylabel="CIDEr (0-10)", title="validation")
    right.grid(alpha=0.3)
    return _save(fig, out, title)


def _save(fig, out: str | os.PathLike, title: str) -> Path:
    """`fig` with its `title` as a PNG at `out`, written atomically."""
    if title:
        fig.suptitle(title)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), same length as `values`."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
