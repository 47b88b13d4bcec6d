"""Stage 1: run the frozen ResNet once over every image of the manifest and cache pooled features.

Output `features.h5` (row i = manifest image i):
    features (N, D) float16|float32   pooled last-block activations (zeros where invalid)
    valid    (N,)   bool              False for images that could not be decoded
    errors   (N,)   str               why, for invalid rows ("" otherwise)
    image_ids (N,)  int64, paths (N,) str (relative to the image folder)
    file_size, mtime_ns (N,) int64, sha256 (N,) S64   each image file as it was read (changes.py): a rerun
                                      recomputes only the chunks whose images changed since
    The numeric datasets carry HDF5's fletcher32 checksum: a damaged file fails its read.
    attrs: the encoder spec, preprocessing, dtype, library versions, manifest fingerprint.

Crash safety: work is done in fixed chunks of rows; each finished chunk is written atomically as
`features.h5.parts/part-XXXXXX.npz`. A run that dies (Ctrl-C, kill -9, power loss) keeps every finished
chunk, and the next run computes only the rest. Batches never straddle chunks, so a resumed run feeds
the network exactly the batches an uninterrupted run would, and the assembled file is identical.
The assembled file is itself written to a temp file and renamed, then the parts are removed.
The same chunks are the unit of work for many processes (torchrun): rank r of W takes the r-th, (r+W)-th,
... of the chunks still to do, and rank 0 joins the parts; see `extract`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.core import distributed
from pipeline.core.cache import (
    FEATURES_NAME,
    EncoderSpec,
    checksummed,
    describe_difference,
    read_features_attrs,
    reading,
)
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_path, sha256_json, write_json
from pipeline.core.locks import hold
from pipeline.core.manifest import Manifest, load_manifest
from pipeline.core.runtime import choose_device, default_workers
from pipeline.core.storage import (
    as_disk_error,
    check_free_space,
    disk_error,
    human_bytes,
    is_disk_error,
    remove_stale_temps,
)
from pipeline.encoder.encoder import encode_images, load_encoder, make_spec
from pipeline.encoder.images import Preprocess, image_batches
from pipeline.extract.changes import STAT_KEYS, changed_rows, image_stats, read_stats
from pipeline.extract.config import ExtractConfig

NP_DTYPES = {"float16": np.float16, "float32": np.float32}


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

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        if self.up_to_date:
            return f"{self.path} is up to date ({self.images} images, {len(self.failures)} failures): nothing to do{note}"
        redone = (f"; redid the chunks of {self.changed} changed and {self.retried} previously failed image(s)"
                  if self.changed or self.retried else "")
        return (f"extracted {self.images} images ({self.computed} computed now{redone}), {len(self.failures)} failures, "
                f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s -> {self.path}{note}")


def cache_settings(spec: EncoderSpec, preprocess: Preprocess, dtype: str, manifest: Manifest) -> dict:
    """What decides the cache's content: two runs agreeing on these produce the same features."""
    return {"encoder": spec.identity(), "preprocess": preprocess.describe(), "dtype": dtype,
            "manifest_fingerprint": manifest.fingerprint, "n_images": len(manifest.images)}


def settings_of(attrs: dict) -> dict | None:
    raw = attrs.get("settings")
    return json.loads(raw) if raw else None


