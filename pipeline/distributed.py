"""torch.distributed glue: which process am I, and wait for the others.

Launched by `torchrun`, the environment carries RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous
address; a plain `pipeline ...` run is rank 0 of 1 and every call here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


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

    def barrier(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.barrier()


def context() -> Context:
    """The process's place in the job, initializing the process group on first use under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend)
    return Context(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))
