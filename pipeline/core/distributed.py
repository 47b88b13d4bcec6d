"""torch.distributed glue: which process am I, wait for the others, and agree with them.

Launched by `torchrun`, the environment carries RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous
address; a plain `pipeline ...` run is rank 0 of 1 and every call here is a no-op (or calls the
function directly), so the one-process code paths stay exactly what they were.

    torchrun --nproc_per_node 4 -m pipeline extract ...        # one machine, 4 processes
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
             --rdzv-id JOB -m pipeline train ...               # two machines

Backend: `nccl` when CUDA is available (each process on GPU LOCAL_RANK), `gloo` on the CPU.
With several machines the cache folder (and --out / --metrics-dir) must be on a filesystem they all
share: ranks write their parts and rank 0 reads them, and every rank reads the cache and last.pt.

Rules the stages follow so that N processes never wait for each other forever:
- A check that may refuse the run or skip it (is the cache up to date? do its settings match? can we
  resume?) is made by rank 0 alone and its outcome is broadcast (`decide`). If it refuses, every
  rank raises the same `SharedError` and all exit together with status 1; no rank is left at a
  barrier while another has gone.
- Work local to one rank (encoding its images, a training step) is not wrapped: when it fails or the
  process is killed, torchrun's agent stops the whole group and the command exits non-zero; running
  it again continues (extract keeps every finished part, train has --resume).
- The process group is destroyed at exit, so torchrun exits 0 and NCCL does not warn about a leak.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from pipeline.core.errors import PipelineError

T = TypeVar("T")


class SharedError(PipelineError):
    """A refusal decided once and raised on every rank alike: only rank 0 needs to print it."""


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def _ready(self) -> bool:
        return self.enabled and tdist.is_initialized()

    def barrier(self) -> None:
        if self._ready():
            if tdist.get_backend() == "nccl":
                tdist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                tdist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (any picklable value; others pass a placeholder)."""
        if not self._ready():
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank. Also a barrier."""
        if not self._ready():
            return [obj]
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over the ranks (a new tensor on `tensor`'s device)."""
        if not self._ready():
            return tensor.clone()
        dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
        t = tensor.detach().to(dev, copy=True)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.to(tensor.device)

    def decide(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and return its result on every rank.

        When `fn` raises a PipelineError, every rank raises SharedError with its message; any other
        exception is re-raised on rank 0 (traceback kept) and becomes a SharedError on the others.
        With one process this is just `fn()`, exceptions unchanged.
        """
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except PipelineError as e:
                self.broadcast(("refused", str(e)))
                raise SharedError(str(e)) from e
            except BaseException as e:
                self.broadcast(("failed", f"rank 0 failed: {type(e).__name__}: {e}"))
                raise
            return self.broadcast(("ok", result))[1]
        kind, value = self.broadcast(None)
        if kind != "ok":
            raise SharedError(value)
        return value


def _timeout() -> timedelta | None:
    """PIPELINE_DIST_TIMEOUT (seconds) bounds how long a rank waits in a collective; torch's default
    (30 min) otherwise. Raise it if rank 0's validation or assembly of a huge cache takes longer."""
    raw = os.environ.get("PIPELINE_DIST_TIMEOUT")
    return timedelta(seconds=float(raw)) if raw else None


def _destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; a broken peer must not turn exit 0 into a crash
            pass


def context() -> Context:
    """The process's place in the job, initializing the process group on first use under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = {"backend": backend}
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)  # binds the group to this GPU from the start
        if _timeout() is not None:
            kwargs["timeout"] = _timeout()
        tdist.init_process_group(**kwargs)
        atexit.register(_destroy)
    return Context(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local_rank)
