"""Failures a user or the machine causes end in one `Error:` line, keep finished work and leave nothing behind.

Full and read-only disks are real ones: small tmpfs mounts (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_extract
from PIL import Image

from pipeline.cli import main
from pipeline.core.manifest import load_manifest

EX = ["--arch", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--batch-size", "4",
      "--workers", "0", "--quiet"]
SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", readonly: bool = False):
    """A fresh tmpfs of `size` at `path` (read-only with `readonly`), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs ({e})")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill `folder`'s file system until about `leave` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler.bin", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def cli(*args: str):
    """Run `pipeline ARGS` in-process; returns click's Result (exit_code, output)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_error_line(result) -> str:
    """The single `Error:` line of a failed command; fails if a traceback or several error lines came out."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def copy_cache(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "vocab.json", "labels.h5"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ----------------------------------------------------------------------------- 1. disk full during extract
def test_extract_on_a_full_disk_is_refused_before_any_work(prepared_cache, tmp_path):
    with tmpfs(tmp_path / "small", "1m") as small:
        cache = copy_cache(prepared_cache, small / "cache")
        fill(small, 8 * 1024)
        line = one_error_line(cli("extract", "--cache-dir", cache, *EX))
        assert "not enough free space" in line and "18 x 512 x 2 bytes" in line, line
        assert not (cache / "features.h5.parts").exists() and not (cache / "features.h5").exists()


def test_disk_filling_up_during_extract_keeps_finished_parts(prepared_cache, tmp_path, monkeypatch):
    import pipeline.extract.parts as parts

    monkeypatch.setattr(parts, "_check_space", lambda *a: None)  # the disk fills up after the check
    with tmpfs(tmp_path / "small", "1m") as small:
        cache = copy_cache(prepared_cache, small / "cache")
        fill(small, 40 * 1024)  # room for the first parts (5 rows x 512 x 4 bytes + overhead), not for all
        line = one_error_line(cli("extract", "--cache-dir", cache, *EX, "--chunk-size", "5", "--dtype", "float32"))
        assert "the disk is full" in line and "18 x 512 x 4 bytes" in line and "finished parts are kept" in line, line
        parts = sorted(p.name for p in (cache / "features.h5.parts").glob("part-*.npz"))
        assert parts and parts[0] == "part-000000.npz"
        assert not list(cache.glob(".*.tmp")) and not list((cache / "features.h5.parts").glob(".*.tmp"))
        (small / "filler.bin").unlink()
        assert cli("extract", "--cache-dir", cache, *EX, "--chunk-size", "5", "--dtype", "float32").exit_code == 0
        assert (cache / "features.h5").exists() and not (cache / "features.h5.parts").exists()


# ----------------------------------------------------------------------------- 3. absurd aspect ratios
def test_thin_images_are_bad_images_not_gigabytes(tmp_path):
    from pipeline.encoder.images import Preprocess

    Image.new("RGB", (1, 20000), (255, 0, 0)).save(tmp_path / "strip.png")
    Image.new("RGB", (100000, 1), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (400, 100), (255, 0, 0)).save(tmp_path / "panorama.png")
    for name in ("strip.png", "wide.png"):
        image, reason = Preprocess(resize=256, crop=224)(str(tmp_path / name))
        assert "aspect ratio" in reason and image.shape == (3, 224, 224) and not image.any()
    image, reason = Preprocess(resize=256, crop=224)(str(tmp_path / "panorama.png"))
    assert reason == "" and image.any()


# ----------------------------------------------------------------------------- 4. weights of another arch
def test_weights_of_another_arch_name_it_and_leave_nothing(prepared_cache, tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    args = ["--cache-dir", prepared_cache, *EX]
    line = one_error_line(cli("extract", *[a if a != "none" else str(tmp_path / "r50.pt") for a in args]))
    assert "does not fit resnet18" in line and "--arch resnet50" in line, line
    assert not (prepared_cache / "features.h5.parts").exists()
    assert cli("extract", *args).exit_code == 0  # the corrected rerun is not refused


# ----------------------------------------------------------------------------- 2. train's outputs
TRAIN = ["--epochs", "1", "--batch-size", "8", "--embed-size", "32", "--hidden-size", "48", "--device", "cpu",
         "--val-images", "2", "--quiet"]


@pytest.fixture
def cache(prepared_cache):
    run_extract(prepared_cache, **SMALL)
    return prepared_cache


def test_train_checks_its_outputs_before_the_first_epoch(cache, tmp_path):
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, 16 * 1024)
        line = one_error_line(cli("train", "--cache-dir", cache, "--out", full / "ckpt", "--metrics-dir",
                                  tmp_path / "m", *TRAIN))
        assert "not enough free space" in line and "checkpoints need about" in line, line
        assert not (tmp_path / "m" / "train_steps.csv").exists()  # refused before any training
        assert not list((full / "ckpt").glob("*.tmp")) and not list((full / "ckpt").glob(".*.tmp"))
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        line = one_error_line(cli("train", "--cache-dir", cache, "--out", ro / "ckpt", "--metrics-dir",
                                  tmp_path / "m", *TRAIN))
        assert "read-only" in line and "--out" in line, line


