"""Results you can trust: damaged cache files, non-finite features and diverging training are caught."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import run_extract as extract

import pipeline.train.train as train_module
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.decoder.checkpoint import load_checkpoint
from pipeline.decoder.data import load_cache
from pipeline.train.config import TrainConfig
from pipeline.train.train import train

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)


def flip_bytes(path: Path, offset: int, n: int) -> None:
    """XOR n bytes at offset with 255, as a failing disk or a bad copy would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytes(b ^ 255 for b in f.read(n))
        f.seek(offset)
        f.write(data)


def chunk_offset(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_chunk_info(0).byte_offset


def tiny_train(cache: Path, out: Path, **kw):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 5e-3, "device": "cpu", "embed_size": 32,
                         "hidden_size": 48, **kw})
    return train(cache, out / "ckpt", out / "metrics", cfg, progress=False, log=lambda m: None)


def test_cache_files_carry_checksums(prepared_cache):
    extract(prepared_cache, **SMALL)
    with h5py.File(prepared_cache / "features.h5") as f:
        assert f["features"].fletcher32 and f["valid"].fletcher32 and f["image_ids"].fletcher32
    with h5py.File(prepared_cache / "labels.h5") as f:
        assert all(f[k].fletcher32 for k in ("labels", "lengths", "caption_image", "image_ids", "image_split"))


def test_corrupted_features_are_refused_by_train_and_extract(prepared_cache):
    extract(prepared_cache, **SMALL)
    feats = prepared_cache / "features.h5"
    flip_bytes(feats, chunk_offset(feats, "features") + 100, 64)
    with pytest.raises(PipelineError, match=r"features\.h5 is damaged .*pipeline extract --cache-dir .* --force"):
        load_cache(prepared_cache)
    with pytest.raises(PipelineError, match="damaged"):  # never "up to date"
        extract(prepared_cache, **SMALL)
    r = CliRunner().invoke(main, ["train", "--cache-dir", str(prepared_cache), "--out", str(prepared_cache / "ck"),
                                  "--metrics-dir", str(prepared_cache / "m"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "damaged" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (prepared_cache / "ck" / "best.pt").exists()
    assert extract(prepared_cache, force=True, **SMALL).computed > 0
    load_cache(prepared_cache)


def test_issue_reproduction_middle_4k_flip(prepared_cache):
    """The issue's recipe: 4 KiB XORed in the middle of features.h5 must not load."""
    extract(prepared_cache, **SMALL)
    feats = prepared_cache / "features.h5"
    flip_bytes(feats, feats.stat().st_size // 2 - 2048, 4096)
    with pytest.raises(PipelineError):
        load_cache(prepared_cache)
    with pytest.raises(PipelineError):
        extract(prepared_cache, **SMALL)


def test_corrupted_labels_are_refused(prepared_cache):
    extract(prepared_cache, **SMALL)
    labels = prepared_cache / "labels.h5"
    flip_bytes(labels, chunk_offset(labels, "labels") + 8, 16)
    with pytest.raises(PipelineError, match=r"labels\.h5 is damaged .*pipeline prepare"):
        load_cache(prepared_cache)


def test_old_cache_without_checksums_still_loads(prepared_cache):
    """Caches written before the checksum filter are read as before."""
    extract(prepared_cache, **SMALL)
    for name in ("features.h5", "labels.h5"):
        path = prepared_cache / name
        with h5py.File(path, "r") as src, h5py.File(path.with_suffix(".old"), "w") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            for k in src:
                dst.create_dataset(k, data=src[k][:], dtype=src[k].dtype)
        path.with_suffix(".old").replace(path)
    with h5py.File(prepared_cache / "features.h5") as f:
        assert not f["features"].fletcher32
    data = load_cache(prepared_cache)
    assert torch.isfinite(data.features.float()).all()
    assert extract(prepared_cache, **SMALL).up_to_date


def test_non_finite_features_are_refused_on_load(prepared_cache):
    extract(prepared_cache, **SMALL)
    with h5py.File(prepared_cache / "features.h5", "r+") as f:
        f["features"][1, 3] = np.inf  # as float16 overflow stored it before
    with pytest.raises(PipelineError, match=r"non-finite features .*--dtype float32"):
        load_cache(prepared_cache)
    with pytest.raises(PipelineError, match="non-finite"):
        extract(prepared_cache, **SMALL)


@pytest.fixture
def huge_weights(tmp_path) -> Path:
    """A resnet18 whose last block's output is scaled by 1e6: pooled features far beyond float16's 65504,
    like random-init resnet101/152 (2.2e5, 3.7e8)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        net.layer4[-1].bn2.weight.mul_(1e6)
        net.layer4[-1].bn2.bias.fill_(1e6)
    path = tmp_path / "huge.pt"
    torch.save(net.state_dict(), path)
    return path


def test_float16_overflow_is_refused_and_float32_works(prepared_cache, huge_weights):
    with pytest.raises(PipelineError, match=r"beyond float16's largest value .*--dtype float32"):
        extract(prepared_cache, **{**SMALL, "weights": str(huge_weights)})
    summary = extract(prepared_cache, force=True, **{**SMALL, "weights": str(huge_weights), "dtype": "float32"})
    assert summary.computed > 0
    with h5py.File(prepared_cache / "features.h5") as f:
        feats = f["features"][:]
    assert np.isfinite(feats).all() and np.abs(feats).max() > 65504
    load_cache(prepared_cache)


def test_cli_float16_overflow_is_one_line(prepared_cache, huge_weights):
    r = CliRunner().invoke(main, ["extract", "--cache-dir", str(prepared_cache), "--arch", "resnet18", "--weights",
                                  str(huge_weights), "--resize", "72", "--crop", "64", "--workers", "0", "--quiet"])
    assert r.exit_code == 1 and r.output.startswith("Error: resnet18 features reach") and "--dtype float32" in r.output


def test_training_stops_on_non_finite_loss_and_keeps_checkpoints_finite(prepared_cache, tmp_path, monkeypatch):
    extract(prepared_cache, **SMALL)
    original = train_module.caption_loss
    calls = {"n": 0}
    steps_per_epoch = len(load_cache(prepared_cache).caption_rows("train")) // 8 + 1

    def poisoned(net, *args, **kw):
        loss = original(net, *args, **kw)
        if net.training:
            calls["n"] += 1
            if calls["n"] > steps_per_epoch:  # epoch 2 diverges
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(train_module, "caption_loss", poisoned)
    with pytest.raises(PipelineError, match="training diverged: loss nan"):
        tiny_train(prepared_cache, tmp_path)
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "ckpt" / name)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved(prepared_cache, tmp_path, monkeypatch):
    extract(prepared_cache, **SMALL)
    original = train_module.run_epoch

    def epoch_then_break(trainer, *args, **kw):
        losses = original(trainer, *args, **kw)
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("inf"))  # weights broken by something the checks missed
        return losses

    monkeypatch.setattr(train_module, "run_epoch", epoch_then_break)
    with pytest.raises(PipelineError, match="refusing to write .*best.pt.*non-finite"):
        tiny_train(prepared_cache, tmp_path, epochs=1)
    assert not (tmp_path / "ckpt" / "best.pt").exists()
