"""What an encoder family provides, and what the generic encoder (encoder.py) asks it for.

A family is one module (resnet.py is one) with the names of `Family`; archs.py lists the families and maps
each arch to its own. The rest is shared: the --weights value resolved to the record (EncoderSpec), a
weights file checked against its sha256 and read, normalisation on the device, encoding batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

# The ImageNet channel statistics (pixels scaled to [0, 1]) that torchvision's classifiers normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Family(Protocol):
    NAME: str  # recorded in EncoderSpec.family
    FEATURE_DIMS: dict[str, int]  # arch -> D of its pooled features: the archs this family builds
    MEAN: tuple[float, float, float]  # the normalisation its weights were trained with (pixels in [0, 1])
    STD: tuple[float, float, float]

    def named_weights(self, arch: str, weights: str) -> str | None:
        """The record ("imagenet:<name>") of the published weights that the --weights value `weights` names,
        or None when it names none (then it is a file). Nothing is downloaded."""
        ...

    def recipe(self, arch: str, weights: str) -> tuple[int, int, str]:
        """(resize, crop, interpolation) of the evaluation transforms the weights were made for."""
        ...

    def backbone(self, arch: str, named: str | None) -> nn.Module:
        """`arch` without its classifier head, normalised images (B, 3, S, S) -> last map (B, D, h, w): with the published
        weights `named` (a record's text after "imagenet:"), or randomly initialised for None (the caller seeds)."""
        ...

    def load_state(self, arch: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        """The headless `arch` holding `state`, a state dict read from `path`; PipelineError when it does not fit."""
        ...
