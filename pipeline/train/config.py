"""train's settings (params.yaml section `train`): the decoder's shape and how it is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.distributed import DIST_TIMEOUT_HELP, DIST_TIMEOUT_MINUTES
from pipeline.core.runtime import AMP_CHOICES, DEVICE_HELP
from pipeline.core.settings import setting
from pipeline.decoder.model import ModelSettings


@dataclass
class TrainConfig(ModelSettings):
    SECTION: ClassVar[str] = "train"

    epochs: int = setting(10, "Passes over the training captions.", min=1)
    batch_size: int = setting(128, "Captions per batch.", min=1)
    lr: float = setting(1e-3, "Adam's learning rate.", min=0, min_open=True)
    amsgrad: bool = setting(False, "Use Adam's AMSGrad variant.", flag="--amsgrad")
    weight_decay: float = setting(0.0, "Adam's L2 weight decay.", min=0)
    label_smoothing: float = setting(0.0, "Label smoothing of the training loss (validation's stays plain).",
                                     min=0, max=1, max_open=True)
    clip: float = setting(5.0, "Max gradient norm (0: off).", min=0)
    lr_decay: float = setting(1.0, "Multiply the learning rate by this every lr_decay_every epochs.",
                              min=0, max=1, min_open=True)
    lr_decay_every: int = setting(1, "Epochs between learning-rate decays.", min=1)
    accumulate: int = setting(1, "Gradient accumulation: one optimizer step every N batches.", min=1)
    patience: int = setting(0, "Early stopping: stop after N epochs without a better validation CIDEr (0: off).",
                            min=0)
    save_every: int = setting(1, "Write last.pt every N epochs (and always after the last one).", min=1)
    print_every: int = setting(100, "Steps between loss updates on the progress bar.", min=1)
    val_images: int = setting(5000, "Validation images decoded per epoch for CIDEr/BLEU-4 (0: all).", min=0)
    max_length: int = setting(20, "Longest caption decoded for validation.", min=1)
    seed: int = setting(0, "Seed of the initialization, the batch order and dropout.")
    device: str = setting("auto", DEVICE_HELP)
    amp: str = setting("auto", "Autocast precision on CUDA. Ignored on CPU.", choices=AMP_CHOICES)
    dist_timeout: float = setting(DIST_TIMEOUT_MINUTES, DIST_TIMEOUT_HELP, min=0, min_open=True)
