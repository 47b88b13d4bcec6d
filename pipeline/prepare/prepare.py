"""Stage "prepare": dataset files -> manifest.json + vocab.json + labels.h5 in the cache directory.

labels.h5 holds every caption as word ids, so training never tokenizes text again:

    labels         (M, max_length) int32  word ids, padded with <pad>=0, no <start>/<end>
    lengths        (M,)            int32  words kept (1..max_length, after the cut)
    caption_image  (M,)            int32  manifest row of the caption's image
    image_ids      (N,)            int64  manifest image ids, in manifest row order
    image_split    (N,)            uint8  0 train, 1 val, 2 test
    attrs: splits=["train","val","test"], max_length, vocab_size, vocab_fingerprint, manifest_fingerprint
Every dataset carries HDF5's fletcher32 checksum, so a damaged file fails its read (see core/cache.py).

Caption rows follow the manifest: image 0's captions in order, then image 1's, ... The manifest holds
exactly the captions that have a label row (captions that tokenize to nothing are dropped from both), so
row r is caption number r - first_row(image) of `manifest.images[caption_image[r]].captions`.
Images left with no caption stay in the manifest: they still get features and can be captioned.
The vocabulary is built from training captions only, so val/test scores are not flattered by words
the decoder could never have learned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.cache import LABELS_NAME, checksummed
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_path
from pipeline.core.locks import hold
from pipeline.core.manifest import MANIFEST_NAME, SPLITS, Manifest, captions_fingerprint
from pipeline.core.storage import ensure_writable, remove_stale_temps, reporting_disk_errors
from pipeline.core.vocab import VOCAB_NAME, Vocabulary, tokenize
from pipeline.prepare.config import PrepareConfig
from pipeline.prepare.datasets import read_dataset

SPLIT_CODES = {s: i for i, s in enumerate(SPLITS)}


@dataclass
class PrepareSummary:
    out_dir: str
    dataset: str
    images: int  # rows of the manifest
    split_images: dict[str, int] = field(default_factory=dict)
    captions: int = 0  # rows of labels.h5
    vocab_size: int = 0  # including the 4 special tokens
    vocab_threshold: int = 0
    max_length: int = 0
    skipped_images: int = 0  # annotated but missing on disk
    unsplit_images: int = 0  # Flickr8k: in no split list given
    dropped_empty: int = 0  # captions with no word left after tokenization
    cut_captions: int = 0  # captions longer than max_length, truncated
    train_fit_fraction: float = 1.0  # training captions that fit in max_length whole
    train_length_p99: int = 0  # the max_length that keeps 99% of training captions whole
    vocab_source: str = ""  # the --vocab file the vocabulary came from ("": built from the train split)
    unmatched_captions: int = 0  # COCO: captions whose image_id names no image: left out
    outside_images: int = 0  # read from outside the image folders (allow_outside)
    uncaptioned: dict[str, int] = field(default_factory=dict)  # split -> images left with no caption (kept)
    uncaptioned_example: int | None = None  # the id of one of them

    def line(self) -> str:
        splits = ", ".join(f"{s} {self.split_images.get(s, 0)}" for s in SPLITS)
        extra = f", {self.unsplit_images} in no split list" if self.unsplit_images else ""
        if self.unmatched_captions:
            extra += f", left out {self.unmatched_captions} captions of no listed image"
        if self.outside_images:
            extra += f", read {self.outside_images} images from outside the image folders (allow_outside)"
        left = ""
        n = sum(self.uncaptioned.values())
        if n:
            per_split = ", ".join(f"{s} {k}" for s, k in self.uncaptioned.items() if k)
            left = (f" ({n} image{'s' if n != 1 else ''} left with no caption ({per_split}, e.g. id "
                    f"{self.uncaptioned_example}) are kept for features and captioning, but evaluate cannot score "
                    f"a split holding them: give them captions in the annotations and rerun prepare)")
        return (f"prepared {self.dataset}: {self.images} images ({splits}), {self.captions} captions, "
                f"vocab {self.vocab_size} ({self._vocab_origin()}); skipped {self.skipped_images} "
                f"missing images{extra}, dropped {self.dropped_empty} empty captions{left}, cut {self.cut_captions} "
                f"longer than {self.max_length} words ({self.train_fit_fraction:.1%} of train captions fit whole; "
                f"99% need {self.train_length_p99}) -> {self.out_dir}")

    def _vocab_origin(self) -> str:
        return f"from {self.vocab_source}" if self.vocab_source else f"threshold {self.vocab_threshold}"


def vocabulary_from(path: str | os.PathLike) -> Vocabulary:
    """The vocabulary of a vocab.json (or a cache folder holding one) or of a `pipeline train` checkpoint.

    Encoding an evaluation-only dataset with the vocabulary a decoder was trained with gives word ids
    that decoder understands, so evaluate can score it on that cache. Checkpoints are read with
    weights_only=True (plain data only) and hold the vocabulary as a token list under "vocab"."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        return Vocabulary.load(path)
    if not path.is_file():
        raise PipelineError(f"--vocab {path}: no such file: pass a vocab.json or a checkpoint (e.g. {paths.FINAL_CHECKPOINT})")
    import torch  # only here: prepare otherwise never needs it

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return Vocabulary(ckpt["vocab"])
    except Exception as e:  # noqa: BLE001 - not a torch file, not plain data, or no/bad "vocab"
        raise PipelineError(f"--vocab {path}: cannot read a vocabulary from it ({type(e).__name__}): "
                            f"pass a vocab.json or a checkpoint written by `pipeline train`") from None


