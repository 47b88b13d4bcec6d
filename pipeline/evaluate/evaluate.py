"""Score a trained decoder on a split of the cache, the way captioning papers do.

Decodes the split from the cached features (no CNN run), writes the COCO results JSON
([{"image_id", "caption"}]) and a metrics JSON with BLEU-1..4, METEOR, ROUGE-L and CIDEr from
pycocoevalcap, on its own scales (BLEU, METEOR, ROUGE-L 0-1; CIDEr 0-10). METEOR needs Java; SPICE needs model downloads and is left out.
On the demo's pictures, whose attributes are known (pipeline.decoder.attributes), the metrics also say how
often the captions state each attribute rightly and wrongly, which n-gram scores cannot.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import paths
from pipeline.core.cache import EncoderSpec, describe_difference
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import write_json
from pipeline.core.manifest import SPLITS, check_cache_captions
from pipeline.core.runtime import choose_device, tune
from pipeline.core.storage import check_free_space, ensure_writable, reporting_disk_errors
from pipeline.decoder.attributes import accuracy_line, attribute_accuracy, read_row_truths
from pipeline.decoder.checkpoint import load_checkpoint, needs_grid, restore_decoder
from pipeline.decoder.data import CaptionData, load_cache
from pipeline.decoder.decode import decode_rows
from pipeline.decoder.metrics import score_captions
from pipeline.decoder.overlap import overlap
from pipeline.evaluate.config import EvaluateConfig


@dataclass
class EvalSummary:
    split: str
    images: int
    scores: dict
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    metrics_path: str = ""
    results_path: str = ""
    split_images: int = 0  # images of the split in the cache, scored or not
    left_out: dict = field(default_factory=dict)  # reason -> images of the split not scored
    attributes: dict = field(default_factory=dict)  # the demo's: attribute_accuracy of the captions, else {}

    def table(self) -> str:
        keys = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
        lines = [f"{self.split}: {self.images} images, {self.seconds:.1f} s"]
        if sum(self.left_out.values()):
            lines = [f"{self.split}: {self.images} of {self.split_images} images, {self.seconds:.1f} s; "
                     f"left out: {describe_left_out(self.left_out)}"]
        lines += [f"  {k:<8} {self.scores[k]:.4f}" for k in keys if k in self.scores]
        lines += [f"  {accuracy_line(self.attributes)}"] if self.attributes else []
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_compatible(ckpt: dict, data: CaptionData, where: str) -> None:
    """Refuse a checkpoint whose encoder or vocabulary is not the cache's."""
    # an older record gets today's defaults, as the cache's does; the grid is compared below, where it is read
    enc, have = ({**s.identity(), "grid_size": 0} for s in (EncoderSpec.from_dict(ckpt["encoder"]), data.encoder))
    grid = int(ckpt["model_config"].get("grid_size", 0))
    if enc != have or (grid and data.encoder.grid_size != grid):
        diff = describe_difference(enc, have) or f"grid_size: {grid} -> {data.encoder.grid_size}"
        raise PipelineError(f"{where} was trained on features from another encoder ({diff}): evaluate it on the "
                            f"cache it was trained from, or retrain on this one")
    if list(ckpt["vocab"]) != list(data.vocab.tokens):
        raise PipelineError(f"{where} uses another vocabulary than {data.manifest.dataset} cache's vocab.json: "
                            f"evaluate on the cache it was trained from, or retrain")


LEFT_OUT_REASONS = {"undecodable": "could not be decoded at extraction",
                    "max_images": "beyond --max-images"}


def describe_left_out(left_out: dict) -> str:
    """'6 could not be decoded at extraction, 10 beyond --max-images' (reasons with a count only)."""
    return ", ".join(f"{n} {LEFT_OUT_REASONS.get(k, k)}" for k, n in left_out.items() if n)


def check_overlap(ckpt: dict, data: CaptionData, rows, split: str, where: str, allow: bool) -> str | None:
    """Refuse to score images the checkpoint was trained on (unless `allow`); returns a note, or None.

    A score on training images says nothing about captioning unseen ones, and nothing else in the
    outputs would show it. Checkpoints written before training images were recorded cannot be checked."""
    n = overlap(ckpt, data, rows)
    if n is None:
        return f"{where} does not record its training images: overlap with split {split!r} not checked"
    if n and not allow:
        raise PipelineError(f"{n} of the {len(rows)} images of split {split!r} were in {where}'s training set: "
                            f"score a split it was not trained on, or pass --allow-overlap to score them anyway")
    return f"{n} of the {len(rows)} scored images were in the checkpoint's training set" if n else None


def check_references(references: dict, split: str, cache_dir) -> None:
    """Refuse a split holding images without reference captions: there is nothing to score them against."""
    missing = [i for i, refs in references.items() if not refs]
    if missing:
        raise PipelineError(f"{len(missing)} images of split {split!r} have no reference captions (e.g. id {missing[0]}): "
                            f"their captions were missing or empty in the annotations (prepare's summary counts them "
                            f"as left with no caption), so there is nothing to score them against. Give them captions "
                            f"in the annotation files and rerun `pipeline prepare --out-dir {cache_dir}`, or evaluate "
                            f"another --split")