def extract(cache_dir: str | os.PathLike = "cache", cfg: ExtractConfig | None = None,
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
    arch, weights, resize, crop, dtype = cfg.arch, cfg.weights, cfg.resize, cfg.crop, cfg.dtype
    batch_size, chunk_size = cfg.batch_size, cfg.chunk_size
    cache_dir = Path(cache_dir)
    out = Path(out) if out else cache_dir / FEATURES_NAME
    parts_dir = out.with_name(out.name + ".parts")
    dist = distributed.context(cfg.dist_timeout)
    dev = choose_device(cfg.device, dist.local_rank if dist.enabled else None)  # a typo fails before any file is made
    job: dict = {}

    def plan():
        """Rank 0: refuse, report up to date, or list the chunks that have no finished part yet."""
        job["manifest"] = manifest = load_manifest(cache_dir)
        locks.enter_context(hold(out, "--out"))
        remove_stale_temps(out.parent, [out.name])  # left by a run killed while assembling (as big as the cache)
        remove_stale_temps(parts_dir, ["part-*.npz", "stats-*.npz", "settings.json"])
        job["spec"] = spec = make_spec(arch, weights, resize, crop, cfg.interpolation, cfg.draft)
        settings = cache_settings(spec, Preprocess.of(spec), dtype, manifest)
        if out.exists() and not force:
            old = settings_of(read_features_attrs(out))
            if old == settings:
                verify_features_file(out, f"pipeline extract --cache-dir {cache_dir} --force")
                redo = _rows_to_redo(out, manifest, cfg.verify, retry_failed, job)
                if redo is None or not redo.any():
                    if parts_dir.exists():
                        shutil.rmtree(parts_dir, ignore_errors=True)  # left by a run killed after its final rename
                    summary = _summary_from_file(out, up_to_date=True)
                    summary.note = job.get("note", "")
                    return None, summary
                _prepare_parts_dir(parts_dir, settings, chunk_size)
                return _seed_parts(out, parts_dir, _chunks(len(manifest.images), chunk_size), redo, job["now"],
                                   cfg.verify), None
            raise PipelineError(f"{out} was made with other settings ({describe_difference(old or {}, settings)}). "
                                f"It is never reused or mixed: rerun with --force to rebuild it, or use --out for a second cache")
        if force:
            shutil.rmtree(parts_dir, ignore_errors=True)
        _prepare_parts_dir(parts_dir, settings, chunk_size)
        pending = [c for c in _chunks(len(manifest.images), chunk_size) if not _part_ok(parts_dir, c)]
        try:
            _check_space(out, len(manifest.images), sum(e - s for _, s, e in pending), spec.feature_dim, dtype)
        except PipelineError:
            _drop_if_empty(parts_dir)
            raise
        return pending, None

    pending, up_to_date = dist.decide(plan)
    if up_to_date is not None:
        return up_to_date
    if not job:  # the other ranks: rank 0 has checked these already
        job["manifest"] = load_manifest(cache_dir)
        job["spec"] = make_spec(arch, weights, resize, crop, cfg.interpolation, cfg.draft)
    manifest, spec = job["manifest"], job["spec"]
    preprocess = Preprocess.of(spec)
    settings = cache_settings(spec, preprocess, dtype, manifest)
    mine = pending[dist.rank::dist.world_size]

    started = time.perf_counter()
    computed, steady = 0, 0.0
    if mine:
        try:
            computed, steady = _compute(manifest, spec, preprocess, mine, parts_dir, dtype, dev, batch_size,
                                        default_workers(dev) if cfg.workers is None else cfg.workers, cfg.amp,
                                        progress and dist.is_main, cfg.verify, gpu_decode=cfg.gpu_decode)
        except BaseException as e:
            if dist.is_main:
                _drop_if_empty(parts_dir)
            if is_disk_error(e):  # the disk filled up while parts were written
                n, d, b = len(manifest.images), spec.feature_dim, np.dtype(NP_DTYPES[dtype]).itemsize
                raise disk_error(e, parts_dir, f"the cache needs about {n} x {d} x {b} bytes = "
                                 f"{human_bytes(_cache_bytes(n, d, dtype))} (and as much again for the parts "
                                 f"while they are joined); finished parts are kept: free space, or use --out "
                                 f"on a larger disk, and rerun") from None
            raise
    seconds = time.perf_counter() - started
    # also the barrier: every part is written before rank 0 joins them
    done = dist.all_gather((computed, seconds, steady))

    def assemble() -> ExtractSummary:
        chunks = _chunks(len(manifest.images), chunk_size)
        missing = [_part_path(parts_dir, k).name for k, _, _ in chunks if not _part_path(parts_dir, k).exists()]
        if missing:
            raise PipelineError(f"{len(missing)} finished part(s) are not in {parts_dir} (e.g. {missing[0]}): with "
                                f"several machines the cache folder must be on a filesystem they all share. "
                                f"Rerun the same command to compute them")
        try:
            _assemble(out, parts_dir, chunks, manifest, spec, preprocess, settings, dtype)
        except (OSError, RuntimeError) as e:
            err = as_disk_error(e, out, f"the finished parts in {parts_dir} are kept: free "
                                f"{human_bytes(_cache_bytes(len(manifest.images), spec.feature_dim, dtype))} "
                                f"and rerun the same command to join them")
            if err is None:
                raise
            raise err from None
        summary = _summary_from_file(out, up_to_date=False)
        summary.changed, summary.retried = job.get("changed", 0), job.get("retried", 0)
        return summary

    summary = dist.decide(assemble)
    summary.computed, summary.seconds = sum(d[0] for d in done), max(d[1] for d in done)
    summary.steady_images_per_second = sum(d[2] for d in done)
    return summary


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(k, start, end) of every chunk of rows: the unit of work, of crash safety and of the parts."""
    return [(k, s, min(s + chunk_size, n)) for k, s in enumerate(range(0, n, chunk_size))]


def _prepare_parts_dir(parts_dir: Path, settings: dict, chunk_size: int) -> None:
    meta = {"settings": settings, "chunk_size": chunk_size}
    meta_path = parts_dir / "settings.json"
    if parts_dir.exists() and meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old == meta:
            return
        raise PipelineError(f"{parts_dir} holds an unfinished extraction with other settings "
                            f"({describe_difference(old, meta)}): rerun with its settings to finish it, "
                            f"or with --force to start over")
    parts_dir.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, meta)


def _cache_bytes(n: int, d: int, dtype: str) -> int:
    return n * d * np.dtype(NP_DTYPES[dtype]).itemsize


def _check_space(out: Path, n: int, pending_rows: int, d: int, dtype: str) -> None:
    """Refuse before any work when `out`'s disk cannot hold the cache: N x D x bytes for features.h5,
    plus the parts still to compute (they stay until features.h5 is joined from them)."""
    b = np.dtype(NP_DTYPES[dtype]).itemsize
    need = _cache_bytes(n, d, dtype) + _cache_bytes(pending_rows, d, dtype) + 64 * n  # + valid/errors/ids/paths
    check_free_space(out.parent, need, f"the cache needs about {n} x {d} x {b} bytes for {out.name} plus "
                     f"{pending_rows} x {d} x {b} for the parts still to compute",
                     "free space, or use --out on a larger disk")


def _drop_if_empty(parts_dir: Path) -> None:
    """Remove a parts folder that holds no finished part: a run that failed before computing anything
    (wrong weights file, bad device) must not leave its settings behind to refuse the corrected rerun."""
    if parts_dir.is_dir() and not any(parts_dir.glob("part-*.npz")):
        shutil.rmtree(parts_dir, ignore_errors=True)


def _part_path(parts_dir: Path, k: int) -> Path:
    return parts_dir / f"part-{k:06d}.npz"


def _part_ok(parts_dir: Path, chunk: tuple[int, int, int]) -> bool:
    """True when chunk k's part exists and is whole; a damaged part is deleted so it gets recomputed."""
    k, s, e = chunk
    path = _part_path(parts_dir, k)
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            ok = z["features"].shape[0] == e - s and z["valid"].shape[0] == e - s
        with np.load(_stats_path(parts_dir, k), allow_pickle=False) as z:  # written just before the part
            ok = ok and z["file_size"].shape[0] == e - s
    except Exception:  # noqa: BLE001 - any damage (or a part without its image records) means: compute it again
        ok = False
    if not ok:
        path.unlink(missing_ok=True)
    return ok


def _stats_path(parts_dir: Path, k: int) -> Path:
    return parts_dir / f"stats-{k:06d}.npz"


def _write_stats(parts_dir: Path, k: int, stats: dict[str, np.ndarray]) -> None:
    """The image records (changes.py) of chunk k, written before its part: a part never lacks them."""
    with atomic_path(_stats_path(parts_dir, k)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **stats)


def _rows_to_redo(out: Path, manifest: Manifest, verify: str, retry_failed: bool, job: dict) -> np.ndarray | None:
    """(N,) bool: rows of the existing, settings-matching `out` to compute again, because their image file
    changed or (with `retry_failed`) they failed before; None when `out` has no image records (made before
    they existed). Stats every image (and hashes it with verify=hash); counts and notes go into `job`."""
    with h5py.File(out, "r") as f:
        old = read_stats(f)
        valid = f["valid"][:]
    if old is None:
        job["note"] = ("made before per-image records: changed or repaired pictures are not detected; rerun with "
                       "--force to rebuild it with them")
        return None
    job["now"] = now = image_stats([manifest.path_of(i) for i in range(len(manifest.images))], verify == "hash")
    changed = changed_rows(old, now, verify)
    redo = changed | (~valid if retry_failed else np.zeros_like(changed))
    job["changed"], job["retried"] = int((redo & valid).sum()), int((redo & ~valid).sum())
    if (~valid).any() and not retry_failed and not redo.any():
        job["note"] = "--retry-failed redoes the failed images"
    return redo


def _seed_parts(out: Path, parts_dir: Path, chunks: list, redo: np.ndarray, now: dict, verify: str) -> list:
    """Fill the parts folder from `out` for every chunk without a row to redo; return the chunks to compute.

    A chunk to redo keeps a part left by an interrupted earlier update only if that part's image records
    still match the files now. Assembling then gives the file a from-scratch run would write."""
    pending = []
    with h5py.File(out, "r") as f:
        for k, s, e in chunks:
            if redo[s:e].any():
                fresh = _part_ok(parts_dir, (k, s, e))
                if fresh:
                    with np.load(_stats_path(parts_dir, k), allow_pickle=False) as z:
                        fresh = not changed_rows({key: z[key] for key in STAT_KEYS},
                                                 {key: v[s:e] for key, v in now.items()}, verify).any()
                if not fresh:
                    _part_path(parts_dir, k).unlink(missing_ok=True)
                    pending.append((k, s, e))
            elif not _part_ok(parts_dir, (k, s, e)):
                _write_stats(parts_dir, k, {key: f[key][s:e].astype(f[key].dtype.str) for key in STAT_KEYS})
                _write_part(parts_dir, k, f["features"][s:e], list(f["errors"].asstr()[s:e]))
    return pending


def _compute(manifest: Manifest, spec: EncoderSpec, preprocess: Preprocess, pending: list, parts_dir: Path,
             dtype: str, dev: torch.device, batch_size: int, workers: int, amp: str, progress: bool,
             verify: str = "stat", gpu_decode: bool = False) -> tuple[int, float]:
    """Compute the `pending` chunks' parts; returns (images computed, steady images/s: see ExtractSummary)."""
    # Batches are cut inside each chunk, so resuming reproduces the uninterrupted run's batches.
    batches = [list(range(b, min(b + batch_size, e))) for _, s, e in pending for b in range(s, e, batch_size)]
    paths = [manifest.path_of(i) for i in range(len(manifest.images))]
    # What each image file is before the loader reads it: a file changed after this is caught next run.
    stats = {k: image_stats(paths[s:e], verify == "hash") for k, s, e in pending}
    images = image_batches(paths, preprocess, batches, dev, workers, gpu_decode)  # decoding starts now
    encoder = load_encoder(spec, dev)
    total = sum(e - s for _, s, e in pending)
    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True,
               file=sys.stderr, smoothing=0.1)
    np_dtype = NP_DTYPES[dtype]
    chunks = iter(pending)
    k, s, e = next(chunks)
    feats, errors = np.zeros((e - s, spec.feature_dim), dtype=np_dtype), [""] * (e - s)
    first: tuple[float, int] | None = None  # (time, images) at the end of the first batch
    for rows, out, errs in encode_images(encoder, images, dev, amp):
        check_storable(out, dtype, spec.arch, [paths[r] for r in rows])
        feats[rows - s] = out.astype(np_dtype)
        for j, err in zip(rows - s, errs):
            errors[j] = err
        bar.update(len(rows))
        if first is None:
            first = (time.perf_counter(), len(rows))
        if rows[-1] == e - 1:  # chunk finished: make it durable before moving on
            _write_stats(parts_dir, k, stats[k])
            _write_part(parts_dir, k, feats, errors)
            nxt = next(chunks, None)
            if nxt is None:
                break
            k, s, e = nxt
            feats, errors = np.zeros((e - s, spec.feature_dim), dtype=np_dtype), [""] * (e - s)
    bar.close()
    steady = (total - first[1]) / (time.perf_counter() - first[0]) if first and total > first[1] else 0.0
    return total, steady


