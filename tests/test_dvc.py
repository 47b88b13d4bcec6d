"""dvc.yaml on a copy of the project: `dvc repro` reruns exactly the stages whose inputs changed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from layout import stage_closures

from pipeline.acquire.demo_data import make_demo_data
from pipeline.bench.demo import demo_report, markdown
from pipeline.decoder.attributes import NAMES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def dvc(proj: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def set_param(proj: Path, section: str, key: str, value) -> None:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p[section][key] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.skipif(not (BIN / "dvc").exists(), reason="dvc is not installed in this environment")
def test_repro_reruns_only_what_changed(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "results/.gitignore"):
        (proj / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, proj / name)
    shutil.copytree(REPO / ".dvc", proj / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copytree(REPO / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    make_demo_data(proj / "data" / "demo", n_train=16, n_val=4, n_test=4, image_size=32)
    for section, key, value in [("prepare", "vocab_threshold", 1), ("extract", "resize", 40), ("extract", "crop", 32),
                                ("extract", "batch_size", 8), ("train", "embed_size", 16), ("train", "hidden_size", 16),
                                ("train", "epochs", 1), ("train", "batch_size", 16), ("scst", "epochs", 1),
                                ("scst", "batch_size", 8), ("evaluate", "beam_size", 1)]:
        set_param(proj, section, key, value)

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], cwd=proj, check=True)
    assert ran(dvc(proj, "repro")) == {"prepare", "extract", "train", "scst", "evaluate", "evaluate_xe"}
    # a run leaves git alone: nothing staged (dvc's autostage), no tracked file changed (results/.gitignore)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=proj, capture_output=True, text=True).stdout
    assert sorted(status.splitlines()) == ["?? dvc.lock", "?? metrics/"], status
    assert ran(dvc(proj, "repro")) == set()  # nothing changed: nothing reruns
    assert "up to date" in dvc(proj, "status").lower()

    set_param(proj, "train", "lr", 0.005)
    status = dvc(proj, "status")
    assert "train:" in status and "prepare:" not in status and "extract:" not in status
    assert ran(dvc(proj, "repro")) == {"train", "scst", "evaluate", "evaluate_xe"}

    set_param(proj, "train", "hidden_size", 24)
    assert ran(dvc(proj, "repro")) == {"train", "scst", "evaluate", "evaluate_xe"}

    set_param(proj, "scst", "lr", 0.0023)  # SCST settings rerun SCST and the final evaluation only
    assert ran(dvc(proj, "repro")) == {"scst", "evaluate"}

    # touching a module makes exactly the stages that import it stale (dvc status), and nothing else
    closures = stage_closures()
    for module in sorted(p.relative_to(proj).as_posix() for p in (proj / "pipeline").rglob("*.py")):
        original = (proj / module).read_bytes()
        (proj / module).write_bytes(original + b"\n# touched\n")
        try:
            stale = set(re.findall(r"^(\w+):", dvc(proj, "status"), flags=re.M))
        finally:
            (proj / module).write_bytes(original)
        assert stale == {s for s, files in closures.items() if module in files}, module
    assert "up to date" in dvc(proj, "status").lower()

    set_param(proj, "extract", "arch", "resnet34")
    assert ran(dvc(proj, "repro")) == {"extract", "train", "scst", "evaluate", "evaluate_xe"}

    shown = dvc(proj, "metrics", "show")
    for path in ("metrics/eval.json", "metrics/eval_xe.json", "metrics/train/train.json", "metrics/scst/scst.json"):
        assert path in shown, shown
    assert "CIDEr" in shown
    for name in ("eval.json", "eval_xe.json"):  # evaluate knows the demo's pictures: their attributes are scored
        acc = json.loads((proj / "metrics" / name).read_text())["attributes"]
        assert acc["images"] == 4 and set(acc["right"]) == set(acc["wrong"]) == set(NAMES), acc
    table = markdown(demo_report(proj))
    assert "| cross-entropy | " in table and "| after SCST | " in table and "CPU cores" in table, table
    plots = dvc(proj, "plots", "show")  # it warned "argument of type 'nonetype' is not iterable" on scst_epochs.json
    assert "WARNING" not in plots and "index.html" in plots, plots
