"""prepare's settings (params.yaml section `prepare`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.settings import Settings, setting

DATASETS = ("coco", "karpathy", "flickr8k")


@dataclass
class PrepareConfig(Settings):
    SECTION: ClassVar[str] = "prepare"

    dataset: str = setting("coco", "Annotation format: COCO captions JSON, Karpathy's dataset_*.json, or "
                           "Flickr8k's token file (or its folder).", choices=DATASETS)
    annotations: list[str] = setting([], "Annotation file (or Flickr8k folder). Repeat for several "
                                     "(e.g. COCO train + val).", required=True)
    images: list[str] = setting([], "Image folder. Repeat for several (e.g. train2014 and val2014).", required=True)
    vocab: str = setting("", "Encode the captions with this vocabulary (a vocab.json or a checkpoint) instead of "
                         "building one from the train split: for a dataset only evaluated on, e.g. COCO val2017.")
    vocab_threshold: int = setting(5, "Keep words seen at least this often in the training captions.", min=1)
    max_length: int = setting(20, "Cut captions to this many words (20 keeps ~99% of COCO captions whole).", min=1)
    strict: bool = setting(False, "Fail when an annotated image is missing on disk (default: skip and count).",
                           flag="--strict")
    allow_outside: bool = setting(False, "Read images whose annotated path leads outside every --images folder "
                                  "(an absolute path or one climbing out with ..); refused by default.",
                                  flag="--allow-outside")
