"""Stage 1 feature cache: shapes, attributes, determinism, crash-resume, refusal, bad images."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import run_extract as extract
from PIL import Image

from pipeline.caption.caption import expand_inputs
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.core.manifest import ImageRecord, load_manifest
from pipeline.encoder.images import Preprocess

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_bad_images(cache: Path) -> dict[str, str]:
    """Append odd and broken files to the manifest; returns file -> expected failure kind ('' = fine)."""
    m = load_manifest(cache)
    d = Path(m.image_dirs[0])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image at all")
    good = next(p for p in d.rglob("*.jpg") if p.stat().st_size > 0 and p.name not in ("empty.jpg", "text.jpg"))
    data = good.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("1", (12000, 12000)).save(d / "huge.png")  # 144 Mpx, a few KB on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.new("RGB", (80, 40), (200, 10, 10)).save(d / "rotated.jpg", exif=exif)
    Image.new("I;16", (40, 40)).save(d / "sixteen.png")
    expected = {"empty.jpg": "bad", "text.jpg": "bad", "truncated.jpg": "bad", "huge.png": "bad",
                "rotated.jpg": "", "sixteen.png": ""}
    for k, name in enumerate(expected):
        m.images.append(ImageRecord(id=1000 + k, dir=0, file=name, split="train", captions=["a red square"]))
    m.save(cache / "manifest.json")
    return expected


def test_shapes_dtype_and_attributes(prepared_cache):
    summary = extract(prepared_cache, **SMALL)
    m = load_manifest(prepared_cache)
    with h5py.File(prepared_cache / "features.h5") as f:
        assert f["features"].shape == (len(m.images), 512)
        assert f["features"].dtype == np.float16
        assert f["valid"][:].all()
        assert list(f["image_ids"][:]) == [r.id for r in m.images]
        assert list(f["paths"].asstr()[:]) == [r.file for r in m.images]
        a = f.attrs
        assert a["arch"] == "resnet18" and a["weights"] == "none:seed=0" and a["feature_dim"] == 512
        assert a["resize"] == 72 and a["crop"] == 64 and a["dtype"] == "float16"
        assert a["manifest_fingerprint"] == m.fingerprint
        assert json.loads(a["preprocess"])["mean"] == [0.485, 0.456, 0.406]
        assert a["torch_version"] == str(torch.__version__) and a["torchvision_version"] == torchvision.__version__
        feats = f["features"][:].astype(np.float32)
    assert np.isfinite(feats).all() and (np.abs(feats).sum(1) > 0).all()
    assert summary.images == len(m.images) and summary.computed == len(m.images) and not summary.failures
    # a feature is the pooled last block: compare one row with a direct forward pass
    enc_input = Preprocess(72, 64)(m.path_of(0))[0]
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    net.fc = torch.nn.Identity()
    x = (enc_input.float()[None] / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = net(x)[0].numpy()
    np.testing.assert_allclose(feats[0], direct, rtol=2e-2, atol=2e-3)


def test_float32_and_determinism(prepared_cache):
    extract(prepared_cache, out=prepared_cache / "a.h5", dtype="float32", **SMALL)
    extract(prepared_cache, out=prepared_cache / "b.h5", dtype="float32", **SMALL)
    with h5py.File(prepared_cache / "a.h5") as f:
        assert f["features"].dtype == np.float32
    assert sha(prepared_cache / "a.h5") == sha(prepared_cache / "b.h5")  # byte for byte


def test_up_to_date_run_does_nothing(prepared_cache):
    extract(prepared_cache, **SMALL)
    before = os.stat(prepared_cache / "features.h5").st_mtime_ns
    again = extract(prepared_cache, **SMALL)
    assert again.up_to_date and again.computed == 0
    assert os.stat(prepared_cache / "features.h5").st_mtime_ns == before
    assert "up to date" in again.line()


def test_other_settings_refused_then_force_rebuilds(prepared_cache):
    extract(prepared_cache, **SMALL)
    with pytest.raises(PipelineError, match="other settings.*arch.*--force"):
        extract(prepared_cache, **{**SMALL, "arch": "resnet34"})
    with pytest.raises(PipelineError, match="crop"):
        extract(prepared_cache, **{**SMALL, "crop": 56})
    rebuilt = extract(prepared_cache, force=True, **{**SMALL, "arch": "resnet34"})
    assert rebuilt.computed == rebuilt.images
    with h5py.File(prepared_cache / "features.h5") as f:
        assert f.attrs["arch"] == "resnet34"


def test_cli_refusal_is_one_clear_line(prepared_cache):
    extract(prepared_cache, **SMALL)
    r = CliRunner().invoke(main, ["extract", "--cache-dir", str(prepared_cache), "--arch", "resnet34",
                                  "--weights", "none", "--resize", "72", "--crop", "64", "--workers", "0", "--quiet"])
    assert r.exit_code == 1
    assert "Traceback" not in r.output and r.output.startswith("Error: ") and "--force" in r.output


KILLER = """
import os, signal, sys
import pipeline.extract.extract as ex
from pipeline.extract.parts import Parts
original = Parts.write_part
def write_then_die(self, k, *args):
    original(self, k, *args)
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # like a power cut right after chunk 1 is durable
Parts.write_part = write_then_die
from pipeline.extract.config import ExtractConfig
ex.extract(sys.argv[1], ExtractConfig(arch="resnet18", weights="none", resize=72, crop=64, batch_size=3,
           chunk_size=5, workers=0, features=sys.argv[3], grid_size=3, compile=sys.argv[4], runtime=sys.argv[5]),
           out=sys.argv[2],
           progress=False)
