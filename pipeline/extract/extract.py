"""Stage 1: run the frozen ResNet once over every image of the manifest and cache pooled features.

Output `features.h5` (row i = manifest image i):
    features (N, D) float16|float32   pooled last-block activations (zeros where invalid)
    grid     (N, G*G, D)              with `features: grid` only: the last block's map average-pooled to G x G,
                                      row-major, one HDF5 chunk per image (a batch reads only its rows)
    valid    (N,)   bool              False for images that could not be decoded
    errors   (N,)   str               why, for invalid rows ("" otherwise)
    image_ids (N,)  int64, paths (N,) str (relative to the image folder)
    file_size, mtime_ns (N,) int64, sha256 (N,) S64   each image file as it was read (changes.py): a rerun
                                      recomputes only the chunks whose images changed since
    The numeric datasets carry HDF5's fletcher32 checksum: a damaged file fails its read.
    attrs: the encoder spec, preprocessing, dtype, library versions, manifest fingerprint.

Crash safety: work is done in fixed chunks of rows; each finished chunk is written atomically as
`features.h5.parts/part-XXXXXX.npz` (parts.py: the plan, the parts and joining them). A run that dies
(Ctrl-C, kill -9, power loss) keeps every finished chunk, and the next run computes only the rest.
Batches never straddle chunks, so a resumed run feeds the network exactly the batches an uninterrupted
run would, and the assembled file is identical. The assembled file is itself written to a temp file and
renamed, then the parts are removed.
The same chunks are the unit of work for many processes (torchrun): rank r of W takes the r-th, (r+W)-th,
... of the chunks still to do, and rank 0 joins the parts; see `extract`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import distributed, paths
from pipeline.core.cache import FEATURES_NAME, LABELS_NAME, VOCAB_NAME, EncoderSpec, extract_command
from pipeline.core.errors import PipelineError
from pipeline.core.locks import hold
from pipeline.core.manifest import MANIFEST_NAME, Manifest, load_manifest
from pipeline.core.runtime import choose_device, default_workers
from pipeline.core.storage import as_disk_error, disk_error, human_bytes, is_disk_error
from pipeline.encoder import onnx_runtime
from pipeline.encoder.compiled import maybe_compile
from pipeline.encoder.encoder import encode_images, load_encoder, make_spec
from pipeline.encoder.images import Preprocess, image_batches
from pipeline.encoder.onnx_runtime import maybe_onnx
from pipeline.extract.changes import image_stats
from pipeline.extract.config import ExtractConfig
from pipeline.extract.parts import NP_DTYPES, Chunk, Parts, Plan, cache_bytes, chunks, make_plan, row_size_text


@dataclass
class ExtractSummary:
    images: int
    computed: int  # images run through the network in this call (0 when the cache was up to date)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    seconds: float = 0.0
    up_to_date: bool = False
    path: str = ""
    changed: int = 0  # images whose file changed since extraction, redone now (see changes.py)
    retried: int = 0  # images that had failed, redone now (their file changed, or --retry-failed)
    note: str = ""
    # images/s once running: from the end of each process's first batch to its last, so without the start-up
    # (encoder load, decode workers' start, the first batch's kernel selection); summed over ranks
    steady_images_per_second: float = 0.0
    runtime: str = ""  # what ran the encoder: torch, compiled (torch.compile) or onnxruntime; "" when nothing ran

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        if self.up_to_date:
            return f"{self.path} is up to date ({self.images} images, {len(self.failures)} failures): nothing to do{note}"
        via = f" via {self.runtime}" if self.runtime in ("compiled", "onnxruntime") else ""
        redone = (f"; redid the chunks of {self.changed} changed and {self.retried} previously failed image(s)"
                  if self.changed or self.retried else "")
        return (f"extracted {self.images} images ({self.computed} computed now{redone}), {len(self.failures)} failures, "
                f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s{via} -> {self.path}{note}")


def cache_settings(spec: EncoderSpec, preprocess: Preprocess, dtype: str, manifest: Manifest) -> dict:
    """What decides the cache's content: two runs agreeing on these produce the same features."""
    return {"encoder": spec.identity(), "preprocess": preprocess.describe(), "dtype": dtype,
            "manifest_fingerprint": manifest.fingerprint, "n_images": len(manifest.images)}


