"""Runtime choices made in one place: which device a process uses, how many decode workers, which autocast.

Every stage asks here, so `--device`, `--amp` and the worker count mean the same thing everywhere and a
torchrun rank always lands on its own GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time

import torch

from pipeline.core.errors import PipelineError

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
COMPILE_CHOICES = ("auto", "true", "false")  # extract.compile, scst.compile: see decide_compile
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def heap_allocations(on: bool = True) -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (glibc's mallopt); with
    `on=False`, the decoder's setting: blocks from 32 MB up mapped afresh, everything smaller kept on the heap.

    Why: a forward on the CPU allocates and frees activations of up to hundreds of MB per batch; glibc maps
    every block above 32 MB afresh and the kernel page-faults it in again, page by page, at every batch.
    Measured on this project's 2-core CPU (`pipeline bench extract` / `bench train` time both ways):
    resnet18, batch 64, 36.8 -> 52.8 images/s (system time 7.7 s -> 0.06 s); resnet50 12.6 -> 22.0.
    The cost: the process keeps its peak memory until it exits, and where block sizes vary from batch to
    batch the heap fragments and grows (see `tune`).

    Off, blocks from 32 MB up are mapped afresh (where glibc's adaptive threshold settles; mallopt cannot
    restore the adaptive mode itself) and the top of the heap goes back to the system only above 512 MB
    free, not glibc's 64 MB: a training step frees and takes back ~100 MB of blocks under 32 MB (the loss's
    logits come in blocks, model.readout), which glibc would otherwise return and the kernel fault in again
    at every step (bench train's step, 2026-12-03: 15x fewer page faults, 1.03-1.06x). This keeps no more
    than the step's own peak. Returns whether the setting took (False where the C library has no mallopt:
    macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    if on:
        settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
    else:
        settings = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 512 << 20}
    return all([bool(mallopt(key, value)) for key, value in settings.items()])


def tune(device: torch.device, fixed_shapes: bool) -> None:
    """Per-process speed settings for compute on `device`: cuDNN's autotuner on CUDA; on the CPU, heap
    allocations (see heap_allocations) where every batch allocates blocks of the same sizes (`fixed_shapes`:
    the encoder's fixed crops), so that freed blocks are reused exactly. Not for the decoder, whose batches
    vary in caption length: there the heap fragments and grows (one rank on a COCO-sized cache, 40 steps:
    peak 2.9 GB with heap allocations, 1.7 GB without, before the loss came in blocks), so the decoder gets
    heap_allocations(False), also in a process that ran the encoder first."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        heap_allocations(fixed_shapes)


def decide_compile(setting: str, device: torch.device, work: int, least: dict[str, int | None], unit: str,
                   what: str) -> tuple[bool, str]:
    """(torch.compile or not, why in a few words). `setting` true or false decides alone; auto compiles when
    the run's `work` (in `unit`: images to encode, captions to sample) reaches least[device type], the
    break-even of the measured compile time and speed-up of `what` there (None or absent: not measurably
    faster there, or never measured: auto never compiles)."""
    if setting != "auto":
        return setting == "true", f"compile: {setting}"
    at_least = least.get(device.type)
    if at_least is None:
        return False, (f"compile auto -> eager: no measurement shows {what} compiled faster on {device.type}, "
                       f"so nothing says it repays its compile time")
    if work < at_least:
        return False, f"compile auto -> eager: {work} {unit} to do, below the {at_least} that repay compiling"
    return True, f"compile auto -> compiled: {work} {unit} to do, at least the {at_least} that repay compiling"


def first_compiled_call(call, fallback: bool, what: str, log, detail: str = "") -> tuple[object, float | None]:
    """The first call of a torch.compile'd function, which compiles it: (its output, the seconds it took; logged
    as compiling `what`, with `detail`). Where compiling fails (no C++ compiler, an unsupported operator): with
    `fallback` (compile auto) say so and return (None, None) for the caller to run `what` eagerly, else end in
    one line."""
    started = time.perf_counter()
    try:
        out = call()
    except Exception as e:  # noqa: BLE001 - inductor raises many kinds; all mean "cannot compile here"
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not fallback:
            raise PipelineError(f"torch.compile failed ({why}); set compile false (--compile false) to run {what} "
                                f"eagerly") from None
        log(f"torch.compile failed ({why}): running {what} eagerly")
        return None, None
    seconds = time.perf_counter() - started
    log(f"compiled {what} in {seconds:.1f} s{detail}")
    return out, seconds


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Decode workers on the CPU, chosen by measurement (resnet18, batch 64, heap allocations, 2 torch threads on
# 2 cores; steady-state images/s, medians of three interleaved runs of 640 images; the bare forward on
# decoded images in the same runs: 53.8 full-size, 54.4 224-px):
#     workers             0      1      2
#     full-size photos  41.4   50.1   52.6
#     224-px images     49.1   51.5   53.7
# Two workers keep a batch decoded ahead even while the network's threads hold both cores. Also tried and
# slower (full-size): one worker at nice 19 (40.0), 1 torch thread + 1 worker (28.1), two processes of
# 1 thread each decoding their own half (39.2). On a larger CPU `--workers` is worth a try.
CPU_DECODE_WORKERS = 2


def default_workers(device: torch.device) -> int:
    """Image-decode worker processes: on the CPU decoding competes with the network's own threads, and two
    workers were the fastest (CPU_DECODE_WORKERS); on CUDA, every core but one decodes."""
    return max(1, min(cpu_count() - 1, 16)) if device.type == "cuda" else CPU_DECODE_WORKERS


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