def _write_part(parts_dir: Path, k: int, feats: np.ndarray, errors: list[str]) -> None:
    valid = np.array([not err for err in errors], dtype=bool)
    with atomic_path(_part_path(parts_dir, k)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=feats, valid=valid, errors=np.array(errors, dtype=str))


def _assemble(out: Path, parts_dir: Path, chunks: list, manifest: Manifest, spec: EncoderSpec,
              preprocess: Preprocess, settings: dict, dtype: str) -> None:
    """Join the parts into one features.h5, one chunk in memory at a time."""
    n, d = len(manifest.images), spec.feature_dim
    str_dt = h5py.string_dtype("utf-8")
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            ds = f.create_dataset("features", shape=(n, d), dtype=dtype, chunks=(min(max(n, 1), 256), d),
                                  track_times=False, **checksummed(n))
            valid = f.create_dataset("valid", shape=(n,), dtype=bool, track_times=False, **checksummed(n))
            errors = f.create_dataset("errors", shape=(n,), dtype=str_dt, track_times=False)
            records = {key: f.create_dataset(key, shape=(n,), dtype="S64" if key == "sha256" else np.int64,
                                             track_times=False, **checksummed(n)) for key in STAT_KEYS}
            for k, s, e in chunks:
                with np.load(_part_path(parts_dir, k), allow_pickle=False) as z:
                    ds[s:e] = z["features"]
                    valid[s:e] = z["valid"]
                    errors[s:e] = z["errors"].astype(object)
                with np.load(_stats_path(parts_dir, k), allow_pickle=False) as z:
                    for key, dset in records.items():
                        dset[s:e] = z[key]
            f.create_dataset("image_ids", data=np.array([r.id for r in manifest.images], dtype=np.int64),
                             track_times=False, **checksummed(n))
            f.create_dataset("paths", data=np.array([r.file for r in manifest.images], dtype=object),
                             dtype=str_dt, track_times=False)
            attrs = {**spec.as_dict(), "preprocess": json.dumps(preprocess.describe()), "dtype": dtype,
                     "manifest_fingerprint": manifest.fingerprint, "n_images": n,
                     "settings": json.dumps(settings, sort_keys=True), "settings_fingerprint": sha256_json(settings),
                     "pipeline_version": __version__, "torch_version": str(torch.__version__),
                     "torchvision_version": _version("torchvision"), "h5py_version": h5py.__version__,
                     "pillow_version": _version("PIL")}
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (int, float)) else str(value)
    shutil.rmtree(parts_dir, ignore_errors=True)


