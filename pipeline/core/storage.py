"""Disk checks made before long runs, and one clear line when a write fails anyway.

A run that would fill the disk or write into a read-only folder should say so before it spends an
hour on work it cannot keep, and a write that still fails (the disk filled up meanwhile) should end
in one line that says where and what to do, not in a traceback from deep inside h5py or torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.fileio import temp_glob

# errno -> what it means for the user, in words
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def existing_parent(path: str | os.PathLike) -> Path:
    """`path` or its nearest existing ancestor (the folder whose file system a new file lands on)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def check_free_space(folder: str | os.PathLike, need: int, what: str, todo: str) -> None:
    """Refuse (PipelineError) when `folder`'s file system has less than `need` bytes free.

    `what` says what needs the space ("the cache needs about 1000 x 512 x 2 bytes"), `todo` what to do."""
    free = free_bytes(folder)
    if free < need:
        raise PipelineError(f"not enough free space in {existing_parent(folder)}: {what} = {human_bytes(need)}, "
                            f"but only {human_bytes(free)} is free: {todo}")


def ensure_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` if needed and prove that a file can be written in it; refuse in one line if not.

    `what` names the option that chose the folder (e.g. "--out"), so the message says what to change."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}.tmp"
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)  # a block, not just an inode: a full disk fails here
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink()
        except (OSError, UnboundLocalError):
            pass
        raise disk_error(e, folder, place_todo(e, what)) from None
    return folder


def place_todo(e: OSError, what: str) -> str:
    """What to do when the folder an option (`what`, e.g. "--out") chose cannot be written."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space, or choose another {what} on a disk with room"
    return f"choose a writable {what}"


def disk_error(e: OSError, path: str | os.PathLike, todo: str) -> PipelineError:
    """An OSError from writing `path` as one line: what happened, where, what to do."""
    reason = DISK_ERRORS.get(e.errno) or (e.strerror or str(e))
    free = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {human_bytes(free_bytes(path))} free"
        except OSError:
            pass
    return PipelineError(f"cannot write {path}: {reason} ({os.strerror(e.errno) if e.errno else e}{free}): {todo}")


def errno_of(e: BaseException) -> int | None:
    """The errno behind `e`: its own, or the one h5py and torch's zip writer only quote in their message."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    text = str(e)
    m = re.search(r"errno\s*=\s*(\d+)", text)
    if m:
        return int(m.group(1))
    for code in DISK_ERRORS:
        if os.strerror(code) in text:
            return code
    return None


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRORS


def as_disk_error(e: BaseException, path: str | os.PathLike, todo: str) -> PipelineError | None:
    """`e` as one line (see disk_error) when a full, read-only or forbidden disk caused it, else None.

    torch.save reports a full disk as `RuntimeError: ... unexpected pos`, naming no errno: then a disk
    with (nearly) no space left is taken as the cause."""
    code = errno_of(e)
    if code is None and isinstance(e, RuntimeError) and "unexpected pos" in str(e):
        code = errno.ENOSPC
    if code not in DISK_ERRORS:
        return None
    return disk_error(OSError(code, os.strerror(code)), path, todo)


@contextlib.contextmanager
def reporting_disk_errors(path: str | os.PathLike, todo: str) -> Iterator[None]:
    """Turn a write failure caused by the disk (full, read-only, forbidden) in the body into one line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        err = as_disk_error(e, path, todo)
        if err is None:
            raise
        raise err from None


def remove_stale_temps(folder: str | os.PathLike, names: list[str]) -> list[Path]:
    """Delete the temp files `atomic_path` leaves beside `folder/NAME` when a writer is killed (kill -9,
    power loss): `.NAME.<random>.tmp`, for these NAMES only. Call it only while holding the folder's lock,
    so no live run's temp file is taken away. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for tmp in folder.glob(temp_glob(name)):
            try:
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass  # not ours to fight over: a later run tries again
    return removed