def extract(cache_dir: str | os.PathLike = paths.CACHE_DIR, cfg: ExtractConfig | None = None,
            out: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
            retry_failed: bool = False) -> ExtractSummary:
    """Extract features for every image in `cache_dir/manifest.json` into `out` (default cache_dir/features.h5).

    `cfg` says which encoder, preprocessing and storage type (ExtractConfig's defaults: resnet152 with
    torchvision's default ImageNet weights and their own preprocessing recipe, 232/224 bilinear,
    float16). Returns an ExtractSummary: images, how many were computed now, the failures (path, reason). Refuses (PipelineError) a bad setting, a missing
    manifest, and an existing cache or unfinished extraction made with other settings (unless `force`).
    An up-to-date cache is reported, not recomputed; an interrupted run continues where it stopped.
    An existing cache is checked against the image files (size and mtime, or with `cfg.verify == "hash"`
    their sha256; see changes.py): only the chunks holding changed images are recomputed, and with
    `retry_failed` also those holding images that failed before. The result equals a from-scratch run.

    Under torchrun (see `pipeline.core.distributed`): rank 0 alone checks the settings and the existing
    cache, prepares the parts folder and lists the chunks still to do; the ranks split that list
    (chunk i of it to rank i % W: every chunk on the first run, only the missing ones on a rerun, so
    a rerun after a crash is balanced again); once every rank's parts are written, rank 0 joins
    them. Which rank computes a chunk does not change its batches, so the file is the same as a
    one-process run's, byte for byte (on the CPU; on GPUs as far as the kernels are deterministic).

    Rank 0 holds the lock of `out` for the whole run (see `pipeline.core.locks`): a second run on the
    same cache is refused at once. A disk too small for the cache is refused before any work.
    """
    with contextlib.ExitStack() as locks:
        return _extract(cache_dir, cfg, out, force, progress, retry_failed, locks)


def _extract(cache_dir, cfg: ExtractConfig | None, out, force: bool, progress: bool, retry_failed: bool,
             locks: contextlib.ExitStack) -> ExtractSummary:
    """`extract`, with `locks` holding (on rank 0) the lock of `out` until it returns."""
    cfg = cfg or ExtractConfig()
    cfg.check()
    inputs = Inputs(Path(cache_dir), cfg)
    regions = cfg.grid_size ** 2 if cfg.features == "grid" else 0
    parts = Parts(Path(out) if out else inputs.cache_dir / FEATURES_NAME, regions)
    dist = distributed.context(cfg.dist_timeout)
    dev = choose_device(cfg.device, dist.local_rank if dist.enabled else None)  # a typo fails before any file is made
    onnx_runtime.check(cfg.runtime, dev, cfg.compile == "true")
    plan = dist.decide(partial(_plan, inputs, parts, force, retry_failed, locks))
    if plan.up_to_date:
        summary = _summary_from_file(parts.out, up_to_date=True)
        summary.note = plan.note
        return summary
    started = time.perf_counter()
    todo = sum(e - s for _, s, e in plan.pending)  # the run's images, every rank's: one compile decision for all
    computed, steady, runtime = _compute(inputs, plan.pending[dist.rank::dist.world_size], parts, dev, todo,
                                         progress and dist.is_main, dist.is_main)
    # also the barrier: every part is written before rank 0 joins them
    done = dist.all_gather((computed, time.perf_counter() - started, steady, runtime))
    summary = dist.decide(partial(_join, inputs, parts, plan))
    summary.computed, summary.seconds = sum(d[0] for d in done), max(d[1] for d in done)
    summary.steady_images_per_second = sum(d[2] for d in done)
    summary.runtime = next((d[3] for d in done if d[3]), "")
    return summary


@dataclass
class Inputs:
    """What every rank reads before any work: the manifest, the encoder's record, its preprocessing and the
    cache settings, each made on first use: on rank 0 while it plans (inside `dist.decide`, so a refusal
    reaches every rank), on the other ranks after it."""

    cache_dir: Path
    cfg: ExtractConfig

    @cached_property
    def manifest(self) -> Manifest:
        return load_manifest(self.cache_dir)

    @cached_property
    def spec(self) -> EncoderSpec:
        c = self.cfg
        return make_spec(c.arch, c.weights, c.resize, c.crop, c.interpolation, c.draft,
                         c.grid_size if c.features == "grid" else 0)

    @cached_property
    def preprocess(self) -> Preprocess:
        return Preprocess.of(self.spec)

    @cached_property
    def settings(self) -> dict:
        return cache_settings(self.spec, self.preprocess, self.cfg.dtype, self.manifest)

    def rebuild(self, out: Path, dtype: str | None = None) -> str:
        """The command that rebuilds `out` with these settings (in `dtype` if given): what damage messages say."""
        return extract_command(self.cache_dir, self.spec, dtype or self.cfg.dtype, out)


def _plan(inputs: Inputs, parts: Parts, force: bool, retry_failed: bool, locks: contextlib.ExitStack) -> Plan:
    """Rank 0: read the manifest, take the lock of the feature file, clear a killed run's temp files, then plan."""
    manifest = inputs.manifest
    refuse_input_as_out(parts.out, inputs.cache_dir, manifest)  # before its lock file or temps appear beside it
    locks.enter_context(hold(parts.out, "--out"))
    parts.remove_stale_temps()
    cfg = inputs.cfg
    return make_plan(parts, manifest, inputs.settings, inputs.spec.feature_dim, cfg.dtype, cfg.chunk_size, cfg.verify,
                     retry_failed, force, rebuild=partial(inputs.rebuild, parts.out))