def check_storable(feats: np.ndarray, dtype: str, arch: str, paths: list[str]) -> None:
    """Refuse features (B, D) float32 that are non-finite, or that `dtype` would store as inf.

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
                            f"{limit:.6g}, so they would be stored as inf: rerun with --dtype float32 --force")


def verify_features_file(path: Path, rebuild: str) -> None:
    """Read `path` through once, block by block: HDF5 verifies each chunk's checksum (files written since
    checksums were added) and every valid row must be finite. Cheap next to extraction (~1 s per GB),
    so an "up to date" answer is never given for a damaged file."""
    with reading(path, rebuild), h5py.File(path, "r") as f:
        feats, valid = f["features"], f["valid"][:]
        f["image_ids"][:]
        step = max(1, (feats.chunks or (4096,))[0])
        for s in range(0, feats.shape[0], step):
            block = feats[s:s + step]  # (b, D)
            bad = ~np.isfinite(block).all(axis=1) & valid[s:s + step]
            if bad.any():
                raise PipelineError(f"{path} holds non-finite features (inf/NaN) at row {s + int(np.argmax(bad))}: "
                                    f"rebuild it with `{rebuild} --dtype float32`")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _summary_from_file(out: Path, up_to_date: bool) -> ExtractSummary:
    with h5py.File(out, "r") as f:
        valid = f["valid"][:]
        bad = np.flatnonzero(~valid)
        paths = f["paths"].asstr()[:] if len(bad) else []
        errors = f["errors"].asstr()[:] if len(bad) else []
        failures = [(str(paths[i]), str(errors[i])) for i in bad]
        return ExtractSummary(images=len(valid), computed=0, failures=failures, up_to_date=up_to_date, path=str(out))
