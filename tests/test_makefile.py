"""The Makefile's recipes as a new user meets them, in a fresh git project with a stand-in `pipeline`: `make
blind` after `dvc exp run -S ...` still benchmarks the committed params.yaml, and `make bench` in a clone
without the demo says what to run instead of failing on a missing ../shared folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# echoes its arguments and the params file it was given
FAKE_PIPELINE = """#!/bin/sh
echo "pipeline $*"
while [ $# -gt 0 ]; do [ "$1" = --params ] && cat "$2"; shift; done
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    if not shutil.which("make") or not shutil.which("git"):
        pytest.skip("needs make and git")
    for name in ("Makefile", "params.yaml", "setup.cfg", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=tmp_path, check=True)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pipeline").write_text(FAKE_PIPELINE)
    (bin_dir / "pipeline").chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # newer than setup.cfg: `make venv` has nothing to do
    return tmp_path


def make(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "-s", *args], cwd=project, capture_output=True, text=True, env=env, timeout=60)


def test_blind_benchmarks_the_committed_params(project):
    r = make(project, "blind")
    assert r.returncode == 0, r.stderr
    assert "bench blind --cache-dir cache" in r.stdout and "note:" not in r.stdout
    committed_lr = yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.123  # what `dvc exp run -S train.lr=0.123` leaves behind
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = make(project, "blind")
    assert r.returncode == 0, r.stderr
    assert "params.yaml differs from the last commit" in r.stdout
    assert f"lr: {committed_lr}" in r.stdout and "lr: 0.123" not in r.stdout
    r = make(project, "blind", "BLIND_PARAMS=params.yaml")
    assert "lr: 0.123" in r.stdout


def test_bench_without_the_demo_says_what_to_run(project):
    r = make(project, "bench")
    assert r.returncode != 0 and "run make demo first" in r.stdout + r.stderr
    (project / "data" / "demo" / "train").mkdir(parents=True)
    (project / "cache").mkdir()
    (project / "cache" / "features.h5").touch()
    r = make(project, "bench")
    assert r.returncode == 0, r.stderr
    assert "bench extract --arch resnet18 --weights none --images data/demo/train" in r.stdout


def test_exp_show_keeps_the_changed_settings_and_the_scores(project):
    """`make exp-show` passes a Markdown table request and a column list that, matched as dvc matches it (from the
    name's start), keeps the settings and test scores and drops the ~150 other columns of a demo run."""
    import re

    fake_dvc = project / ".venv" / "bin" / "dvc"
    fake_dvc.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake_dvc.chmod(0o755)
    r = subprocess.run(["make", "-s", "exp-show"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = r.stdout.splitlines()
    assert args[:4] == ["exp", "show", "--no-pager", "--md"] and args[4:6] == ["--drop", ".*"]
    keep = re.compile(args[args.index("--keep") + 1])
    wanted = ["Experiment", "Created", "train.lr", "train.epochs", "train.hidden_size", "scst.lr", "extract.arch",
              "metrics/eval.json:CIDEr", "metrics/eval.json:BLEU-4", "metrics/eval_xe.json:attributes.all_right"]
    others = ["metrics/train/train.json:CIDEr", "metrics/scst/scst.json:BLEU-4", "all_right", "train.seed",
              "metrics/eval.json:METEOR", "metrics/eval.json:attributes.right.colour", "extract.batch_size", "State"]
    assert all(keep.match(c) for c in wanted), [c for c in wanted if not keep.match(c)]
    assert not any(keep.match(c) for c in others), [c for c in others if keep.match(c)]