def refuse_input_as_out(out: Path, cache_dir: Path, manifest: Manifest) -> None:
    """Refuse (one line, before anything is written) an `out` that is one of extract's inputs: the cache's
    manifest.json, vocab.json or labels.h5, or an image the manifest lists. Features written there (or the
    --force that an "other settings" answer suggests) would destroy it. Compared as written and with every
    symlink resolved, so `../cache/./manifest.json` or a linked folder is caught too."""
    forms = {os.path.abspath(out), os.path.realpath(out)}
    cache_files = {os.path.realpath(cache_dir / name): name for name in (MANIFEST_NAME, VOCAB_NAME, LABELS_NAME)}
    hit = next((cache_files[f] for f in forms if f in cache_files), None)
    if hit:
        what = f"the cache's {hit}"
    else:
        dirs = [(os.path.abspath(d), os.path.realpath(d)) for d in manifest.image_dirs]
        images = {os.path.normpath(os.path.join(d, rec.file)) for rec in manifest.images for d in dirs[rec.dir]}
        hit = next((f for f in forms if f in images), None)
        if hit is None:
            return
        what = "an image the manifest lists"
    raise PipelineError(f"--out {out} is one of extract's inputs ({what}): features written there would destroy "
                        f"it; choose another --out (by default they go to {cache_dir / FEATURES_NAME})")


def _compute(inputs: Inputs, mine: list[Chunk], parts: Parts, dev: torch.device, todo: int, progress: bool,
             is_main: bool) -> tuple[int, float, str]:
    """This rank's chunks computed into parts: (images computed, steady images/s, runtime: see ExtractSummary). A disk
    that fills up meanwhile is refused with what the cache needs; finished parts are kept."""
    if not mine:
        return 0, 0.0, ""
    try:
        return _encode_chunks(inputs, mine, parts, dev, todo, progress, is_main)
    except BaseException as e:
        if is_main:
            parts.drop_if_empty()
        if is_disk_error(e):  # the disk filled up while parts were written
            n, d, dtype = len(inputs.manifest.images), inputs.spec.feature_dim, inputs.cfg.dtype
            raise disk_error(e, parts.dir, f"the cache needs about {n} x {row_size_text(d, dtype, parts.regions)} "
                             f"bytes = {human_bytes(cache_bytes(n, d, dtype, parts.regions))} (and as much again for the parts "
                             f"while they are joined); finished parts are kept: free space, or use --out "
                             f"on a larger disk, and rerun") from None
        raise


def _encode_chunks(inputs: Inputs, pending: list[Chunk], parts: Parts, dev: torch.device, todo: int,
                   progress: bool, is_main: bool) -> tuple[int, float, str]:
    """Compute the `pending` chunks' parts (the encoder compiled, or run by ONNX Runtime, or neither, as cfg.compile
    and cfg.runtime decide for the run's `todo` images and the cache's); returns (images computed, steady images/s, runtime: see
    ExtractSummary)."""
    cfg, manifest, spec = inputs.cfg, inputs.manifest, inputs.spec
    # Batches are cut inside each chunk, so resuming reproduces the uninterrupted run's batches.
    batches = [list(range(b, min(b + cfg.batch_size, e))) for _, s, e in pending for b in range(s, e, cfg.batch_size)]
    paths = [manifest.path_of(i) for i in range(len(manifest.images))]
    # What each image file is before the loader reads it: a file changed after this is caught next run.
    stats = {k: image_stats(paths[s:e], cfg.verify == "hash") for k, s, e in pending}
    workers = default_workers(dev) if cfg.workers is None else cfg.workers
    images = image_batches(paths, inputs.preprocess, batches, dev, workers, cfg.gpu_decode)  # decoding starts now
    log = partial(print, file=sys.stderr) if is_main else (lambda msg: None)
    encoder, compiled, why = maybe_compile(load_encoder(spec, dev), cfg.compile, dev, todo, cfg.batch_size, log)
    # the cache's size, not todo: a resumed run keeps the runtime, and so the bytes, of the run it continues
    encoder, onnx, runtime = maybe_onnx(encoder, cfg.runtime, dev, len(manifest.images), compiled, log)
    if progress or compiled:
        log(why)
    if progress or onnx:
        log(runtime)
    total = sum(e - s for _, s, e in pending)
    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True,
               file=sys.stderr, smoothing=0.1)
    left = iter(pending)
    k, s, e = next(left)
    buf = ChunkBuffer(e - s, spec.feature_dim, parts.regions, NP_DTYPES[cfg.dtype])
    first: tuple[float, int] | None = None  # (time, images) at the end of the first batch
    for rows, out, errs in encode_images(encoder, images, dev, cfg.amp):  # out (B, D) or (B, 1 + G*G, D)
        check_storable(out.reshape(len(out), -1), cfg.dtype, spec.arch, [paths[r] for r in rows],
                       inputs.rebuild(parts.out, "float32"))
        buf.put(rows - s, out, errs)
        bar.update(len(rows))
        if first is None:
            first = (time.perf_counter(), len(rows))
        if rows[-1] == e - 1:  # chunk finished: make it durable before moving on
            parts.write_stats(k, stats[k])
            parts.write_part(k, buf.feats, buf.errors, buf.grid)
            nxt = next(left, None)
            if nxt is None:
                break
            k, s, e = nxt
            buf = ChunkBuffer(e - s, spec.feature_dim, parts.regions, NP_DTYPES[cfg.dtype])
    bar.close()
    steady = (total - first[1]) / (time.perf_counter() - first[0]) if first and total > first[1] else 0.0
    ran = "onnxruntime" if onnx and not encoder.eager else "compiled" if compiled and not encoder.eager else "torch"
    return total, steady, ran