def test_a_save_that_fails_later_keeps_the_last_good_checkpoint(cache, tmp_path, monkeypatch):
    import pipeline.train.train as tr
    import pipeline.trainer.outputs as outputs

    with tmpfs(tmp_path / "small", "4m") as small:
        out, metrics = small / "ckpt", tmp_path / "m"
        assert cli("train", "--cache-dir", cache, "--out", out, "--metrics-dir", metrics, *TRAIN).exit_code == 0
        good = (out / "last.pt").read_bytes()
        monkeypatch.setattr(tr, "check_room", lambda model, out: None)  # the disk fills up after the checks
        monkeypatch.setattr(outputs, "ensure_writable", lambda folder, what: None)
        fill(small, 4096)
        args = ["--epochs", "2", *TRAIN[2:]]
        line = one_error_line(cli("train", "--cache-dir", cache, "--out", out, "--metrics-dir", metrics, *args,
                                  "--resume"))
        assert "the disk is full" in line and f"{out / 'last.pt'} is kept" in line and "--resume" in line, line
        assert (out / "last.pt").read_bytes() == good
        assert not list(out.glob(".*.tmp"))
        (small / "filler.bin").unlink()
        assert cli("train", "--cache-dir", cache, "--out", out, "--metrics-dir", metrics, *args, "--resume").exit_code == 0
        assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


# ----------------------------------------------------------------------------- 5. two runs, one output
HOLDER = """
import sys, time
from pipeline.core.locks import hold
with hold(sys.argv[1], "--out"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_is_refused_at_once_and_a_killed_holder_blocks_nothing(cache, tmp_path):
    out = cache / "other.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = one_error_line(cli("extract", "--cache-dir", cache, "--out", out, *EX))
        assert f"{out} is in use by another run (pid {holder.pid} on host" in line, line
        assert not (cache / "other.h5.parts").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli("extract", "--cache-dir", cache, "--out", out, *EX).exit_code == 0  # the dead run's lock is gone

    ckpt = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = one_error_line(cli("train", "--cache-dir", cache, "--out", ckpt, "--metrics-dir", tmp_path / "m",
                                  *TRAIN))
        assert f"in use by another run (pid {holder.pid} on host" in line, line
        assert not (tmp_path / "m" / "train_steps.csv").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_scst_claims_its_outputs_as_train_does(cache, tmp_path):
    """scst locks OUT and METRICS, checks room for its checkpoints and removes a killed run's temp files
    before any work, with train's code (it did none of this before)."""
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "xe", "--metrics-dir", tmp_path / "mx",
               *TRAIN).exit_code == 0
    metrics, out = tmp_path / "ms", tmp_path / "scst"
    args = ["scst", "--cache-dir", cache, "--init", tmp_path / "xe" / "best.pt", "--metrics-dir", metrics,
            "--epochs", "1", "--batch-size", "6", "--samples", "2", "--max-length", "8", "--device", "cpu", "--quiet"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = one_error_line(cli(*args, "--out", out))
        assert f"{out} is in use by another run (pid {holder.pid} on host" in line, line
        assert not (metrics / "scst_steps.csv").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, 16 * 1024)
        line = one_error_line(cli(*args, "--out", full / "scst"))
        assert "not enough free space" in line and "checkpoints need about" in line, line
    stale = [out / ".last.pt.x1y2.tmp", metrics / ".scst_steps.csv.q.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    assert cli(*args, "--out", out).exit_code == 0
    assert [p for p in stale if p.exists()] == [] and (out / "best.pt").exists()


# ----------------------------------------------------------------------------- 6. read-only and full targets
def test_read_only_targets_and_a_full_disk_for_html(cache, coco_dataset, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        line = one_error_line(cli("prepare", "--dataset", "coco", "--annotations", coco_dataset["annotations"][0],
                                  "--annotations", coco_dataset["annotations"][1], "--images", coco_dataset["root"],
                                  "--out-dir", ro / "cache"))
        assert "read-only" in line and "--out-dir" in line, line
        line = one_error_line(cli("prepare", "--dataset", "coco", "--annotations", coco_dataset["annotations"][0],
                                  "--annotations", coco_dataset["annotations"][1], "--images", coco_dataset["root"],
                                  "--out-dir", ro))
        assert "read-only" in line, line
    with tmpfs(tmp_path / "rocache", "1m") as rocache:
        copy_cache(cache, rocache)
        subprocess.run(["mount", "-o", "remount,ro", str(rocache)], check=True)
        line = one_error_line(cli("extract", "--cache-dir", rocache, *EX))
        assert "read-only" in line and "--out" in line, line
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "ckpt", "--metrics-dir", tmp_path / "m",
               *TRAIN).exit_code == 0
    image = next(Path(coco_dataset["images"][0]).glob("*.jpg"))
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, 0)
        line = one_error_line(cli("caption", image, "--checkpoint", tmp_path / "ckpt" / "last.pt", "--device", "cpu",
                                  "--html", full / "page.html"))
        assert "the disk is full" in line and "--html" in line, line
        assert not list(full.glob(".*.tmp"))


