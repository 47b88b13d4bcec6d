"""Decoder checkpoints: plain dicts of tensors and JSON-like values, never pickled modules.

The writer (`write_checkpoint`, used by train and scst) and the reader (`load_checkpoint`, used by
evaluate, caption and resume) live here together, so the format has one home and reading a checkpoint
needs no training code.

Loading uses `torch.load(weights_only=True)`, so a file carrying any other Python object is refused
instead of executed. A checkpoint holds everything `caption` needs to rebuild the exact pipeline:
the decoder weights and settings, the vocabulary, and the encoder settings copied from the cache.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.core import paths
from pipeline.core.cache import EncoderSpec
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_path
from pipeline.core.vocab import Vocabulary
from pipeline.decoder.decoders import make_decoder
from pipeline.decoder.model import ModelConfig

if TYPE_CHECKING:  # the reader must not load the cache code (h5py) for caption
    from pipeline.decoder.data import CaptionData

FORMAT = "pipeline.decoder/1"
REQUIRED = ("format", "model", "model_config", "vocab", "encoder", "epoch", "step")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def write_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, model_cfg: ModelConfig,
                     data: CaptionData, state, rng: dict, record: dict, **extra) -> None:
    """The checkpoint train and scst write (evaluate and caption read either): weights, optimizer, settings,
    vocabulary, encoder record, the cache's fingerprints, the training images (`record`), the run's state
    (a dataclass with epoch and step) and RNG; `extra` names the stage's own settings. Refuses weights
    holding inf/NaN: training diverged, and the last good checkpoint stays."""
    from pipeline.decoder.overlap import RECORD_KEY

    refuse_non_finite(model, path)
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "model_config": model_cfg.as_dict(), **extra,
                           "vocab": list(data.vocab.tokens), "encoder": data.encoder.as_dict(),
                           "cache": {k: v for k, v in data.fingerprints.items() if k != "features_settings"},
                           "epoch": state.epoch, "step": state.step, "train_state": asdict(state), "rng": rng,
                           RECORD_KEY: record})


def refuse_non_finite(model: torch.nn.Module, path: Path) -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PipelineError(f"refusing to write {path}: the decoder holds non-finite values ({', '.join(bad[:3])}); "
                            f"training diverged, check the features or lower --lr")


def same_cache(ckpt: dict, data: CaptionData) -> bool:
    """Whether `ckpt` was trained on this cache's vocabulary and features (their fingerprints)."""
    cache = ckpt.get("cache", {})
    return cache.get("vocab") == data.fingerprints["vocab"] and cache.get("features") == data.fingerprints["features"]


def _missing_hint(path: Path) -> str:
    """What to do about a missing checkpoint: evaluate's and caption's default is SCST's best.pt, which a
    cross-entropy run alone (train without scst) does not make."""
    xe = Path(paths.XE_CHECKPOINT)
    if path == Path(paths.FINAL_CHECKPOINT) and xe.is_file():
        return (f"make it with `pipeline scst` (self-critical training from {xe}), or pass --checkpoint {xe} "
                f"to use the cross-entropy decoder as it is")
    return "train one with `pipeline train` (and `pipeline scst`), or pass --checkpoint"


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path}: {_missing_hint(path)}")
    if not _looks_like_torch_zip(path):
        raise PipelineError(f"{path} is not a checkpoint (not a file that torch.save writes): pass a last.pt or "
                            f"best.pt written by `pipeline train`")
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
    check_content(ckpt, path)
    return ckpt


def needs_grid(ckpt: dict) -> bool:
    """Whether the checkpoint's decoder reads region grids (train.decoder: attend), not only pooled features."""
    return ckpt["model_config"].get("decoder", "showtell") == "attend"


def restore_decoder(ckpt: dict, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Vocabulary, EncoderSpec]:
    """The decoder (eval mode), vocabulary and encoder spec recorded in a loaded checkpoint."""
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        model = make_decoder(cfg)
        model.load_state_dict(ckpt["model"])
        vocab = Vocabulary(ckpt["vocab"])
        encoder = EncoderSpec.from_dict(ckpt["encoder"])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise PipelineError(f"the checkpoint's content does not fit together ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}): retrain it") from None
    return model.to(device).eval(), vocab, encoder


def _looks_like_torch_zip(path: Path) -> bool:
    """torch.save writes a zip archive: a file that does not even start like one is not a checkpoint
    (a truncated one still does, and gets the "may be truncated" message)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def check_content(ckpt: dict, path: str | os.PathLike) -> None:
    """Everything a checkpoint holds must fit together before anything is built from it: the model
    settings, the vocabulary (as long as the output layer), the encoder (its feature size the decoder's
    input) and every weight's shape. One line names the first thing that does not fit."""

    def bad(what: str) -> PipelineError:
        return PipelineError(f"{path} is damaged or was edited: {what}; retrain it or use another checkpoint")

    try:
        cfg = ModelConfig(**ckpt["model_config"])
    except TypeError as e:
        raise bad(f"its model_config is not one ({e})") from None
    sizes = {k: getattr(cfg, k) for k in ("feature_dim", "vocab_size", "embed_size", "hidden_size", "num_layers")}
    wrong = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if wrong:
        raise bad(f"its model_config has sizes that are not positive integers ({', '.join(wrong)})")
    vocab = ckpt["vocab"]
    if not isinstance(vocab, list):
        raise bad("its vocabulary is not a list of words")
    if len(vocab) != cfg.vocab_size:
        raise bad(f"its vocabulary has {len(vocab)} words but its output layer predicts {cfg.vocab_size}")
    try:
        Vocabulary(vocab)
        encoder = EncoderSpec.from_dict(ckpt["encoder"])
    except (TypeError, KeyError, ValueError) as e:
        raise bad(f"its vocabulary or encoder record is invalid ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                  ) from None
    if encoder.feature_dim != cfg.feature_dim:
        raise bad(f"its encoder makes {encoder.feature_dim}-value features but the decoder reads {cfg.feature_dim}")
    if not isinstance(ckpt["model"], dict):
        raise bad("its model weights are not a state dict")
    with torch.device("meta"):  # shapes only: nothing is allocated
        want = {k: tuple(v.shape) for k, v in make_decoder(cfg).state_dict().items()}
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in ckpt["model"].items()}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise bad(f"its weights do not match its model_config ({len(missing)} missing, e.g. {missing[:2]}; "
                  f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for k, shape in want.items():
        if have[k] != shape:
            settings = ", ".join(f"{n}={getattr(cfg, n)}" for n in ("feature_dim", "vocab_size", "embed_size",
                                                                     "hidden_size", "num_layers"))
            raise bad(f"weight {k} has shape {list(have[k]) if have[k] else 'none'} but its model_config "
                      f"({settings}) needs {list(shape)}")
    for k in ("epoch", "step"):
        if not isinstance(ckpt[k], int) or ckpt[k] < 0:
            raise bad(f"its {k} is {ckpt[k]!r}, not a count")