def check_outputs(out: Path, results: Path, n_images: int) -> None:
    """Before any decoding: both output folders writable and with room (a results row is ~100 bytes), so
    a read-only or full disk is refused at once, not after minutes of beam search."""
    for path, flag in ((out, "--out"), (results, "--results")):
        ensure_writable(path.parent, flag)
        check_free_space(path.parent, 200 * n_images + 65536, f"{path.name} (about 200 bytes a scored image)",
                         f"free space, or choose another {flag}")


def attribute_scores(data: CaptionData, rows, candidates: dict) -> dict:
    """attribute_accuracy of the captions of the scored images whose folder says their attributes (the demo's);
    {} when none does."""
    truths = {data.manifest.images[r].id: t for r, t in read_row_truths(data.manifest, rows).items()}
    return attribute_accuracy(candidates, truths) if truths else {}


def evaluate(checkpoint: str | os.PathLike, cache_dir: str | os.PathLike = paths.CACHE_DIR, cfg: EvaluateConfig | None = None,
             out: str | os.PathLike = paths.EVAL_METRICS, results: str | os.PathLike | None = None,
             batch_size: int = 256, allow_overlap: bool = False) -> EvalSummary:
    """Decode `cfg.split` of the cache with the checkpoint's decoder and score it against the references.

    Writes the metrics JSON to `out` and the COCO results JSON ([{"image_id", "caption"}]) to
    `results` (default: captions_SPLIT.json beside `out`). Returns an EvalSummary; it and the metrics
    say how many images of the split were left out, and why. Refuses (PipelineError) a missing or
    foreign checkpoint, a checkpoint trained on another encoder or vocabulary than the cache's, a
    split without valid images, images without references, and (unless `allow_overlap`) images the
    checkpoint was trained on.
    """
    cfg = cfg or EvaluateConfig()
    cfg.check()
    split, beam_size, max_length, length_penalty = cfg.split, cfg.beam_size, cfg.max_length, cfg.length_penalty
    started = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    data = load_cache(cache_dir, grid=needs_grid(ckpt))
    check_cache_captions(cache_dir, data.manifest)  # the references are manifest.json's text: still prepare's?
    check_compatible(ckpt, data, str(checkpoint))
    dev = choose_device(cfg.device)
    tune(dev, fixed_shapes=False)  # beam search: shapes vary
    model, vocab, _ = restore_decoder(ckpt, dev)
    split_images = len(data.image_rows(split, valid_only=False))
    rows = data.image_rows(split)
    left_out = {"undecodable": split_images - len(rows), "max_images": 0}
    if cfg.max_images:
        left_out["max_images"] = max(len(rows) - cfg.max_images, 0)
        rows = rows[:cfg.max_images]
    if len(rows) == 0:
        present = [s for s in SPLITS if len(data.image_rows(s))]
        raise PipelineError(f"the cache has no valid images in split {split!r}: choose --split from {present}")
    overlap_note = check_overlap(ckpt, data, rows, split, str(checkpoint), allow_overlap)
    results = Path(results) if results else Path(out).parent / f"captions_{split}.json"
    check_outputs(Path(out), results, len(rows))
    hyps = decode_rows(model, data, rows, dev, beam_size=beam_size, max_length=max_length,
                       start_id=vocab.start_id, end_id=vocab.end_id, length_penalty=length_penalty,
                       banned_ids=(vocab.pad_id, vocab.start_id, vocab.unk_id), batch_size=batch_size)
    images = data.manifest.images
    candidates = {images[int(r)].id: vocab.decode(h.tokens) for r, h in zip(rows, hyps)}
    references = {images[int(r)].id: list(images[int(r)].captions) for r in rows}
    check_references(references, split, cache_dir)
    report = score_captions(references, candidates, tokenizer=cfg.tokenizer)
    notes = list(report.notes) + ([overlap_note] if overlap_note else [])
    with reporting_disk_errors(results, "free space, or choose another --results"):
        write_json(results, [{"image_id": i, "caption": c} for i, c in candidates.items()])
    attributes = attribute_scores(data, rows, candidates)
    seconds = time.perf_counter() - started
    metrics = {**report.scores, **({"attributes": attributes} if attributes else {}), "split": split, "images": len(rows), "split_images": split_images,
               "left_out": left_out, "beam_size": beam_size,
               "max_length": max_length, "length_penalty": length_penalty, "tokenizer": report.tokenizer,
               "checkpoint_epoch": int(ckpt["epoch"]), "notes": notes}
    with reporting_disk_errors(out, "free space, or choose another --out"):
        write_json(out, metrics)
    return EvalSummary(split, len(rows), dict(report.scores), notes, seconds, str(out), str(results),
                       split_images, left_out, attributes)