# ----------------------------------------------------------------------------- 7. --device gpu
def test_a_device_typo_is_one_line_on_every_command(cache, tmp_path):
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "ckpt", "--metrics-dir", tmp_path / "m",
               *TRAIN).exit_code == 0
    ckpt = tmp_path / "ckpt" / "last.pt"
    image = next(Path(load_manifest(cache).image_dirs[0]).glob("*.jpg"))
    commands = {
        "extract": ["extract", "--cache-dir", cache, "--out", tmp_path / "f.h5", *EX],
        "train": ["train", "--cache-dir", cache, "--out", tmp_path / "c2", "--metrics-dir", tmp_path / "m2", *TRAIN],
        "evaluate": ["evaluate", "--checkpoint", ckpt, "--cache-dir", cache, "--out", tmp_path / "eval.json"],
        "caption": ["caption", image, "--checkpoint", ckpt],
    }
    for name, args in commands.items():
        line = one_error_line(cli(*args, "--device", "gpu"))
        assert line == "Error: --device 'gpu' is not a device: use auto, cpu, cuda or cuda:N", (name, line)
    assert not (tmp_path / "f.h5.parts").exists() and not (tmp_path / "c2" / "last.pt").exists()


# ----------------------------------------------------------------------------- 11. leftovers of killed runs
def test_stale_temp_files_of_a_killed_run_are_removed_by_the_next(cache, tmp_path):
    stale = [cache / ".features.h5.abc123.tmp", tmp_path / "ckpt" / ".last.pt.x1y2.tmp",
             tmp_path / "ckpt" / ".best.pt.zz.tmp", tmp_path / "m" / ".train_steps.csv.q.tmp"]
    foreign = [cache / ".other.h5.abc.tmp", tmp_path / "ckpt" / "notes.tmp"]
    for p in stale + foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    assert cli("extract", "--cache-dir", cache, *EX, "--force").exit_code == 0
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "ckpt", "--metrics-dir", tmp_path / "m",
               *TRAIN).exit_code == 0
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in foreign)  # only the stage's own target names are touched


# ----------------------------------------------------------------------------- 8. malformed annotations
def _prepare_cli(coco_dataset, out):
    a = coco_dataset["annotations"]
    return cli("prepare", "--dataset", "coco", "--annotations", a[0], "--annotations", a[1], "--images",
               coco_dataset["root"], "--out-dir", out, "--vocab-threshold", "1")


def test_malformed_annotations_are_refused_naming_the_entry(coco_dataset, tmp_path):
    path = coco_dataset["annotations"][0]
    original = json.loads(path.read_text())

    data = json.loads(json.dumps(original))
    data["images"][2]["id"] = "abc"
    path.write_text(json.dumps(data))
    line = one_error_line(_prepare_cli(coco_dataset, tmp_path / "c1"))
    assert "images[2]" in line and "'abc'" in line and "not an integer id" in line, line

    data = json.loads(json.dumps(original))
    data["annotations"][3]["caption"] = ["a", "list"]
    path.write_text(json.dumps(data))
    line = one_error_line(_prepare_cli(coco_dataset, tmp_path / "c2"))
    assert "annotations[3]" in line and "not text" in line, line

    data = json.loads(json.dumps(original))
    data["annotations"] += [{"id": 9000 + k, "image_id": 123456, "caption": "an orphan"} for k in range(3)]
    path.write_text(json.dumps(data))
    result = _prepare_cli(coco_dataset, tmp_path / "c3")
    assert result.exit_code == 0, result.output
    assert "left out 3 captions of no listed image" in result.output


