"""Inputs that used to hang, collide, get destroyed or go unnoticed: each ends in a clear, true line.

FIFOs are made with os.mkfifo; every command that could block on one runs in a subprocess with a timeout,
so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from conftest import run_extract, run_prepare, write_coco_split
from PIL import Image, features

from pipeline.cli import main

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")

EX = ["--arch", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--batch-size", "4",
      "--workers", "0", "--quiet"]
SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)
TRAIN = ["--epochs", "1", "--batch-size", "8", "--embed-size", "32", "--hidden-size", "48", "--device", "cpu",
         "--val-images", "2", "--quiet"]
TIMEOUT = int(os.environ.get("ROBUST_TIMEOUT", "120"))  # far above the few seconds each command needs; a blocked open() would never end


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def cli_sub(*args, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a child process, killed after `timeout` s (a hang fails the test, not the suite)."""
    try:
        return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`pipeline {' '.join(map(str, args))}` still running after {timeout} s (blocked on a FIFO?)")


def one_error_line(result) -> str:
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 1, (code, output)
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A COCO-style dataset, its prepared and extracted cache, and a checkpoint trained on it (once per module)."""
    root = tmp_path_factory.mktemp("robust")
    train_json, train_dir, _ = write_coco_split(root / "coco", "train2014", [9, 25, 30, 34, 36, 42, 49, 61])
    val_json, val_dir, _ = write_coco_split(root / "coco", "val2014", [139, 285, 632, 724], val=True)
    cache = root / "cache"
    run_prepare("coco", [train_json, val_json], [train_dir, val_dir], out_dir=cache, vocab_threshold=1)
    run_extract(cache, **SMALL)
    result = cli("train", "--cache-dir", cache, "--out", root / "ckpt", "--metrics-dir", root / "m", *TRAIN)
    assert result.exit_code == 0, result.output
    return dict(root=root, cache=cache, ckpt=root / "ckpt" / "last.pt", annotations=[train_json, val_json],
                images=[train_dir, val_dir])


def copy_cache(src: Path, dst: Path, names=("manifest.json", "vocab.json", "labels.h5", "features.h5")) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ----------------------------------------------------------------------------- 1. FIFOs named like images
def test_a_fifo_among_the_images_is_unreadable_not_a_hang(prepared_cache):
    manifest = json.loads((prepared_cache / "manifest.json").read_text())
    rec = manifest["images"][0]
    victim = Path(manifest["image_dirs"][rec["dir"]]) / rec["file"]
    victim.unlink()
    os.mkfifo(victim)
    # verify=hash reads every file for its sha256: that read must not open the FIFO either
    proc = cli_sub("extract", "--cache-dir", prepared_cache, *EX, "--verify", "hash")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"failed: {rec['file']}: " in proc.stderr and "not a regular file (a FIFO)" in proc.stderr, proc.stderr
    with h5py.File(prepared_cache / "features.h5", "r") as f:
        assert not f["valid"][0] and f["valid"][1:].all()
    proc = cli_sub("extract", "--cache-dir", prepared_cache, *EX, "--verify", "hash")  # the update path stats it again
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout + proc.stderr


def test_the_gpu_decode_reader_does_not_open_a_fifo(tmp_path):
    """gpu_decode.JpegFiles reads file bytes in its workers: a FIFO goes to the PIL path, which names it."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    code = ("import socket, sys\n"
            "from pipeline.encoder.gpu_decode import JpegFiles\n"
            "from pipeline.encoder.images import Preprocess\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({str(sock_dir / 'sock.jpg')!r})\n"
            f"ds = JpegFiles([{str(fifo)!r}, {str(sock_dir / 'sock.jpg')!r}], Preprocess(resize=72, crop=64))\n"
            "for i in range(2):\n"
            "    row, (kind, image), err = ds[i]\n"
            "    print(kind, tuple(image.shape), err)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("JpegFiles blocked on a FIFO")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("image (3, 64, 64) ") and "not a regular file (a FIFO)" in lines[0], lines
    assert "not a regular file (a socket)" in lines[1], lines


