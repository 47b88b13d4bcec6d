"""Many processes under torchrun (gloo on the CPU): extraction equal to one process byte for byte, a
killed rank's work completed by rerunning the command, DDP training matching one process.

Each run is a real `torchrun --standalone --nproc_per_node 2` subprocess (a free port is picked by the
rendezvous itself), bounded by a timeout so a deadlock fails the test instead of hanging it.
One-process references run as subprocesses too, with the same OMP_NUM_THREADS=1, so that the CPU
kernels sum in the same order and byte equality is a fair demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_extract as extract

pytestmark = pytest.mark.slow

TIMEOUT = 240
EXTRACT = ["extract", "--arch", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--workers", "0",
           "--batch-size", "4", "--quiet"]
TRAIN = ["train", "--batch-size", "8", "--lr", "0.005", "--embed-size", "32", "--hidden-size", "48", "--quiet",
         "--device", "cpu", "--patience", "1", "--lr-decay", "0.000001"]  # lr ~0 from epoch 2: CIDEr stalls, early stop

# Runs the real CLI; logs "rank k" for every part written and, when KILL_RANK names this rank,
# SIGKILLs the process right after its first part is durable (as a crash or an OOM kill would).
WRAPPER = """
import os, signal, sys
from pipeline.cli import main
from pipeline.extract.parts import Parts
original = Parts.write_part
def write_part(self, k, *args):
    original(self, k, *args)
    with open(os.environ["PARTS_LOG"], "a") as f:
        f.write(f"{os.environ['RANK']} {k}\\n")
    if os.environ.get("KILL_RANK") == os.environ["RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)
Parts.write_part = write_part
main(sys.argv[1:], prog_name="pipeline")
"""


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KILL_RANK"):
        if key not in extra:
            e.pop(key, None)
    return e


def one(args, cwd: Path, **extra) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in one plain process."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=TIMEOUT)


def two(args, cwd: Path, script: Path | None = None, **extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m pipeline ARGS` (or SCRIPT ARGS)."""
    target = [str(script)] if script else ["-m", "pipeline"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_cache(a: Path, b: Path) -> None:
    """Row for row: every dataset and every attribute."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert sorted(fa) == sorted(fb)
        for key in fa:
            assert fa[key].dtype == fb[key].dtype and np.array_equal(fa[key][:], fb[key][:]), key
        assert dict(fa.attrs) == dict(fb.attrs)


def computed_now(stdout: str) -> int:
    return int(re.search(r"\((\d+) computed now\)", stdout).group(1))


def test_two_process_extract_equals_one_process(prepared_cache):
    cwd = prepared_cache
    ok(one([*EXTRACT, "--cache-dir", ".", "--chunk-size", "4", "--out", "ref.h5"], cwd))
    out = ok(two([*EXTRACT, "--cache-dir", ".", "--chunk-size", "4"], cwd))  # 5 chunks: 3 to rank 0, 2 to rank 1
    assert out.count("extracted ") == 1 and computed_now(out) == 18  # summed over the ranks, printed once
    assert sha(cwd / "features.h5") == sha(cwd / "ref.h5")  # byte for byte
    assert_same_cache(cwd / "features.h5", cwd / "ref.h5")
    assert not (cwd / "features.h5.parts").exists()

    # up to date: every rank learns it from rank 0, nobody waits at a barrier, exit 0
    before = os.stat(cwd / "features.h5").st_mtime_ns
    out = ok(two([*EXTRACT, "--cache-dir", ".", "--chunk-size", "4"], cwd))
    assert out.count("up to date") == 1 and os.stat(cwd / "features.h5").st_mtime_ns == before

    # other settings: refused on every rank alike (no deadlock), non-zero exit, cache untouched
    bad = two([*EXTRACT[:2], "resnet34", *EXTRACT[3:], "--cache-dir", ".", "--chunk-size", "4"], cwd)
    assert bad.returncode != 0 and "other settings" in bad.stdout + bad.stderr and "--force" in bad.stdout + bad.stderr
    assert os.stat(cwd / "features.h5").st_mtime_ns == before

    # one chunk for two ranks: rank 1 has nothing to do and still takes part in every collective
    ok(two([*EXTRACT, "--cache-dir", ".", "--chunk-size", "64", "--out", "single.h5"], cwd))
    # Same rows and attributes; bytes may differ from the 4-row-chunk file because HDF5 lays out the
    # `errors` strings by how many writes filled them, which a single process does as well.
    assert_same_cache(cwd / "single.h5", cwd / "ref.h5")


def test_killed_rank_is_completed_by_rerunning_the_command(prepared_cache, tmp_path):
    cwd = prepared_cache
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    args = [*EXTRACT, "--cache-dir", ".", "--chunk-size", "2"]  # 9 chunks: 0,2,4,6,8 to rank 0; 1,3,5,7 to rank 1
    ok(one([*EXTRACT, "--cache-dir", ".", "--chunk-size", "2", "--out", "ref.h5"], cwd))

    first_log, rerun_log = tmp_path / "first.log", tmp_path / "rerun.log"
    crashed = two(args, cwd, script, PARTS_LOG=str(first_log), KILL_RANK="1")
    assert crashed.returncode != 0  # torchrun stops the group when a rank dies
    parts = cwd / "features.h5.parts"
    done = {int(p.stem.split("-")[1]) for p in parts.glob("part-*.npz")}
    assert 1 in done and len(done) < 9 and not (cwd / "features.h5").exists()

    out = ok(two(args, cwd, script, PARTS_LOG=str(rerun_log)))  # the same command again
    redone = [int(line.split()[1]) for line in rerun_log.read_text().splitlines()]
    assert sorted(redone) == sorted(set(range(9)) - done)  # every missing chunk once, no finished one again
    assert {line.split()[0] for line in rerun_log.read_text().splitlines()} == ({"0", "1"} if len(redone) > 1 else {"0"})
    assert computed_now(out) == 18 - 2 * len(done)
    assert sha(cwd / "features.h5") == sha(cwd / "ref.h5")
    assert not parts.exists()  # joined, then removed


@pytest.fixture
def cache(prepared_cache: Path) -> Path:
    extract(prepared_cache, arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)
    return prepared_cache


def test_two_process_training_matches_one_process_and_resumes(cache):
    cwd = cache
    base = [*TRAIN, "--cache-dir", ".", "--epochs", "4"]
    r1 = one([*base, "--out", "one/ckpt", "--metrics-dir", "one/m"], cwd)
    r2 = two([*base, "--out", "two/ckpt", "--metrics-dir", "two/m"], cwd)
    out = ok(r2)
    assert out.count("trained ") == 1 and r2.stderr.count("epoch 1: train_loss") == 1  # rank 0 alone reports
    ok(r1)
    # one set of outputs
    assert sorted(p.name for p in (cwd / "two" / "ckpt").iterdir()) == ["best.pt", "last.pt"]
    assert sorted(p.name for p in (cwd / "two" / "m").iterdir()) == ["train.json", "train.png", "train_epochs.json", "train_steps.csv"]

    e1 = json.loads((cwd / "one" / "m" / "train_epochs.json").read_text())
    e2 = json.loads((cwd / "two" / "m" / "train_epochs.json").read_text())
    # early stopping after epoch 2 (lr ~0, CIDEr flat): rank 1 followed rank 0's decision and exited
    assert len(e1) == len(e2) == 2
    # Same global batches, token-weighted gradients and logged loss: only float rounding differs
    # (measured: 6e-9 relative on the first epoch's mean loss, 6e-7 on any weight).
    assert e2[0]["train_loss"] == pytest.approx(e1[0]["train_loss"], rel=1e-5)
    s1 = (cwd / "one" / "m" / "train_steps.csv").read_text().splitlines()
    s2 = (cwd / "two" / "m" / "train_steps.csv").read_text().splitlines()
    assert len(s1) == len(s2) == 13
    for a, b in zip(s1[1:], s2[1:]):
        assert a.split(",")[:2] == b.split(",")[:2] and float(a.split(",")[2]) == pytest.approx(float(b.split(",")[2]), abs=1e-4)
    w1 = torch.load(cwd / "one" / "ckpt" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(cwd / "two" / "ckpt" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1)

    # --resume under two ranks: one epoch, then the rest from last.pt ends exactly where the straight run did
    ok(two([*TRAIN, "--cache-dir", ".", "--epochs", "1", "--out", "res/ckpt", "--metrics-dir", "res/m"], cwd))
    resumed = two([*base, "--resume", "--out", "res/ckpt", "--metrics-dir", "res/m"], cwd)
    assert "resuming from" in resumed.stderr and ok(resumed).count("trained ") == 1
    assert (cwd / "res" / "m" / "train_steps.csv").read_text() == (cwd / "two" / "m" / "train_steps.csv").read_text()
    w3 = torch.load(cwd / "res" / "ckpt" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


def test_two_process_scst_matches_one_process_and_resumes(cache):
    """SCST under torchrun: each rank samples its images' captions from the batch's own numbers, so two
    ranks draw what one process draws; token-weighted gradients summed over ranks give the same steps."""
    cwd = cache
    ok(one([*TRAIN, "--cache-dir", ".", "--epochs", "1", "--out", "xe", "--metrics-dir", "xe_m"], cwd))
    scst = ["scst", "--cache-dir", ".", "--init", "xe/best.pt", "--batch-size", "4", "--samples", "3",
            "--max-length", "8", "--lr", "0.001", "--device", "cpu", "--quiet"]
    ok(one([*scst, "--epochs", "2", "--out", "one", "--metrics-dir", "one_m"], cwd))
    r2 = two([*scst, "--epochs", "2", "--out", "two", "--metrics-dir", "two_m"], cwd)
    assert ok(r2).count("scst: 2 epoch(s)") == 1 and r2.stderr.count("scst epoch 1:") == 1  # rank 0 alone reports
    s1 = (cwd / "one_m" / "scst_steps.csv").read_text().splitlines()
    s2 = (cwd / "two_m" / "scst_steps.csv").read_text().splitlines()
    assert len(s1) == len(s2) == 1 + 2 * 3  # 12 training images, 4 a step, 2 epochs
    for a, b in zip(s1[1:], s2[1:]):  # step, epoch, then reward, baseline, length, loss
        assert a.split(",")[:2] == b.split(",")[:2]
        assert [float(x) for x in a.split(",")[2:5]] == pytest.approx([float(x) for x in b.split(",")[2:5]], abs=1e-4)
    w1 = torch.load(cwd / "one" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(cwd / "two" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-4) for k in w1)

    ok(two([*scst, "--epochs", "1", "--out", "res", "--metrics-dir", "res_m"], cwd))
    resumed = two([*scst, "--epochs", "2", "--resume", "--out", "res", "--metrics-dir", "res_m"], cwd)
    assert "resuming SCST from" in resumed.stderr and ok(resumed).count("scst: 2 epoch(s)") == 1
    w3 = torch.load(cwd / "res" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
