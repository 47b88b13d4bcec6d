"""The cached dataset the decoder trains on: features.h5 + labels.h5 + vocab.json + manifest.json.

Read once per process (features stay float16 in memory and are converted per batch), so no h5py
handle is ever shared with DataLoader workers: training indexes plain tensors. The region grid
(`features: grid`, G*G times the pooled features' size: 25 GB for COCO) is never held: GridReader reads
each batch's rows from the file, with a handle of its own in every process. Before anything is
trained, `load_cache` checks that the four files belong together and refuses, with a message that
says what to rerun, when they do not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.core import paths
from pipeline.core.cache import (
    FEATURES_NAME,
    GRID_NAME,
    LABELS_NAME,
    EncoderSpec,
    read_features_attrs,
    reading,
    rebuild_command,
)
from pipeline.core.errors import PipelineError
from pipeline.core.manifest import SPLITS, Manifest, check_captions, load_manifest
from pipeline.core.vocab import Vocabulary, tokenize
from pipeline.decoder.shared_features import read_features


class GridReader:
    """features.h5's region features (N, R, D), read by rows, never whole.

    Each process opens its own handle on first use and reopens after a fork (a DataLoader worker, a torchrun
    rank), so no h5py handle is ever shared between processes; what ranks of one machine share is the page
    cache. One HDF5 chunk per image: a batch reads only its own rows (checksums verified on every read)."""

    def __init__(self, path: Path, rebuild: str):
        self.path, self.rebuild = path, rebuild
        with reading(path, rebuild), h5py.File(path, "r") as f:
            self.shape, self.dtype = tuple(f[GRID_NAME].shape), f[GRID_NAME].dtype
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}  # a pickled reader opens its own handle

    def __getitem__(self, rows) -> torch.Tensor:
        """rows (B,) int tensor (any order, repeats allowed) -> (B, R, D) in the stored dtype."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(idx, return_inverse=True)  # each row read once
        if self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        block = np.empty((len(uniq), *self.shape[1:]), self.dtype)  # (U, R, D)
        with reading(self.path, self.rebuild):
            grid = self._file[GRID_NAME]
            for i, row in enumerate(uniq.tolist()):  # one chunk each: 25x faster than h5py's fancy index (0.9 s
                grid.read_direct(block, np.s_[row], np.s_[i])  # for 128 rows of 49 x 1280), which builds a selection
        return torch.from_numpy(block[inverse])


