"""A run's step CSV (one row per optimizer step), read back on resume and rewritten at every save."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.core.fileio import write_text


def read_steps(path: Path) -> list[dict]:
    """A steps CSV (train's or scst's) back as rows: step and epoch ints, every other column a float."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k in ("step", "epoch") else float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_steps(path: Path, rows: list[dict], formats: dict[str, str]) -> None:
    """One row per optimizer step: step, epoch, then the `formats` columns, each written with its format."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "epoch", *formats], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, **{k: format(r[k], spec) for k, spec in formats.items()}})
    write_text(path, buf.getvalue())
