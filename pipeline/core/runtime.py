"""Runtime choices made in one place: which device a process uses, how many decode workers, which autocast.

Every stage asks here, so `--device`, `--amp` and the worker count mean the same thing everywhere and a
torchrun rank always lands on its own GPU.
"""

from __future__ import annotations

import os
import re

import torch

from pipeline.core.errors import PipelineError

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def choose_device(device: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device of this process.

    `device`: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N". Under torchrun pass
    the rank's LOCAL_RANK: "auto" and "cuda" then mean that rank's own GPU. Anything else (a typo such
    as "gpu", or CUDA on a machine without it) is refused with a message that says what to pass.
    """
    device = (device or "auto").strip()
    if not _DEVICE.match(device):
        raise PipelineError(f"--device {device!r} is not a device: use {DEVICE_HELP.rstrip('.')}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """Image-decode worker processes: on the CPU decoding competes with the network's own threads and one
    worker keeps the pipe full; on CUDA, every core but one decodes."""
    return max(1, min(cpu_count() - 1, 16)) if device.type == "cuda" else 1


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device`: None on the CPU or with "none"; "auto" is bf16 where the
    GPU supports it, else fp16."""
    if amp not in AMP_CHOICES:
        raise PipelineError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, amp: str):
    """The autocast context for `--amp` on `device` (disabled where amp_dtype is None)."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
