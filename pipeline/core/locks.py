"""One run at a time per output: a lock beside each file or folder a stage writes.

Two runs writing the same cache or checkpoint folder would each redo the work and then trip over the
other's files. `hold(target)` takes an exclusive lock on `.<name>.lock` beside `target` without
waiting: a second run is refused at once, with the pid and host of the run that holds it (read from
`.<name>.lock.owner`, written by the holder). The lock is an fcntl lock (the `filelock` package): the
kernel releases it when its process dies, so a run killed with kill -9 never blocks the next one; the
owner file it leaves is only ever read for a message.

Under torchrun only rank 0 takes the lock (the stages call `hold` inside `Context.decide`), so the
ranks of one job never block each other while a second job is still refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.core.errors import PipelineError
from pipeline.core.storage import disk_error, place_todo


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock")


def _owner_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".owner")


def _describe_owner(lock: Path) -> str:
    try:
        owner = json.loads(_owner_path(lock).read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"]))
        return f"pid {owner['pid']} on host {owner['host']}, started {started}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not yet said who it is"


@contextlib.contextmanager
def hold(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock of `target` (a file or folder a stage writes) for the body, or refuse at once.

    `what` names the option that chose `target` (e.g. "--out"), for the message. Creates the folder
    the lock lives in, so this is also the first check that the output place is writable."""
    lock = lock_path(target)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        flock = FileLock(lock, timeout=0, thread_local=False)
        flock.acquire()
    except Timeout:
        raise PipelineError(f"{target} is in use by another run ({_describe_owner(lock)}): wait for it to finish "
                            f"or stop it, or use another {what}") from None
    except OSError as e:
        raise disk_error(e, lock.parent, place_todo(e, what)) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                 "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]}
        try:
            _owner_path(lock).write_text(json.dumps(owner) + "\n")
        except OSError as e:
            raise disk_error(e, lock.parent, place_todo(e, what)) from None
        yield lock
    finally:
        with contextlib.suppress(OSError):
            _owner_path(lock).unlink()  # before the release: a next holder's file is never the one removed
        flock.release()


def hold_all(stack: contextlib.ExitStack, targets: list[tuple[str | os.PathLike, str]]) -> None:
    """Enter `hold` for each distinct (target, what) on `stack`; the same path twice is locked once."""
    seen = set()
    for target, what in targets:
        key = lock_path(target)
        if key not in seen:
            seen.add(key)
            stack.enter_context(hold(target, what))
