"""Training memory per rank: the features shared through one memory-mapped copy per machine, labels held
compactly, raw captions read only where validation needs them. (Peak figures: python -m pipeline.bench.memory.)"""

from __future__ import annotations

import resource

import h5py
import numpy as np
import pytest
import torch
from conftest import run_extract as extract

from pipeline.core import distributed
from pipeline.core.manifest import load_manifest
from pipeline.core.runtime import heap_allocations
from pipeline.decoder import shared_features
from pipeline.decoder.data import load_cache
from pipeline.decoder.model import teacher_forcing

SMALL = {"arch": "resnet18", "weights": "none", "resize": 72, "crop": 64, "workers": 0, "batch_size": 4}
LOCAL0 = distributed.Context(rank=0, world_size=2, local_rank=0)  # no process group: barriers are no-ops


@pytest.fixture
def cache(prepared_cache):
    extract(prepared_cache, **SMALL)
    return prepared_cache


def test_ranks_map_one_shared_copy_that_is_unlinked(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_SHM_DIR", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    path = cache / "features.h5"
    with h5py.File(path, "r") as f:
        expected = f["features"][:]
        shared = shared_features.read_features(f["features"], path, "fp", LOCAL0)
    assert np.array_equal(shared.numpy(), expected) and shared.dtype == torch.float16
    assert list((tmp_path / "shm").iterdir()) == []  # unlinked once every local rank had mapped it
    assert float(shared[3].float().sum()) == float(torch.from_numpy(expected[3]).float().sum())  # still readable


def test_a_matching_leftover_is_reused_and_a_full_shm_falls_back(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_SHM_DIR", str(tmp_path))
    path = cache / "features.h5"
    with h5py.File(path, "r") as f:
        expected = f["features"][:]
        target = shared_features.shared_path(path, "fp")
        np.save(target, expected)  # a copy left by a run killed between writing and unlinking
        mtime = target.stat().st_mtime_ns
        reused = shared_features._map(target, expected.shape, expected.dtype)
        assert reused is not None
        other = shared_features.read_features(f["features"], path, "fp", distributed.Context(1, 2, 1))
        assert np.array_equal(other.numpy(), expected) and target.stat().st_mtime_ns == mtime
        monkeypatch.setattr(shared_features, "HEADROOM", 1 << 60)  # no room: every rank reads its own copy
        target.unlink()
        own = shared_features.read_features(f["features"], path, "fp", LOCAL0)
    assert np.array_equal(own.numpy(), expected) and list(tmp_path.glob("pipeline-features-*")) == []


def test_labels_compact_and_int64_per_batch(cache):
    data = load_cache(cache)
    assert data.labels.dtype == torch.int16 and data.lengths.dtype == torch.int16
    assert data.caption_image.dtype == torch.int32
    with h5py.File(cache / "labels.h5", "r") as f:
        assert np.array_equal(data.labels.numpy(), f["labels"][:])
    inputs, targets, lengths, _ = teacher_forcing(data.labels[:5], data.lengths[:5], 1, 2)
    assert inputs.dtype == targets.dtype == lengths.dtype == torch.int64


def test_raw_captions_only_where_used(cache):
    full, lean = load_cache(cache), load_cache(cache, captions=False)
    assert all(not r.captions for r in lean.manifest.images)
    rows = full.image_rows("val")
    assert len(rows) and lean.references(rows) == full.references(rows)
    some = load_manifest(cache, captions={0})
    assert some.images[0].captions == full.manifest.images[0].captions and not some.images[1].captions
    assert some.fingerprint == full.manifest.fingerprint


def _faults_of_refilling(nbytes: int, blocks: int = 1, rounds: int = 1) -> int:
    """Page faults taken by filling `blocks` blocks of `nbytes` after the same blocks were taken and freed
    `rounds` times (glibc's adaptive thresholds settle over the first rounds)."""
    for _ in range(rounds):
        held = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(blocks)]
        del held
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(blocks)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del held
    return faults


def _in_a_fresh_process(code: str) -> list[int]:
    """The integers `code` prints, run in a new interpreter that imports from this folder: an earlier test that
    grew this process's heap (any encoder run) changes what glibc does with a freed block."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(x) for x in out.stdout.split()]


HEAP_TRIAL = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from pipeline.core.runtime import heap_allocations, tune
from test_memory import _faults_of_refilling
assert heap_allocations(False)
default = _faults_of_refilling(64 << 20)
tune(torch.device("cpu"), fixed_shapes=True)
_faults_of_refilling(64 << 20)  # the heap grows to hold the block once
print(default, _faults_of_refilling(64 << 20))
"""


@pytest.mark.skipif(not heap_allocations(True), reason="the C library has no mallopt (not glibc)")
def test_heap_allocations_reuse_freed_blocks_instead_of_faulting_them_in_again():
    """What makes CPU extraction and training up to 1.7x faster (runtime.heap_allocations): under glibc's
    default a freed 64 MB block (above its largest mmap threshold, 32 MB: like a CPU forward's activations)
    is unmapped and its successor page-faulted in again, page by page; with heap allocations it is reused
    as it is. `tune` switches it on for the encoder on the CPU. Measured in a fresh process."""
    default, heap = _in_a_fresh_process(HEAP_TRIAL)
    assert heap <= 16 < default, (heap, default)


STEP_TRIAL = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from pipeline.core.runtime import heap_allocations
from test_memory import _faults_of_refilling
assert heap_allocations(False)
print(_faults_of_refilling(16 << 20, blocks=12, rounds=4))  # a step's blocks under the 32 MB mmap threshold
"""


@pytest.mark.skipif(not heap_allocations(False), reason="the C library has no mallopt (not glibc)")
def test_decoder_allocations_keep_a_steps_freed_blocks_for_the_next_step():
    """The decoder's setting (heap_allocations(False), which train, scst and evaluate run under) keeps the
    192 MB of blocks a step freed for the next one. Where glibc's own thresholds settle (the heap trimmed
    above 64 MB free) the kernel faulted 49k pages in again at every step in 3 of 5 fresh processes (and
    none in the other 2: it depends on where the heap lies). In a fresh process."""
    faults, = _in_a_fresh_process(STEP_TRIAL)
    assert faults <= 256, faults
