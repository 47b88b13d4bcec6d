"""The cache folder's contract between the stages: file names, the encoder record, the features' attributes.

prepare writes manifest.json, vocab.json and LABELS_NAME; extract writes FEATURES_NAME with the
EncoderSpec in its attributes; train, evaluate and caption read them. Keeping the names and the record
here lets stage 2 read stage 1's output without importing stage 1.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError

FEATURES_NAME = "features.h5"
GRID_NAME = "grid"  # features.h5's dataset of region features (N, G*G, D), there when extracted with features: grid
LABELS_NAME = "labels.h5"
VOCAB_NAME = "vocab.json"  # here, not only in vocab.py, so that extract can name it without importing nltk


def checksummed(n_rows: int) -> dict:
    """create_dataset keywords for HDF5's per-chunk fletcher32 checksum, so that a flipped byte in a
    cache file fails the read (OSError) instead of returning garbage that trains a NaN model.
    The filter needs chunks, which an empty dataset cannot have; variable-length strings take no filter."""
    return {"fletcher32": True} if n_rows > 0 else {}


@contextlib.contextmanager
def reading(path: str | os.PathLike, rebuild: str) -> Iterator[None]:
    """Turn an HDF5 read error inside the block (checksum mismatch, damaged metadata) into one
    PipelineError naming the file and the command `rebuild` that writes it again."""
    try:
        yield
    except OSError as e:
        first = (str(e).strip().splitlines() or ["read error"])[0][:160]
        raise PipelineError(f"{path} is damaged ({first}): rebuild it with `{rebuild}`") from None


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
    interpolation: str = "bilinear"  # PIL resampling filter of the resize (the weights' recipe unless overridden)
    draft: bool = True  # JPEGs decoded at a reduced scale (libjpeg draft) when that still covers `resize`
    family: str = "resnet"  # the arch's family (pipeline/encoder/archs.py); records before families were ResNets
    grid_size: int = 0  # G > 0: the last block's map is also kept, average-pooled to G x G regions (0: pooled only)

    def as_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The fields that decide the features' values (not where a weights file happened to live, nor the
        family, which the arch names: so records made before families existed compare equal)."""
        d = asdict(self)
        d.pop("weights_path")
        d.pop("family")
        if not self.grid_size:
            d.pop("grid_size")  # pooled-only records made before grids existed compare equal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderSpec:
        return cls(arch=str(d["arch"]), weights=str(d["weights"]), weights_sha256=str(d.get("weights_sha256", "")),
                   weights_path=str(d.get("weights_path", "")), resize=int(d["resize"]), crop=int(d["crop"]),
                   feature_dim=int(d["feature_dim"]), interpolation=str(d.get("interpolation", "bilinear")),
                   draft=_as_bool(d.get("draft", True)), family=str(d.get("family", "resnet")),
                   grid_size=int(d.get("grid_size", 0)))


def _as_bool(value) -> bool:
    """HDF5 attributes store booleans as numpy bools or strings ("True")."""
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1")


def cache_member(path: str | os.PathLike, name: str, what: str) -> Path:
    """`path` itself when it names a .json file, else the file `name` in the cache folder `path` (even one not
    made yet, so the hint names it); one line saying to run prepare when it is missing."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / name
    if not path.exists():
        raise PipelineError(f"no {what} at {path}: run `pipeline prepare --out-dir {path.parent}` first")
    return path


UNKNOWN_REBUILD = "the `pipeline extract` command that made it, plus --force"


def read_features_attrs(path: str | os.PathLike, rebuild: str = "") -> dict:
    """The attributes of an existing features.h5 (one clear error if it is not one, saying to run `rebuild`:
    a command that writes it again, when the caller knows one; see `extract_command`)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        how = f"`{rebuild}`" if rebuild else UNKNOWN_REBUILD
        raise PipelineError(f"{path} is not a readable HDF5 file ({e}): rebuild it with {how}") from None


def weights_flag(spec: EncoderSpec) -> str:
    """The --weights value that gives `spec`'s record again: the torchvision weights' own name
    (imagenet:ResNet18_Weights.IMAGENET1K_V1 -> IMAGENET1K_V1), none, or the local file's path."""
    kind, _, named = spec.weights.partition(":")
    if kind == "imagenet":
        return named.rsplit(".", 1)[-1]
    if kind == "none":
        return "none"
    return spec.weights_path or named  # a file: where it was when the features were made


def extract_command(cache_dir: str | os.PathLike, spec: EncoderSpec, dtype: str,
                    out: str | os.PathLike | None = None) -> str:
    """The `pipeline extract ... --force` command that rebuilds a feature file holding `spec`'s features in
    `dtype`: every setting that decides them spelled out, since extract's defaults (resnet152, imagenet)
    would build another cache. Messages about a damaged or unusable cache quote it."""
    q = shlex.quote
    where = f" --out {q(str(out))}" if out is not None and Path(out) != Path(cache_dir) / FEATURES_NAME else ""
    return (f"pipeline extract --cache-dir {q(str(cache_dir))}{where} --arch {spec.arch} --weights "
            f"{q(weights_flag(spec))} --resize {spec.resize} --crop {spec.crop} --interpolation {spec.interpolation}"
            f"{'' if spec.draft else ' --no-draft'}{f' --features grid --grid-size {spec.grid_size}' if spec.grid_size else ''}"
            f" --dtype {dtype} --force")


def rebuild_command(cache_dir: str | os.PathLike, attrs: dict, out: str | os.PathLike | None = None,
                    dtype: str | None = None) -> str:
    """`extract_command` for the feature file whose attributes (read_features_attrs: every file extract writes
    holds the encoder record) are `attrs`, in its own dtype unless `dtype` says another."""
    return extract_command(cache_dir, EncoderSpec.from_dict(attrs), dtype or str(attrs.get("dtype", "float16")), out)


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