class ChunkBuffer:
    """One chunk's rows as they are computed: pooled features (n, D), grids (n, G*G, D) when kept, errors."""

    def __init__(self, n: int, d: int, regions: int, dtype):
        self.feats = np.zeros((n, d), dtype=dtype)
        self.grid = np.zeros((n, regions, d), dtype=dtype) if regions else None
        self.errors = [""] * n

    def put(self, at: np.ndarray, out: np.ndarray, errs: list[str]) -> None:
        """Rows `at` of the chunk from the encoder's `out`: (B, D), or (B, 1 + G*G, D) with row 0 pooled."""
        if self.grid is None:
            self.feats[at] = out
        else:
            self.feats[at], self.grid[at] = out[:, 0], out[:, 1:]
        for j, err in zip(at, errs):
            self.errors[j] = err


def _join(inputs: Inputs, parts: Parts, plan: Plan) -> ExtractSummary:
    """Rank 0, once every rank's parts are written: the feature file joined from them, and its summary."""
    manifest, spec, dtype = inputs.manifest, inputs.spec, inputs.cfg.dtype
    every = chunks(len(manifest.images), inputs.cfg.chunk_size)
    parts.check_all_there(every)
    try:
        parts.assemble(every, manifest, spec, inputs.preprocess, inputs.settings, dtype)
    except (OSError, RuntimeError) as e:
        err = as_disk_error(e, parts.out, f"the finished parts in {parts.dir} are kept: free "
                            f"{human_bytes(cache_bytes(len(manifest.images), spec.feature_dim, dtype, parts.regions))} "
                            f"and rerun the same command to join them")
        if err is None:
            raise
        raise err from None
    summary = _summary_from_file(parts.out, up_to_date=False)
    summary.changed, summary.retried = plan.changed, plan.retried
    return summary


def check_storable(feats: np.ndarray, dtype: str, arch: str, paths: list[str],
                   rebuild32: str = "pipeline extract (this command) --dtype float32 --force") -> None:
    """Refuse features (B, D) float32 that are non-finite, or that `dtype` would store as inf (`rebuild32`:
    the command that extracts them as float32 instead).

    Random-init resnet101/152 reach 2e5 and 4e8, beyond float16's 65504: stored silently, they turn
    into inf and the decoder's standardization makes every feature NaN."""
    rows_ok = np.isfinite(feats).all(axis=1)  # (B,)
    if not rows_ok.all():
        raise PipelineError(f"{arch} produced non-finite features (inf/NaN) for {paths[int(np.argmin(rows_ok))]}: "
                            f"the encoder weights are broken; check --weights")
    limit = float(np.finfo(NP_DTYPES[dtype]).max)
    peaks = np.abs(feats).max(axis=1) if feats.size else np.zeros(len(feats))  # (B,)
    if (peaks > limit).any():
        j = int(np.argmax(peaks))
        raise PipelineError(f"{arch} features reach {peaks[j]:.3g} (e.g. {paths[j]}), beyond {dtype}'s largest value "
                            f"{limit:.6g}, so they would be stored as inf: rebuild it with `{rebuild32}`")


def _summary_from_file(out: Path, up_to_date: bool) -> ExtractSummary:
    with h5py.File(out, "r") as f:
        valid = f["valid"][:]
        bad = np.flatnonzero(~valid)
        paths = f["paths"].asstr()[:] if len(bad) else []
        errors = f["errors"].asstr()[:] if len(bad) else []
        failures = [(str(paths[i]), str(errors[i])) for i in bad]
        return ExtractSummary(images=len(valid), computed=0, failures=failures, up_to_date=up_to_date, path=str(out))
