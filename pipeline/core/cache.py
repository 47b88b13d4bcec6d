"""The cache folder's contract between the stages: file names, the encoder record, the features' attributes.

prepare writes manifest.json, vocab.json and LABELS_NAME; extract writes FEATURES_NAME with the
EncoderSpec in its attributes; train, evaluate and caption read them. Keeping the names and the record
here lets stage 2 read stage 1's output without importing stage 1.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from pipeline.core.errors import PipelineError

FEATURES_NAME = "features.h5"
LABELS_NAME = "labels.h5"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild the exact encoder: stored in the feature cache and in checkpoints."""

    arch: str
    weights: str  # "imagenet:<torchvision enum name>", "none:seed=<n>", or "file:<name>"
    weights_sha256: str  # of the local file; "" otherwise
    weights_path: str  # where the local file was (a hint for `caption`); "" otherwise
    resize: int
    crop: int
    feature_dim: int

    def as_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The fields that decide the features' values (not where a weights file happened to live)."""
        d = asdict(self)
        d.pop("weights_path")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderSpec:
        return cls(arch=str(d["arch"]), weights=str(d["weights"]), weights_sha256=str(d.get("weights_sha256", "")),
                   weights_path=str(d.get("weights_path", "")), resize=int(d["resize"]), crop=int(d["crop"]),
                   feature_dim=int(d["feature_dim"]))


def read_features_attrs(path: str | os.PathLike) -> dict:
    """The attributes of an existing features.h5 (one clear error if it is not one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise PipelineError(f"{path} is not a readable HDF5 file ({e}): delete it, or rerun extract with --force") from None


def describe_difference(old: dict, new: dict) -> str:
    """One line naming which settings differ, e.g. `encoder.arch: resnet18 -> resnet50`."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(old), flat(new)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
