"""The decoder a ModelConfig names (`train.decoder`): one place that maps the name to the class."""

from __future__ import annotations

from torch import nn

from pipeline.decoder.attend import AttendDecoder
from pipeline.decoder.model import CaptionDecoder, ModelConfig


def make_decoder(cfg: ModelConfig) -> nn.Module:
    """A fresh decoder for `cfg`: Show-and-Tell (pooled features) or soft attention over the grid."""
    return AttendDecoder(cfg) if cfg.decoder == "attend" else CaptionDecoder(cfg)
