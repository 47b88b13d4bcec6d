"""evaluate's settings (params.yaml section `evaluate`; caption reads its decoding settings too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.manifest import SPLITS
from pipeline.core.settings import setting
from pipeline.decoder.decode import DecodeConfig
from pipeline.decoder.metrics import TOKENIZERS


@dataclass
class EvaluateConfig(DecodeConfig):
    SECTION: ClassVar[str] = "evaluate"

    split: str = setting("test", "Which split of the cache to score.", choices=SPLITS)
    tokenizer: str = setting("auto", "auto: pycocoevalcap's PTB tokenizer when Java is present, else a "
                             "pure-Python one.", choices=TOKENIZERS)
    max_images: int = setting(0, "Score only the first N images of the split (0: all).", min=0)