# ----------------------------------------------------------------------------- 9. caption loses no input
def test_caption_accounts_for_every_input(cache, tmp_path):
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "ckpt", "--metrics-dir", tmp_path / "m",
               *TRAIN).exit_code == 0
    folder = tmp_path / "inputs"
    folder.mkdir()
    for k in range(3):
        Image.new("RGB", (40, 30), (50 * k, 90, 10)).save(folder / f"ok{k}.jpg")
    (folder / "text.jpg").write_text("not an image")
    (folder / "x.jpg").mkdir()  # a folder named like an image
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")  # a symlink loop
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    Image.new("RGB", (1, 20000)).save(folder / "strip.png")
    (folder / "notes.txt").write_text("not named like an image: not an input")
    result = cli("caption", folder, "--checkpoint", tmp_path / "ckpt" / "last.pt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "captioned 3 images, 5 unreadable" in result.output
    for name in ("text.jpg", "x.jpg", "loop.jpg", "dangling.png", "strip.png"):
        assert f"skipped {folder / name}: " in result.output, name
    assert "aspect ratio" in result.output


# ----------------------------------------------------------------------------- 10. checkpoint checks
def test_checkpoint_content_is_validated_at_load(cache, tmp_path):
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "ckpt", "--metrics-dir", tmp_path / "m",
               *TRAIN).exit_code == 0
    good = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    image = next(Path(load_manifest(cache).image_dirs[0]).glob("*.jpg"))

    def caption_with(name: str, ckpt: dict | None = None, raw: bytes | None = None) -> str:
        path = tmp_path / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            torch.save(ckpt, path)
        return one_error_line(cli("caption", image, "--checkpoint", path, "--device", "cpu"))

    short = {**good, "vocab": good["vocab"][:-3]}
    line = caption_with("short.pt", short)
    assert f"vocabulary has {len(good['vocab']) - 3} words but its output layer predicts {len(good['vocab'])}" in line

    line = caption_with("random.pt", raw=np.random.default_rng(0).bytes(5000))
    assert "is not a checkpoint" in line and "objects other than tensors" not in line, line

    edited = {**good, "model_config": {**good["model_config"], "hidden_size": 64}}
    line = caption_with("hidden.pt", edited)
    assert "weight lstm.weight_ih_l0 has shape [192, 32]" in line and "hidden_size=64" in line, line
    assert line.endswith("retrain it or use another checkpoint"), line

    other_encoder = {**good, "encoder": {**good["encoder"], "feature_dim": 2048}}
    line = caption_with("encoder.pt", other_encoder)
    assert "2048-value features but the decoder reads 512" in line, line


def test_evaluate_refuses_a_read_only_or_full_out_before_decoding(cache, tmp_path, monkeypatch):
    """Outputs are checked before the beam search (which never runs here), naming the option and the free space."""
    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "ckpt", "--metrics-dir", tmp_path / "m",
               *TRAIN).exit_code == 0
    import pipeline.evaluate.evaluate as evaluate_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started before the outputs were checked")

    monkeypatch.setattr(evaluate_module, "decode_rows", no_decoding)
    args = ["evaluate", "--checkpoint", tmp_path / "ckpt" / "last.pt", "--cache-dir", cache, "--split", "val",
            "--device", "cpu", "--tokenizer", "simple"]
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        line = one_error_line(cli(*args, "--out", ro / "eval.json"))
        assert "read-only" in line and "--out" in line, line
        line = one_error_line(cli(*args, "--out", tmp_path / "eval.json", "--results", ro / "captions.json"))
        assert "read-only" in line and "--results" in line, line
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, 0)
        line = one_error_line(cli(*args, "--out", full / "eval.json"))
        assert str(full) in line and ("free" in line or "space" in line), line


def test_scst_on_a_disk_that_fills_is_one_line_and_keeps_its_last_checkpoint(cache, tmp_path, monkeypatch):
    """The disk fills after scst's checks: its save fails in one line naming the file it keeps, as train's does
    (before the shared run code it ended in `RuntimeError: ... unexpected pos`)."""
    import pipeline.scst.scst as scst_module
    import pipeline.trainer.outputs as outputs

    assert cli("train", "--cache-dir", cache, "--out", tmp_path / "xe", "--metrics-dir", tmp_path / "mx",
               *TRAIN).exit_code == 0
    args = ["scst", "--cache-dir", cache, "--init", tmp_path / "xe" / "best.pt", "--metrics-dir", tmp_path / "ms",
            "--batch-size", "6", "--samples", "2", "--max-length", "8", "--device", "cpu", "--quiet"]
    with tmpfs(tmp_path / "small", "4m") as small:
        out = small / "scst"
        monkeypatch.setattr(scst_module, "check_room", lambda model, out: None)  # the disk fills up after the checks
        monkeypatch.setattr(outputs, "ensure_writable", lambda folder, what: None)
        fill(small, 4096)
        line = one_error_line(cli(*args, "--epochs", "1", "--out", out))
        assert "the disk is full" in line and str(out) in line, line
        assert "unexpected pos" not in line and not list(out.glob(".*.tmp"))
