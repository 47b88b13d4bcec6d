"""`pipeline bench demo`: the README's demo table, from the metrics `make demo` (dvc repro) wrote, with the
conditions it ran under, so the README's figures come from one command and can be checked against a new run.

Besides the caption scores it shows how often the test captions state each of the picture's attributes
rightly (pipeline.decoder.attributes): SCST raised CIDEr once while it made most captions say "on the right"."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import read_json
from pipeline.decoder.attributes import NAMES

# (row, its evaluate metrics, its training summary, the training seconds key there)
ROWS = (("cross-entropy", "metrics/eval_xe.json", f"{paths.XE_METRICS}/train.json", "train_seconds"),
        ("after SCST", paths.EVAL_METRICS, f"{paths.SCST_METRICS}/scst.json", "scst_seconds"))
SCORES = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")


def _read(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read it ({e}): run `make demo` first") from None


def demo_report(root: str | os.PathLike = ".") -> dict:
    """{"rows": {row: {scores..., "attributes", "seconds", "checkpoint_epoch"}}, "conditions": str}."""
    rows = {}
    for name, metrics, log, key in ROWS:
        ev, run = _read(Path(root) / metrics), _read(Path(root) / log)
        if "attributes" not in ev:
            raise PipelineError(f"{metrics} holds no attribute accuracy: it was not scored on the demo's pictures "
                                f"(data/demo from `pipeline demo-data`); run `make demo`")
        rows[name] = {**{k: ev.get(k) for k in SCORES}, "attributes": ev["attributes"], "seconds": run.get(key),
                      "best_epoch": run.get("best_epoch"), "images": ev.get("images")}
    return {"rows": rows, "conditions": conditions()}


def conditions() -> str:
    """The machine, how busy it was (load averages when this runs, just after the stages), and the versions."""
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores ({platform.machine()}), load average "
            f"{load} (1/5/15 min) at the end, torch {version('torch')}, Python {platform.python_version()}")


def markdown(report: dict) -> str:
    """The README's table: one row per decoder, scores, attributes right/wrong, training time."""
    head = ["decoder", *SCORES, *(f"{n} right/wrong" for n in NAMES), "all right", "all five", "training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["rows"].items():
        a = r["attributes"]
        cells = [name, *(f"{r[k]:.3f}" if r[k] is not None else "-" for k in SCORES),
                 *(f"{a['right'][n]:.2f}/{a['wrong'][n]:.2f}" for n in NAMES), f"{a['all_right']:.2f}",
                 f"{a['all_five']:.2f}", f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    images = next(iter(report["rows"].values()))["images"]
    return "\n".join(lines + [f"(test split, {images} images, beam 3; {report['conditions']})"])