def test_caption_lists_a_fifo_as_unreadable(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 90, 10)).save(folder / "ok.jpg")
    os.mkfifo(folder / "pipe.jpg")
    proc = cli_sub("caption", folder, folder / "pipe.jpg", "--checkpoint", trained["ckpt"], "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count(f"skipped {folder / 'pipe.jpg'}: ") == 2, proc.stderr
    assert "not a regular file (a FIFO)" in proc.stderr
    assert "captioned 1 images, 2 unreadable" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- 2. caption's ids and exit status
def test_caption_results_have_unique_ids(trained, tmp_path):
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        Image.new("RGB", (40, 30), (200, 90, 10)).save(tmp_path / day / "IMG_0001.jpg")
    Image.new("RGB", (40, 30), (20, 90, 100)).save(tmp_path / "COCO_val2014_000000000002.jpg")
    out = tmp_path / "r.json"
    result = cli("caption", tmp_path / "day1" / "IMG_0001.jpg", tmp_path / "day2" / "IMG_0001.jpg",
                 tmp_path / "COCO_val2014_000000000002.jpg", "--checkpoint", trained["ckpt"], "--device", "cpu",
                 "--json", out)
    assert result.exit_code == 0, result.output
    ids = [r["image_id"] for r in json.loads(out.read_text())]
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    assert "numbered by their position" in result.output, result.output
    # names that give distinct ids keep them (COCO-style results stay COCO ids)
    result = cli("caption", tmp_path / "day1" / "IMG_0001.jpg", tmp_path / "COCO_val2014_000000000002.jpg",
                 "--checkpoint", trained["ckpt"], "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    assert [r["image_id"] for r in json.loads(out.read_text())] == [1, 2]


def test_caption_with_nothing_captioned_fails(trained, tmp_path):
    (tmp_path / "a.jpg").write_text("not an image")
    (tmp_path / "b.jpg").write_bytes(b"")
    out = tmp_path / "r.json"
    result = cli("caption", tmp_path / "a.jpg", tmp_path / "b.jpg", "--checkpoint", trained["ckpt"],
                 "--device", "cpu", "--json", out)
    line = one_error_line(result)
    assert "none of the 2 images could be captioned" in line, line
    assert f"skipped {tmp_path / 'a.jpg'}: " in result.output
    assert not out.exists()


# ----------------------------------------------------------------------------- 3. --out among extract's inputs
@pytest.mark.parametrize("target", ["manifest.json", "vocab.json", "labels.h5", "image"])
def test_extract_refuses_an_out_that_is_one_of_its_inputs(prepared_cache, target):
    manifest = json.loads((prepared_cache / "manifest.json").read_text())
    rec = manifest["images"][2]
    out = Path(manifest["image_dirs"][rec["dir"]]) / rec["file"] if target == "image" else prepared_cache / target
    before = out.read_bytes()
    for force in ([], ["--force"]):
        line = one_error_line(cli("extract", "--cache-dir", prepared_cache, "--out", out, *EX, *force))
        assert "is one of extract's inputs" in line and "--out" in line, line
        assert "--force" not in line, line
    assert out.read_bytes() == before
    # the same file named another way (relative, through a symlink) is refused too
    link = prepared_cache.parent / "link"
    link.symlink_to(out.parent, target_is_directory=True)
    line = one_error_line(cli("extract", "--cache-dir", prepared_cache, "--out", link / out.name, *EX))
    assert "is one of extract's inputs" in line, line


def suggested(line: str) -> list[str]:
    """The `pipeline ...` command quoted in an error line, as arguments after `pipeline`."""
    assert line.count("`") >= 2, line
    cmd = shlex.split(line.split("`")[1])
    assert cmd[0] == "pipeline", cmd
    return cmd[1:]


def test_damage_messages_suggest_a_command_that_rebuilds_this_cache(prepared_cache):
    assert cli("extract", "--cache-dir", prepared_cache, *EX).exit_code == 0
    feats = prepared_cache / "features.h5"
    with h5py.File(feats, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    data = bytearray(feats.read_bytes())
    data[offset + 10] ^= 0xFF  # one flipped byte: fletcher32 fails the read
    feats.write_bytes(bytes(data))
    line = one_error_line(cli("extract", "--cache-dir", prepared_cache, *EX))
    args = suggested(line)
    for flag, value in (("--arch", "resnet18"), ("--weights", "none"), ("--resize", "72"), ("--crop", "64")):
        assert args[args.index(flag) + 1] == value, line
    assert "--force" in args
    result = cli(*args, "--workers", "0", "--quiet")  # the suggestion works: it rebuilds this cache, offline
    assert result.exit_code == 0, (line, result.output)
    with h5py.File(feats, "r") as f:
        assert f.attrs["arch"] == "resnet18" and f["valid"][:].all()

    feats.write_bytes(b"not an HDF5 file at all")  # the record itself unreadable
    line = one_error_line(cli("extract", "--cache-dir", prepared_cache, *EX))
    assert "delete it" not in line, line
    args = suggested(line)
    assert args[args.index("--arch") + 1] == "resnet18" and "--force" in args, line
    assert cli(*args, "--workers", "0", "--quiet").exit_code == 0


# ----------------------------------------------------------------------------- 4. captions edited by hand
def test_captions_edited_after_prepare_are_caught(trained, tmp_path):
    cache = copy_cache(trained["cache"], tmp_path / "c")
    manifest = json.loads((cache / "manifest.json").read_text())
    for rec in manifest["images"]:
        if rec["split"] == "val":
            rec["captions"] = ["something else entirely"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    line = one_error_line(cli("evaluate", "--checkpoint", trained["ckpt"], "--cache-dir", cache, "--split", "val",
                              "--out", tmp_path / "eval.json", "--device", "cpu"))
    assert "captions" in line and "labels.h5" in line and f"pipeline prepare --out-dir {cache}" in line, line

    from pipeline.core.manifest import check_captions, load_manifest  # the check load_cache makes
    from pipeline.decoder.data import load_cache

    with pytest.raises(Exception, match="(?i)rerun `pipeline prepare"):
        load_cache(cache, captions=False)  # train's and scst's load
    with h5py.File(cache / "labels.h5", "r") as f:
        attrs = dict(f.attrs)
    with pytest.raises(Exception, match="(?i)rerun `pipeline prepare"):
        check_captions(load_manifest(cache, captions=False), attrs, cache)  # train's load: captions left out
    check_captions(load_manifest(trained["cache"], captions=False), attrs, trained["cache"])

    # a cache prepared before captions were fingerprinted still loads
    with h5py.File(cache / "labels.h5", "a") as f:
        del f.attrs["captions_fingerprint"]
    result = cli("evaluate", "--checkpoint", trained["ckpt"], "--cache-dir", cache, "--split", "val",
                 "--out", tmp_path / "eval.json", "--device", "cpu")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- 5. advice, and one extension list
def test_an_image_left_without_captions_is_named_and_evaluate_says_what_to_do(trained, tmp_path):
    ann = json.loads(Path(trained["annotations"][1]).read_text())
    lost = ann["images"][0]["id"]
    for a in ann["annotations"]:
        if a["image_id"] == lost:
            a["caption"] = " ... !"
    val_json = tmp_path / "captions_val2014.json"
    val_json.write_text(json.dumps(ann))
    result = cli("prepare", "--dataset", "coco", "--annotations", trained["annotations"][0], "--annotations", val_json,
                 "--images", trained["images"][0], "--images", trained["images"][1], "--out-dir", tmp_path / "c",
                 "--vocab", trained["cache"] / "vocab.json")
    assert result.exit_code == 0, result.output
    assert f"1 image left with no caption (val 1, e.g. id {lost})" in result.output, result.output
    copy_cache(trained["cache"], tmp_path / "c", names=("features.h5",))  # same images, same rows
    line = one_error_line(cli("evaluate", "--checkpoint", trained["ckpt"], "--cache-dir", tmp_path / "c",
                              "--split", "val", "--out", tmp_path / "eval.json", "--device", "cpu"))
    assert f"e.g. id {lost}" in line and "rerun `pipeline prepare" in line, line


def test_caption_reads_a_folder_with_every_extension_extract_reads(trained, tmp_path):
    from pipeline.encoder.images import IMAGE_EXTENSIONS

    assert {".jpg", ".png", ".webp", ".avif"} <= set(IMAGE_EXTENSIONS) or not features.check("avif")
    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    Image.new("RGB", (40, 30), (200, 90, 10)).save(tmp_path / "a.avif")
    Image.new("RGB", (40, 30), (20, 90, 10)).save(tmp_path / "b.png")
    result = cli("caption", tmp_path, "--checkpoint", trained["ckpt"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "captioned 2 images, 0 unreadable" in result.output, result.output


# ----------------------------------------------------------------------------- Ctrl-C advice that loses no work
def interrupted_run(trained, tmp_path) -> Path:
    """A copy of the module's checkpoint folder whose last.pt says it stopped after epoch 1 of 3 (what Ctrl-C
    in epoch 2 of `--epochs 3` leaves)."""
    import shutil

    import torch

    out = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"].parent, out)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["epoch"], ckpt["train_state"]["epoch"], ckpt["train_config"]["epochs"] = 1, 1, 3
    torch.save(ckpt, out / "last.pt")
    return out


def test_a_fresh_run_refuses_to_overwrite_an_unfinished_one(trained, tmp_path):
    out = interrupted_run(trained, tmp_path)
    before = (out / "last.pt").read_bytes()
    args = ["train", "--cache-dir", trained["cache"], "--out", out, "--metrics-dir", tmp_path / "m", *TRAIN]
    line = one_error_line(cli(*args))
    assert "unfinished train run (stopped at epoch 1 of 3)" in line and "--resume" in line, line
    assert (out / "last.pt").read_bytes() == before  # nothing overwritten
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output


def test_ctrl_c_advice_names_the_command_that_continues(trained, tmp_path, monkeypatch):
    import pipeline.train.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    result = cli("train", "--cache-dir", trained["cache"], "--out", tmp_path / "o", *TRAIN)
    assert result.exit_code == 130
    assert "rerun the same command with --resume" in result.output, result.output


def test_resume_with_other_settings_says_so(trained, tmp_path):
    out = interrupted_run(trained, tmp_path)
    result = cli("train", "--cache-dir", trained["cache"], "--out", out, "--metrics-dir", tmp_path / "m", *TRAIN,
                 "--resume", "--lr", "0.0001")
    assert result.exit_code == 0, result.output
    assert "settings differ" in result.output and "lr: 0.001 -> 0.0001" in result.output, result.output


def test_scst_on_a_read_only_cache_keeps_the_document_frequencies_in_memory(trained, tmp_path, monkeypatch, capsys):
    import errno

    from pipeline.decoder.data import load_cache
    from pipeline.scst import cider

    def read_only(self, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    cache = copy_cache(trained["cache"], tmp_path / "c")
    monkeypatch.setattr(cider.DocFreq, "save", read_only)
    df = cider.load_or_build_df(cache, load_cache(cache))
    assert df.n_images > 0 and not (cache / cider.DF_NAME).exists()
    assert "kept in memory" in capsys.readouterr().err
