"""extract notices pictures that changed since their features were made, and retries failed ones."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner
from conftest import make_jpeg
from conftest import run_extract as extract

from pipeline.cli import main
from pipeline.core.manifest import ImageRecord, load_manifest

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=3, chunk_size=5, workers=0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def features(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["features"][:]


def test_changed_picture_redoes_only_its_chunk_and_equals_a_fresh_run(prepared_cache):
    first = extract(prepared_cache, **SMALL)
    before = features(prepared_cache / "features.h5")
    m = load_manifest(prepared_cache)
    path = Path(m.path_of(7))  # chunk 1 (rows 5-9)
    make_jpeg(path.with_suffix(".tmp.jpg"), size=(70, 50), color=(0, 0, 0), shape="circle")
    path.with_suffix(".tmp.jpg").replace(path)  # same name, another picture
    rerun = extract(prepared_cache, **SMALL)
    assert not rerun.up_to_date and rerun.changed == 1 and rerun.retried == 0
    assert rerun.computed == 5 < first.computed
    assert "redid the chunks of 1 changed" in rerun.line()
    after = features(prepared_cache / "features.h5")
    assert not np.array_equal(after[7], before[7])
    assert np.array_equal(np.delete(after, 7, 0), np.delete(before, 7, 0))
    fresh = extract(prepared_cache, out=prepared_cache / "fresh.h5", **SMALL)
    assert fresh.computed == first.computed
    assert sha(prepared_cache / "features.h5") == sha(prepared_cache / "fresh.h5")  # byte for byte
    assert extract(prepared_cache, **SMALL).up_to_date


def test_every_picture_replaced_under_the_same_names(prepared_cache):
    """The issue's case: another data set's pictures under the old file names."""
    extract(prepared_cache, **SMALL)
    m = load_manifest(prepared_cache)
    for i in range(len(m.images)):
        p = Path(m.path_of(i))
        if p.exists():
            make_jpeg(p.with_name("new" + p.suffix), size=(40 + i, 60), color=(i * 10, 200, 30), shape="square")
            p.with_name("new" + p.suffix).replace(p)
    rerun = extract(prepared_cache, **SMALL)
    assert rerun.changed == len(m.images) and rerun.computed == len(m.images)


def test_hash_catches_a_change_that_keeps_size_and_mtime(prepared_cache):
    extract(prepared_cache, verify="hash", **SMALL)
    with h5py.File(prepared_cache / "features.h5") as f:
        assert all(len(h) == 64 for h in f["sha256"][:])
    path = Path(load_manifest(prepared_cache).path_of(2))
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a careless copy tool would leave it
    assert extract(prepared_cache, **SMALL).up_to_date  # stat alone cannot see it
    rerun = extract(prepared_cache, verify="hash", **SMALL)
    assert rerun.changed == 1 and rerun.computed == 5


def test_cache_without_image_records_says_force(prepared_cache):
    extract(prepared_cache, **SMALL)
    with h5py.File(prepared_cache / "features.h5", "r+") as f:
        for key in ("file_size", "mtime_ns", "sha256"):
            del f[key]
    summary = extract(prepared_cache, **SMALL)
    assert summary.up_to_date and "rerun with --force" in summary.line()


def add_broken(cache: Path) -> list[Path]:
    m = load_manifest(cache)
    d = Path(m.image_dirs[0])
    (d / "text.jpg").write_text("not an image")
    broken = [d / "text.jpg", d / "late.jpg"]  # late.jpg is not there yet
    for k, p in enumerate(broken):
        m.images.append(ImageRecord(id=5000 + k, dir=0, file=p.name, split="train", captions=["a red square"]))
    m.save(cache / "manifest.json")
    return broken


def test_repaired_images_are_retried(prepared_cache):
    broken = add_broken(prepared_cache)
    first = extract(prepared_cache, **SMALL)
    assert len(first.failures) == 2
    again = extract(prepared_cache, **SMALL)
    assert again.up_to_date and "--retry-failed" in again.line()
    for p in broken:
        make_jpeg(p, size=(50, 50), color=(10, 200, 10), shape="triangle")
    repaired = extract(prepared_cache, **SMALL)
    assert not repaired.up_to_date and repaired.retried == 2 and repaired.failures == []
    assert repaired.computed < first.computed  # only the last chunk
    extract(prepared_cache, out=prepared_cache / "fresh.h5", **SMALL)
    assert sha(prepared_cache / "features.h5") == sha(prepared_cache / "fresh.h5")


def test_retry_failed_flag_redoes_failed_rows_only(prepared_cache):
    add_broken(prepared_cache)
    first = extract(prepared_cache, **SMALL)
    r = CliRunner().invoke(main, ["extract", "--cache-dir", str(prepared_cache), "--arch", "resnet18", "--weights",
                                  "none", "--resize", "72", "--crop", "64", "--batch-size", "3", "--chunk-size", "5",
                                  "--workers", "0", "--quiet", "--retry-failed"])
    assert r.exit_code == 0, r.output
    assert "redid the chunks of 0 changed and 2 previously failed image(s)" in r.output
    n = len(load_manifest(prepared_cache).images)
    assert f"({n - (n - 1) // 5 * 5} computed now" in r.output and first.computed == n
