"""Rank 0's checks of a training run's output folders before any work, the same for train and scst."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pipeline.core.locks import hold_all
from pipeline.core.storage import check_free_space, ensure_writable, human_bytes, remove_stale_temps

CHECKPOINT_NAMES = ("last.pt", "best.pt")


def claim_outputs(locks: contextlib.ExitStack, out: Path, metrics_dir: Path, log_names) -> None:
    """Lock OUT and METRICS (a second run into either is refused at once), prove both writable, drop temp
    files a killed run left (of the checkpoints and of `log_names`, the stage's METRICS files)."""
    hold_all(locks, [(out, "--out"), (metrics_dir, "--metrics-dir")])
    ensure_writable(out, "--out")
    ensure_writable(metrics_dir, "--metrics-dir")
    remove_stale_temps(out, list(CHECKPOINT_NAMES))
    remove_stale_temps(metrics_dir, list(log_names))


def check_room(model: torch.nn.Module, out: Path) -> None:
    """Refuse a run whose checkpoints cannot fit on OUT's disk. At the worst moment OUT holds best.pt,
    last.pt and the temp file replacing one of them; each holds the weights and Adam's two moments."""
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = 3 * params + 65536  # + vocabulary, settings, RNG state
    have = sum((out / n).stat().st_size for n in CHECKPOINT_NAMES if (out / n).exists())
    check_free_space(out, 3 * size - have, f"checkpoints need about {human_bytes(size)} each (best.pt, last.pt "
                     f"and a temp file while one is replaced)", "free space, or pass --out on a larger disk")