def prepare(cfg: PrepareConfig, out_dir: str | os.PathLike = paths.CACHE_DIR) -> PrepareSummary:
    """Read the dataset `cfg` names, build the vocabulary from its train split, encode every caption.

    Writes OUT_DIR/manifest.json, vocab.json and labels.h5 (atomically) and returns a PrepareSummary
    with the counts of what was kept, skipped, dropped and cut. Refuses (PipelineError) a bad setting,
    missing or malformed annotation files, a dataset without training captions, and with `cfg.strict`
    any annotated image missing on disk.

    Holds the lock of OUT_DIR while it runs (a second prepare into it is refused at once), refuses an
    OUT_DIR it cannot write before reading anything, and removes temp files a killed run left there.
    """
    out = Path(out_dir)
    with hold(out, "--out-dir"):
        if out.is_dir():
            ensure_writable(out, "--out-dir")
            remove_stale_temps(out, [MANIFEST_NAME, VOCAB_NAME, LABELS_NAME])
        with reporting_disk_errors(out, "free space, or choose another --out-dir"):
            return _prepare(cfg, out_dir)


def _prepare(cfg: PrepareConfig, out_dir: str | os.PathLike) -> PrepareSummary:
    """`prepare`, under the lock of `out_dir`: read, tokenize, build the vocabulary, encode, write."""
    cfg.check()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output path {out} exists and is not a folder: choose another --out-dir")
    manifest, stats = read_dataset(cfg.dataset, cfg.annotations, cfg.images, strict=cfg.strict,
                                   allow_outside=cfg.allow_outside)
    tokens, dropped = _tokenize(manifest)
    train_tokens = [t for rec, toks in zip(manifest.images, tokens) if rec.split == "train" for t in toks]
    vocab = _vocabulary(cfg, train_tokens)
    # Without a train split (an evaluation-only dataset), the length figures describe all its captions.
    train_lengths = np.array([len(t) for t in (train_tokens or [t for toks in tokens for t in toks])])
    fit = float(np.mean(train_lengths <= cfg.max_length)) if len(train_lengths) else 1.0
    p99 = int(np.quantile(train_lengths, 0.99, method="inverted_cdf")) if len(train_lengths) else 0
    labels, lengths, caption_image, cut = _encode(tokens, vocab, cfg.max_length)
    _write(out, manifest, vocab, labels, lengths, caption_image, cfg.max_length)
    return PrepareSummary(
        out_dir=str(out), dataset=cfg.dataset, images=len(manifest.images),
        split_images={s: len(manifest.indices(s)) for s in SPLITS}, captions=len(labels),
        vocab_size=len(vocab), vocab_threshold=cfg.vocab_threshold, max_length=cfg.max_length,
        skipped_images=stats.missing_images, unsplit_images=stats.unsplit_images, dropped_empty=dropped,
        cut_captions=cut, train_fit_fraction=fit, train_length_p99=p99, vocab_source=cfg.vocab,
        unmatched_captions=stats.unmatched_captions, outside_images=stats.outside_images,
        uncaptioned={s: k for s in SPLITS if (k := sum(1 for r in manifest.images if r.split == s and not r.captions))},
        uncaptioned_example=next((r.id for r in manifest.images if not r.captions), None))