@dataclass
class CaptionData:
    manifest: Manifest
    vocab: Vocabulary
    encoder: EncoderSpec
    features: torch.Tensor  # (N, D) float16 or float32, row i = manifest image i (read-only under torchrun)
    valid: torch.Tensor  # (N,) bool: image decoded fine at extraction
    labels: torch.Tensor  # (M, L) int16 word ids (int32 for vocabularies over 32767), 0-padded, no <start>/<end>
    lengths: torch.Tensor  # (M,) int16 word counts
    caption_image: torch.Tensor  # (M,) int32 row of each caption's image
    image_split: torch.Tensor  # (N,) int8 index into SPLITS
    fingerprints: dict  # what a checkpoint records to recognise this cache
    manifest_path: Path | None = None  # where to read raw captions that load_cache(captions=False) left out
    grid: GridReader | None = None  # (N, R, D) regions, read per batch: loaded for the attention decoder

    def image_inputs(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """What the decoder reads for image `rows` (B,), float32 on `device`: pooled features (B, D), or with
        the grid loaded (B, 1 + R, D), row 0 pooled: the form the encoder gives new images (Encoder)."""
        pooled = self.features[rows]  # (B, D)
        if self.grid is None:
            return pooled.to(device).float()
        grid = self.grid[rows]  # (B, R, D)
        if torch.device(device).type != "cpu":  # moved as stored (half the bytes of float32), converted there
            return torch.cat([pooled.unsqueeze(1), grid], 1).to(device).float()  # (B, 1 + R, D)
        out = torch.empty((len(grid), 1 + grid.shape[1], grid.shape[2]), dtype=torch.float32)  # (B, 1 + R, D)
        out[:, 0], out[:, 1:] = pooled, grid  # converted in the copy: one pass over the batch, not two
        return out

    def image_rows(self, split: str, valid_only: bool = True) -> torch.Tensor:
        """Rows (into features) of the images of `split`."""
        mask = self.image_split == SPLITS.index(split)
        if valid_only:
            mask &= self.valid
        return mask.nonzero().squeeze(1)

    def caption_rows(self, split: str) -> torch.Tensor:
        """Caption indices whose image is in `split` and valid (training never sees a failed image)."""
        img_ok = (self.image_split == SPLITS.index(split)) & self.valid  # (N,)
        return img_ok[self.caption_image].nonzero().squeeze(1)

    def training_rows(self, cache_dir) -> torch.Tensor:
        """caption_rows("train"), refusing (PipelineError) a cache that has none: train, scst and their
        benchmarks would otherwise run on nothing."""
        rows = self.caption_rows("train")
        if len(rows) == 0:
            raise PipelineError(f"{cache_dir} has no training captions with a valid image: check "
                                f"`pipeline prepare`'s summary")
        return rows

    def references(self, rows: torch.Tensor) -> dict[int, list[str]]:
        """Tokenized, space-joined reference captions by row, for scoring (full captions, not cut).

        When load_cache left the raw captions out, only these rows' are read back from the manifest."""
        images = self.manifest.images
        if self.manifest_path is not None:
            images = load_manifest(self.manifest_path, captions={int(r) for r in rows}).images
        return {int(r): [" ".join(tokenize(c)) for c in images[int(r)].captions] for r in rows}


def load_cache(cache_dir: str | os.PathLike = paths.CACHE_DIR, features: str | os.PathLike | None = None,
               captions: bool = True, grid: bool = False) -> CaptionData:
    """The cache in memory, checked for consistency.

    Held compactly, since every torchrun rank holds its own: labels int16 (int32 past 32767 words),
    lengths int16, caption rows int32, converted to int64 per batch where torch needs it (teacher_forcing).
    Under torchrun the features are one shared copy per machine (see shared_features). `captions=False`
    leaves the manifest's raw captions out (train: only rank 0's validation reads them, through
    `references`, which then reads back just the rows it is asked for). `grid`: open the region grid
    (refused, saying how to extract one, when the file has none)."""
    cache_dir = Path(cache_dir)
    features_path = Path(features) if features else cache_dir / FEATURES_NAME
    labels_path = cache_dir / LABELS_NAME
    manifest = load_manifest(cache_dir, captions=captions)
    vocab = Vocabulary.load(cache_dir)
    for path, stage in ((labels_path, "prepare"), (features_path, "extract")):
        if not path.exists():
            raise PipelineError(f"{path} is missing: run `pipeline {stage} --{'out-dir' if stage == 'prepare' else 'cache-dir'} "
                                f"{cache_dir}` first")
    attrs = read_features_attrs(features_path)
    settings = json.loads(attrs.get("settings", "{}") or "{}")
    with reading(labels_path, f"pipeline prepare --out-dir {cache_dir}"), h5py.File(labels_path, "r") as f:
        la = dict(f.attrs)
        ids = np.int16 if len(vocab) <= np.iinfo(np.int16).max else np.int32
        labels = torch.from_numpy(f["labels"].astype(ids)[:])  # converted while read: no int64 copy, ever
        lengths = torch.from_numpy(f["lengths"].astype(np.int16)[:])
        caption_image = torch.from_numpy(f["caption_image"].astype(np.int32)[:])
        image_split = torch.from_numpy(f["image_split"].astype(np.int8)[:])
        label_ids = f["image_ids"][:]
    check_captions(manifest, la, cache_dir)
    rebuild = rebuild_command(cache_dir, attrs, features_path)

    def refuse(what: str, fix: str):
        raise PipelineError(f"{cache_dir} does not hold one consistent cache: {what}. {fix}")

    if str(la.get("vocab_fingerprint")) != vocab.fingerprint or int(la.get("vocab_size", -1)) != len(vocab):
        refuse(f"{labels_path.name} was encoded with another vocabulary than vocab.json",
               "Rerun `pipeline prepare` to rebuild both together")
    if str(la.get("manifest_fingerprint")) != manifest.fingerprint:
        refuse(f"{labels_path.name} belongs to another manifest", "Rerun `pipeline prepare`")
    if attrs.get("manifest_fingerprint") != manifest.fingerprint:
        refuse(f"{features_path.name} was extracted from another manifest (other images or order)",
               f"Rerun `{rebuild}`")
    with reading(features_path, rebuild), h5py.File(features_path, "r") as f:
        if not np.array_equal(f["image_ids"][:], label_ids) or f["features"].shape[0] != len(manifest.images):
            refuse(f"{features_path.name} rows do not match the labels' images", f"Rerun `{rebuild}`")
        feats = read_features(f["features"], features_path, str(attrs.get("settings_fingerprint", "")))  # (N, D)
        valid = torch.from_numpy(f["valid"][:].astype(bool))
    check_finite_features(feats, valid, features_path, rebuild_command(cache_dir, attrs, features_path, dtype="float32"))
    encoder = EncoderSpec.from_dict(attrs)
    reader = open_grid(features_path, cache_dir, encoder, attrs) if grid else None
    fingerprints = {"manifest": manifest.fingerprint, "vocab": vocab.fingerprint,
                    "features": str(attrs.get("settings_fingerprint", "")), "features_settings": settings}
    return CaptionData(manifest, vocab, encoder, feats, valid, labels, lengths, caption_image, image_split, fingerprints,
                       None if captions else cache_dir, reader)


def open_grid(features_path: Path, cache_dir: Path, encoder: EncoderSpec, attrs: dict) -> GridReader:
    """The region grid of `features_path`; one line saying how to extract one when it holds none."""
    if not encoder.grid_size:
        with_grid = rebuild_command(cache_dir, {**attrs, "grid_size": 7}, features_path)
        raise PipelineError(f"{features_path} holds pooled features only; the attention decoder (train.decoder: "
                            f"attend) reads region grids: extract them with `{with_grid}` (extract.features: grid)")
    return GridReader(features_path, rebuild_command(cache_dir, attrs, features_path))


def check_finite_features(feats: torch.Tensor, valid: torch.Tensor, path: Path, rebuild: str) -> None:
    """Refuse inf/NaN in valid rows: the decoder's feature standardization would turn every feature into
    NaN and training would go on (float16 overflow of large activations, or a damaged old cache)."""
    finite = torch.cat([torch.isfinite(b).all(dim=1) for b in torch.split(feats, 8192)]) if len(feats) else valid
    bad = ~finite & valid  # (N,); in blocks, so a COCO cache never needs a (N, D) bool copy at once
    if bool(bad.any()):
        n = int(bad.sum())
        raise PipelineError(f"{path} holds non-finite features (inf/NaN) in {n} image row(s), e.g. row "
                            f"{int(bad.nonzero()[0])}: rebuild it in float32 with `{rebuild}` (float16 overflows beyond 65504)")


def length_grouped_batches(rows: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                           generator: torch.Generator) -> list[torch.Tensor]:
    """Split caption `rows` into batches of similar length, in a random order.

    Shuffle, then stable-sort by length, so equal-length captions land together in random order;
    cut into batches; shuffle the batches. Padding per batch stays near zero, and every caption is
    seen exactly once per epoch.
    """
    rows = rows[torch.randperm(len(rows), generator=generator)]
    rows = rows[torch.sort(lengths[rows], stable=True).indices]
    batches = list(torch.split(rows, batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]
