"""scst's settings (params.yaml section `scst`): self-critical training after cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.runtime import COMPILE_CHOICES, DEVICE_HELP
from pipeline.core.settings import Settings, setting

BASELINES = ("loo", "greedy")


@dataclass
class ScstConfig(Settings):
    SECTION: ClassVar[str] = "scst"

    epochs: int = setting(5, "Passes over the training images (0: keep the cross-entropy decoder as it is).", min=0)
    batch_size: int = setting(50, "Images per batch (each sampled `samples` times).", min=1)
    samples: int = setting(5, "Captions sampled per image (multinomial).", min=1)
    baseline: str = setting("loo", "loo: the mean reward of the image's other samples (Luo 2020); greedy: the "
                            "reward of the image's greedy caption (Rennie et al. 2017).", choices=BASELINES)
    lr: float = setting(5e-5, "Adam's learning rate.", min=0, min_open=True)
    clip: float = setting(5.0, "Max gradient norm (0: off).", min=0)
    max_length: int = setting(20, "Longest sampled (and validation) caption, in words.", min=1)
    val_images: int = setting(5000, "Validation images decoded per epoch for CIDEr/BLEU-4 (0: all).", min=0)
    seed: int = setting(0, "Seed of the batch order and the sampling.")
    compile: str = setting("auto", "torch.compile the decoder's per-word step for sampling (inductor, dynamic "
                           "shapes): true, false, or auto (compile when the captions to sample repay its compile "
                           "time, as measured by `pipeline bench scst`; see pipeline/scst/sample.py).",
                           choices=COMPILE_CHOICES)
    device: str = setting("auto", DEVICE_HELP)
