"""torch.compile for the frozen encoder: whether it pays for a run (`extract.compile`), and the compiled module.

A compiled graph (inductor, with `freezing`: the weights become constants, so the convolutions' weights
are pre-packed once) can run faster than eager PyTorch, but compiling costs seconds to minutes, once per
process and input shape. It pays only when the run is long enough to win that back:

    images x (1 / eager rate) x (1 - 1 / speed-up)  >  compile seconds

`auto` compiles when the images still to do reach MIN_IMAGES for the device, the break-even of that
inequality at the figures measured (CPU: `pipeline bench extract` on this project's
2-core machine; CUDA: published figures, untested here). The features agree with eager ones to float rounding (~1e-6, far below
float16 storage), and nothing about compiling is in the cache's record: a cache extracted either way is
the same cache.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from pipeline.core.runtime import decide_compile, first_compiled_call

# Images to do from which `auto` compiles (None: never), per device type, with the figures that set them
# (`pipeline bench extract`, 1,000 Flickr8k photos, batch 64, 2 threads; README's benchmark table):
# - cpu: the compiled resnet18 ran at 0.85-0.92x eager in three runs (0.95-1.06x in probes); lite0 at 1.25x, 1.07x
#   and 0.86x, a gain no larger than the machine's drift, for 4-13 s of compiling (minutes on a busy machine): never.
# - cuda (untested here): timm's tables (resnet50 5.1k -> 8.2k images/s, RTX 4090) save 0.07 ms an image; at ~60 s
#   of compiling, break-even is ~800k images, beyond COCO (123k): only the largest datasets compile by default.
MIN_IMAGES: dict[str, int | None] = {"cpu": None, "cuda": 800_000}


def decide(setting: str, device: torch.device, images: int) -> tuple[bool, str]:
    """(compile or not, why in a few words) for `images` still to encode on `device`; `setting`: auto, true or
    false (extract.compile)."""
    return decide_compile(setting, device, images, MIN_IMAGES, "images", "the encoder (`pipeline bench extract`)")


class Compiled(nn.Module):
    """`encoder` compiled for one batch size (inductor, freezing on): a shorter batch (a chunk's or the run's
    last) is padded to it, so the whole run uses one graph instead of compiling again for each new size.

    The first call compiles; `compile_seconds` then says how long that took. When compiling fails (no C++
    compiler, an unsupported operator) the encoder runs eagerly if `fallback`, else the error is one line."""

    def __init__(self, encoder: nn.Module, batch_size: int, fallback: bool = False, log=None):
        super().__init__()
        self.encoder, self.batch_size, self.fallback = encoder, batch_size, fallback
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.compiled = torch.compile(encoder, dynamic=False)
        self.compile_seconds: float | None = None
        self.eager = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if self.eager or n > self.batch_size:
            return self.encoder(images)
        if n < self.batch_size:  # (B, 3, S, S) -> (batch_size, 3, S, S): zero pictures after the real ones
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        images = images.contiguous()  # one input layout: a graph compiled for one stride pattern
        if self.compile_seconds is not None:
            return self.compiled(images)[:n]
        return self._first(images)[:n]

    def _first(self, images: torch.Tensor) -> torch.Tensor:
        def call():
            with torch._inductor.config.patch(freezing=True):
                return self.compiled(images)

        out, self.compile_seconds = first_compiled_call(call, self.fallback, "the encoder", self.log,
                                                        f" (batch {self.batch_size})")
        if self.compile_seconds is None:
            self.eager = True
            return self.encoder(images)
        return out


def maybe_compile(encoder: nn.Module, setting: str, device: torch.device, images: int, batch_size: int, log=None) -> tuple[nn.Module, bool, str]:
    """(`encoder`, compiled when `decide` says so (`auto` falls back to eager where compiling fails), whether
    it was, the decision's note for the caller to log)."""
    on, why = decide(setting, device, images)
    if on:
        encoder = Compiled(encoder, max(1, min(batch_size, images)), fallback=setting == "auto", log=log)
    return encoder, on, why