def _tokenize(manifest: Manifest) -> tuple[list[list[list[str]]], int]:
    """Every image's captions as word lists (manifest order), and how many captions had no words: those are
    dropped from the manifest too, so labels rows match it 1:1. Treebank tokenization costs ~0.3 ms a
    caption (minutes for COCO): progress shows on a terminal, and each distinct caption is tokenized once."""
    tokens: list[list[list[str]]] = []
    seen: dict[str, list[str]] = {}
    dropped = 0
    for rec in tqdm(manifest.images, desc="tokenize", unit="img", disable=None, leave=False):
        kept_text, kept_toks = [], []
        for cap in rec.captions:
            cap = " ".join(cap.split())  # COCO captions carry stray newlines and double spaces
            toks = seen.get(cap)
            if toks is None:
                toks = seen[cap] = tokenize(cap)
            if toks:
                kept_text.append(cap)
                kept_toks.append(toks)
            else:
                dropped += 1
        rec.captions = kept_text
        tokens.append(kept_toks)
    return tokens, dropped


def _vocabulary(cfg: PrepareConfig, train_tokens: list[list[str]]) -> Vocabulary:
    """The vocabulary given (cfg.vocab), else the one the training captions make."""
    if cfg.vocab:
        return vocabulary_from(cfg.vocab)
    if not train_tokens:
        raise PipelineError("no training captions found: the vocabulary is built from the train split, "
                            "so pass the training annotations too (e.g. captions_train2014.json), or pass "
                            "--vocab (a vocab.json or checkpoint) to encode a dataset only evaluated on")
    return Vocabulary.build(train_tokens, cfg.vocab_threshold)


def _encode(tokens: list[list[list[str]]], vocab: Vocabulary, max_length: int):
    """Word lists -> labels (M, max_length) int32 0-padded, lengths (M,), caption_image (M,), and how many
    captions were cut to max_length."""
    n_captions = sum(len(t) for t in tokens)
    labels = np.zeros((n_captions, max_length), dtype=np.int32)
    lengths = np.zeros(n_captions, dtype=np.int32)
    caption_image = np.zeros(n_captions, dtype=np.int32)
    cut, row = 0, 0
    for i, toks in enumerate(tokens):
        for t in toks:
            ids = vocab.encode(t)
            if len(ids) > max_length:
                cut += 1
                ids = ids[:max_length]
            labels[row, :len(ids)] = ids
            lengths[row] = len(ids)
            caption_image[row] = i
            row += 1
    return labels, lengths, caption_image, cut


def _write(out: Path, manifest: Manifest, vocab: Vocabulary, labels, lengths, caption_image, max_length: int) -> None:
    """vocab.json, labels.h5 (atomically, checksummed), then manifest.json."""
    n_captions = len(labels)
    image_ids = np.array([r.id for r in manifest.images], dtype=np.int64)
    image_split = np.array([SPLIT_CODES[r.split] for r in manifest.images], dtype=np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / VOCAB_NAME)
    with atomic_path(out / LABELS_NAME) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("labels", data=labels, **checksummed(n_captions))
            f.create_dataset("lengths", data=lengths, **checksummed(n_captions))
            f.create_dataset("caption_image", data=caption_image, **checksummed(n_captions))
            f.create_dataset("image_ids", data=image_ids, **checksummed(len(image_ids)))
            f.create_dataset("image_split", data=image_split, **checksummed(len(image_ids)))
            f.attrs["splits"] = list(SPLITS)
            f.attrs["max_length"] = max_length
            f.attrs["vocab_size"] = len(vocab)
            f.attrs["vocab_fingerprint"] = vocab.fingerprint
            f.attrs["manifest_fingerprint"] = manifest.fingerprint
            # the text of the captions encoded here: a manifest edited afterwards is refused (check_captions)
            f.attrs["captions_fingerprint"] = captions_fingerprint(r.captions for r in manifest.images)
    manifest.save(out / MANIFEST_NAME)