"""


@pytest.mark.parametrize("features, compile, runtime", [("pooled", "false", "torch"), ("grid", "false", "torch"),
                                                       ("grid", "true", "torch"), ("pooled", "false", "onnxruntime")])
def test_resume_after_kill_is_identical(prepared_cache, features, compile, runtime):
    out = prepared_cache / "resumed.h5"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(prepared_cache), str(out), features, compile, runtime],
                          capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    parts = sorted(p.name for p in (prepared_cache / "resumed.h5.parts").glob("part-*.npz"))
    assert parts == ["part-000000.npz", "part-000001.npz"] and not out.exists()
    # a different chunk size must not silently mix with the unfinished run
    with pytest.raises(PipelineError, match="unfinished extraction"):
        extract(prepared_cache, out=out, chunk_size=4, **{**SMALL, "batch_size": 3})
    same = {**SMALL, "batch_size": 3, "features": features, "grid_size": 3, "compile": compile, "runtime": runtime}
    resumed = extract(prepared_cache, out=out, chunk_size=5, **same)
    n = len(load_manifest(prepared_cache).images)
    assert resumed.computed == n - 10  # the two finished chunks were not redone
    straight = extract(prepared_cache, out=prepared_cache / "straight.h5", chunk_size=5, **same)
    assert straight.computed == n
    assert sha(out) == sha(prepared_cache / "straight.h5")
    assert not (prepared_cache / "resumed.h5.parts").exists()


def test_bad_and_odd_images_are_recorded_not_fatal(prepared_cache):
    expected = add_bad_images(prepared_cache)
    summary = extract(prepared_cache, **SMALL)
    failed = dict(summary.failures)
    assert set(failed) == {name for name, kind in expected.items() if kind == "bad"}
    assert "too large" in failed["huge.png"]
    with h5py.File(prepared_cache / "features.h5") as f:
        paths = list(f["paths"].asstr()[:])
        valid = f["valid"][:]
        errors = list(f["errors"].asstr()[:])
        feats = f["features"][:]
    for name, kind in expected.items():
        i = paths.index(name)
        assert bool(valid[i]) == (kind == ""), name
        assert (errors[i] != "") == (kind == "bad")
        if kind == "bad":
            assert not feats[i].any()
    assert valid.sum() == len(paths) - 4


def test_image_modes_and_exif(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (200, 10, 10)).save(tmp_path / "r.jpg", exif=exif)
    img = Preprocess().load(str(tmp_path / "r.jpg"))
    assert img.size == (40, 80) and img.mode == "RGB"  # upright
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert Preprocess().load(str(tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("CMYK", (300, 200), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    t, err = Preprocess()(str(tmp_path / "c.jpg"))
    assert err == "" and t.shape == (3, 224, 224) and t.dtype == torch.uint8
    assert t[0].float().mean() > 200 and t[1].float().mean() < 60  # CMYK red stays red


def test_jpeg_draft_keeps_content(tmp_path):
    """Draft decoding of a big JPEG gives nearly the same tensor as a full decode."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(small).resize((1600, 1200), Image.BILINEAR).save(tmp_path / "big.jpg", quality=95)
    pre = Preprocess()
    drafted = pre.to_tensor(pre.load(str(tmp_path / "big.jpg"))).float()
    full = pre.to_tensor(Image.open(tmp_path / "big.jpg").convert("RGB")).float()
    assert (drafted - full).abs().mean() < 4.0


