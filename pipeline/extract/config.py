"""extract's settings (params.yaml section `extract`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.runtime import AMP_CHOICES, DEVICE_HELP
from pipeline.core.settings import Settings, setting

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig(Settings):
    SECTION: ClassVar[str] = "extract"

    arch: str = setting("resnet152", "Frozen ImageNet ResNet.", choices=ARCHS)
    weights: str = setting("imagenet", "'imagenet' (torchvision's IMAGENET1K weights, downloaded once into its "
                           "cache), a path to a local state-dict file, or 'none' (seeded random init, offline).")
    resize: int = setting(256, "Resize the shorter side to this many pixels...", min=1)
    crop: int = setting(224, "...then center-crop a square this size.", min=1)
    dtype: str = setting("float16", "Storage type of the features.", choices=DTYPES)
    batch_size: int = setting(64, "Images per forward pass.", min=1)
    chunk_size: int = setting(1024, "Rows per durable chunk: an interrupted run loses at most one chunk of work.",
                              min=1)
    workers: int | None = setting(None, "DataLoader decode workers [default: 1 on CPU, cores-1 on CUDA].", min=0)
    device: str = setting("auto", DEVICE_HELP)
    amp: str = setting("auto", "Autocast precision on CUDA (auto: bf16 where supported). Ignored on CPU.",
                       choices=AMP_CHOICES)
