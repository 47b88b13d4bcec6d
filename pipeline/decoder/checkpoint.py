"""Decoder checkpoints: plain dicts of tensors and JSON-like values, never pickled modules.

Loading uses `torch.load(weights_only=True)`, so a file carrying any other Python object is refused
instead of executed. A checkpoint holds everything `caption` needs to rebuild the exact pipeline:
the decoder weights and settings, the vocabulary, and the encoder settings copied from the cache.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from pipeline.core.cache import EncoderSpec
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_path
from pipeline.core.vocab import Vocabulary
from pipeline.decoder.model import CaptionDecoder, ModelConfig

FORMAT = "pipeline.decoder/1"
REQUIRED = ("format", "model", "model_config", "vocab", "encoder", "epoch", "step")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path}: train one with `pipeline train`, or pass --checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise PipelineError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                            f"({first[:160]}). Only checkpoints written by `pipeline train` are accepted") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file
        raise PipelineError(f"cannot read {path} as a checkpoint ({type(e).__name__}): it may be truncated; "
                            f"retrain or use another file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or any(k not in ckpt for k in REQUIRED):
        raise PipelineError(f"{path} is not a `pipeline train` checkpoint (format {FORMAT}): missing or unexpected content")
    return ckpt


def restore_decoder(ckpt: dict, device: torch.device | str = "cpu") -> tuple[CaptionDecoder, Vocabulary, EncoderSpec]:
    """The decoder (eval mode), vocabulary and encoder spec recorded in a loaded checkpoint."""
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        model = CaptionDecoder(cfg)
        model.load_state_dict(ckpt["model"])
        vocab = Vocabulary(ckpt["vocab"])
        encoder = EncoderSpec.from_dict(ckpt["encoder"])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise PipelineError(f"the checkpoint's content does not fit together ({type(e).__name__}: "
                            f"{str(e)[:200]}): retrain it") from None
    return model.to(device).eval(), vocab, encoder