def test_local_weights_file(prepared_cache, tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    extract(prepared_cache, **{**SMALL, "weights": str(tmp_path / "r18.pt")})
    with h5py.File(prepared_cache / "features.h5") as f:
        assert f.attrs["weights"] == "file:r18.pt"
        assert f.attrs["weights_sha256"] == sha(tmp_path / "r18.pt")
    with pytest.raises(PipelineError, match="no such file"):
        extract(prepared_cache, **{**SMALL, "weights": str(tmp_path / "missing.pt")})
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    with pytest.raises(PipelineError, match="does not fit"):
        extract(prepared_cache, force=True, **{**SMALL, "weights": str(tmp_path / "wrong.pt")})


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(PipelineError, match="pipeline prepare"):
        extract(tmp_path, **SMALL)


def test_bench_extract_prints_figures_and_fails_below_its_targets(coco_dataset, tmp_path):
    args = ["bench", "extract", "--images", coco_dataset["images"][0], "--arch", "resnet18", "--weights", "none",
            "--resize", "72", "--crop", "64", "--workers", "0", "--device", "cpu", "--batch-size", "2",
            "--repeat", "2"]
    out = tmp_path / "bench.json"
    # the memory target is for a process of its own; pytest's has loaded much more
    r = CliRunner().invoke(main, args + ["--target-ratio", "0", "--max-memory-mb", "1e6", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["images"] == 2 * len(expand_inputs([coco_dataset["images"][0]]))  # --repeat 2
    assert res["bare_images_per_s"] > 0 and res["extract_images_per_s"] > 0
    # the target is on the steady state (after extract's first batch), the whole run is reported beside it
    assert res["extract_steady_images_per_s"] > 0
    assert res["ratio"] == pytest.approx(res["extract_steady_images_per_s"] / res["bare_images_per_s"])
    assert res["ratio_whole_run"] == pytest.approx(res["extract_images_per_s"] / res["bare_images_per_s"])
    # the limit is the best of every network form (BatchNorm kept or folded), layout, thread count and
    # allocator, not the project's own way
    assert {f"{form}, {layout}, 1 thread, {alloc}" for form in ("BatchNorm kept", "BatchNorm folded")
            for layout in ("nchw", "channels_last") for alloc in ("heap", "malloc default")} <= set(res["bare_variants"])
    assert res["bare_images_per_s"] == res["bare_variants"][res["limit_variant"]]
    assert "target ratio extract (steady) / bare >= 0: met" in r.output
    assert "target peak memory MB <= 1e+06: met" in r.output
    r = CliRunner().invoke(main, args + ["--target-ratio", "1000", "--max-memory-mb", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.splitlines()[-1].startswith("Error: benchmark target missed: ratio extract (steady) / bare")
    assert "peak memory MB" in r.output.splitlines()[-1]


def test_bench_extract_times_onnxruntime_as_a_limit_candidate():
    """ONNX Runtime runs the same folded encoder (normalisation and pooling included), as extract --runtime
    onnxruntime does, and counts for the limit only where its features match eager PyTorch's."""
    from pipeline.bench.bench import onnxruntime_forward
    from pipeline.encoder.encoder import build_encoder, make_spec

    spec = make_spec("resnet18", "none", 72, 64, None, True)  # a 2x2 map
    encoder = build_encoder(spec, grid_size=2)
    decoded = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    logs = []
    found, export_s = onnxruntime_forward(encoder, decoded, [[0, 1, 2], [3, 4, 5]], torch.device("cpu"),
                                          log=logs.append)
    assert list(found) == [f"onnxruntime, BatchNorm folded, {torch.get_num_threads()} threads (all images)"], logs
    assert next(iter(found.values())) > 0 and export_s > 0
    assert encoder.channels_last  # left as extract runs it
