"""Which images changed since their features were extracted.

The manifest fingerprint covers only (id, file): a folder of new pictures under the old names would
pass it. So every row of features.h5 (and of each part) also records what its image file was when it
was read: `file_size` and `mtime_ns` (one stat, cheap enough for every run), and with `verify: hash`
the content's `sha256`. A rerun stats every image again; rows whose record differs are recomputed.
A file that could not be stat'ed records -1, so it counts as changed once it appears.
"""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np

STAT_KEYS = ("file_size", "mtime_ns", "sha256")
VERIFY_CHOICES = ("stat", "hash")
NOT_REGULAR = b"not-a-regular-file"  # the sha256 record of a FIFO, socket or device: pinned down, never read


def _sha256(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest().encode()


def image_stats(paths: list[str], with_hash: bool) -> dict[str, np.ndarray]:
    """file_size (N,) int64, mtime_ns (N,) int64, sha256 (N,) S64 (b"" unless `with_hash`) of `paths`;
    -1 / b"" for a file that cannot be read now; NOT_REGULAR as the hash of one that is no regular file (FIFO,
    device): it is never read."""
    size = np.full(len(paths), -1, dtype=np.int64)
    mtime = np.full(len(paths), -1, dtype=np.int64)
    sha = np.zeros(len(paths), dtype="S64")
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
            size[i], mtime[i] = st.st_size, st.st_mtime_ns
            if with_hash:  # a FIFO is never read (it would block forever): decoding records why it failed
                sha[i] = _sha256(p) if stat.S_ISREG(st.st_mode) else NOT_REGULAR
        except OSError:
            pass
    return {"file_size": size, "mtime_ns": mtime, "sha256": sha}


def changed_rows(old: dict[str, np.ndarray], now: dict[str, np.ndarray], verify: str) -> np.ndarray:
    """(N,) bool: rows whose image differs from what was recorded. With `verify == "hash"` a row
    without a recorded hash counts as changed (its content was never pinned down)."""
    changed = (old["file_size"] != now["file_size"]) | (old["mtime_ns"] != now["mtime_ns"])
    if verify == "hash":
        changed |= (old["sha256"] != now["sha256"]) | (old["sha256"] == b"")
    return changed


def read_stats(f) -> dict[str, np.ndarray] | None:
    """The per-row records of an open features.h5 or part (h5py.File or np.load result); None for a
    file written before they existed."""
    keys = f.keys() if hasattr(f, "keys") else f.files
    if not all(k in keys for k in STAT_KEYS):
        return None
    return {k: np.asarray(f[k][:]) for k in STAT_KEYS}
