"""One copy of the feature matrix per machine, however many torchrun ranks train on it.

features.h5 keeps its chunked layout (so it can carry checksums), which cannot be memory-mapped. So under
torchrun the local rank 0 of each machine copies the features once, chunk by chunk, into a raw `.npy`
file in shared memory (/dev/shm, or $PIPELINE_SHM_DIR), written atomically and named by the cache file's
identity (path, size, mtime, settings fingerprint); every local rank memory-maps it read-only, and once
all have mapped it, local rank 0 unlinks it: the mappings keep the pages alive until the ranks exit, and
nothing is left in /dev/shm even when a rank is killed later. A leftover of a run killed in the few
seconds between writing and unlinking has the same name and is reused (its header is checked) rather
than copied again. The ranks then share one set of pages: with W ranks each one's proportional set
size (PSS) holds 1/W of the features instead of all of them.

Where shared memory lacks the room (or cannot be written), every rank reads its own copy, as one
process always does: correctness never depends on /dev/shm.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.fileio import atomic_path

ROWS_PER_COPY = 8192  # rows copied per step: (8192, 2048) float16 = 32 MB in flight, never the whole matrix
HEADROOM = 64 << 20  # bytes shared memory must keep free beyond the copy


def shm_dir() -> Path:
    return Path(os.environ.get("PIPELINE_SHM_DIR", "/dev/shm"))


def shared_path(features_path: Path, fingerprint: str) -> Path:
    """The shared copy's name: changes whenever features.h5 is rewritten (size, mtime) or made otherwise."""
    st = features_path.stat()
    key = f"{features_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{fingerprint}"
    return shm_dir() / f"pipeline-features-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"


def read_features(ds: h5py.Dataset, features_path: Path, fingerprint: str,
                  dist: distributed.Context | None = None) -> torch.Tensor:
    """features.h5's `features` dataset `ds` (N, D) as a tensor in its stored dtype.

    One process: read into this process's memory. Under torchrun: memory-mapped from the machine's one
    shared copy (read-only: the training code indexes it, which copies, and never writes into it)."""
    dist = dist or distributed.context()
    if not dist.enabled:
        return torch.from_numpy(ds[:])
    path = shared_path(features_path, fingerprint)
    if dist.local_rank == 0:
        _write_shared(ds, path)
    dist.barrier()  # the copy exists (or local rank 0 gave up) before anyone maps it
    arr = _map(path, ds.shape, ds.dtype)
    dist.barrier()  # every local rank has mapped it: the name can go
    if dist.local_rank == 0:
        path.unlink(missing_ok=True)
    if arr is None:  # no shared copy on this machine: the one-process way
        return torch.from_numpy(ds[:])
    with warnings.catch_warnings():  # the tensor is read-only in fact; torch warns that numpy says so
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _write_shared(ds: h5py.Dataset, path: Path) -> None:
    """Local rank 0: copy `ds` into `path` (.npy), unless a matching copy is there or there is no room."""
    if _map(path, ds.shape, ds.dtype) is not None:
        return
    try:
        need = int(np.prod(ds.shape)) * ds.dtype.itemsize + HEADROOM
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < need:
            return
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=ds.dtype, shape=ds.shape)
            for s in range(0, ds.shape[0], ROWS_PER_COPY):
                e = min(s + ROWS_PER_COPY, ds.shape[0])
                ds.read_direct(out, np.s_[s:e], np.s_[s:e])
            out.flush()
            del out
    except OSError:  # shared memory full or not writable: every rank reads its own copy instead
        path.unlink(missing_ok=True)


def _map(path: Path, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """`path` memory-mapped read-only, or None when it is missing or not a (shape, dtype) .npy file."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == tuple(shape) and arr.dtype == dtype else None
