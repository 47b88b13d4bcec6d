"""The parts store of one feature file: the plan of a run, the finished chunks on disk, and joining them.

Work is done in fixed chunks of rows (k, start, end); each finished chunk is written atomically as
`features.h5.parts/part-XXXXXX.npz`, after its image records `stats-XXXXXX.npz` (changes.py), next to
`settings.json` (the cache settings and the chunk size: a rerun with others is refused, never mixed).
A run that dies keeps every finished chunk; the next one plans only the rest (`make_plan`). An update of an
existing cache is seeded from it: every chunk without a row to redo becomes a part again (`Parts.seed`).
`Parts.assemble` joins the parts into the feature file (written to a temp file and renamed), then removes
them. Which process wrote a part does not change it, so the file is the same as one straight run's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline import __version__
from pipeline.core.cache import GRID_NAME, EncoderSpec, checksummed, describe_difference, read_features_attrs, reading
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_path, sha256_json, write_json
from pipeline.core.manifest import Manifest
from pipeline.core.storage import check_free_space, remove_stale_temps
from pipeline.encoder.images import Preprocess
from pipeline.extract.changes import STAT_KEYS, changed_rows, image_stats, read_stats

NP_DTYPES = {"float16": np.float16, "float32": np.float32}
NO_RECORDS_NOTE = ("made before per-image records: changed or repaired pictures are not detected; rerun with "
                   "--force to rebuild it with them")

Chunk = tuple[int, int, int]  # (k, start, end): chunk k holds rows start..end-1


def chunks(n: int, chunk_size: int) -> list[Chunk]:
    """Every chunk of n rows: the unit of work, of crash safety and of the parts."""
    return [(k, s, min(s + chunk_size, n)) for k, s in enumerate(range(0, n, chunk_size))]


@dataclass
class Plan:
    """What rank 0 decided before any work (the same on every rank): the chunks still to compute, or that the
    feature file is up to date; for an update, how many changed and previously failed images it redoes."""

    pending: list[Chunk]
    up_to_date: bool = False
    changed: int = 0
    retried: int = 0
    note: str = ""  # said with an up-to-date answer


class Parts:
    """The parts folder of the feature file `out`: `out` + ".parts"."""

    def __init__(self, out: Path, regions: int = 0):
        self.out = out
        self.dir = out.with_name(out.name + ".parts")
        self.regions = regions  # G*G regions per image kept in each part's `grid`, 0 for pooled features only

    def part_path(self, k: int) -> Path:
        return self.dir / f"part-{k:06d}.npz"

    def stats_path(self, k: int) -> Path:
        return self.dir / f"stats-{k:06d}.npz"

    def remove_stale_temps(self) -> None:
        """Temp files of a killed run: beside `out` (as big as the cache, when killed while assembling) and here."""
        remove_stale_temps(self.out.parent, [self.out.name])
        remove_stale_temps(self.dir, ["part-*.npz", "stats-*.npz", "settings.json"])

    def prepare(self, settings: dict, chunk_size: int) -> None:
        """Make the folder for a run with these settings; refuse one an unfinished run with others left."""
        meta = {"settings": settings, "chunk_size": chunk_size}
        meta_path = self.dir / "settings.json"
        if self.dir.exists() and meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old == meta:
                return
            raise PipelineError(f"{self.dir} holds an unfinished extraction with other settings "
                                f"({describe_difference(old, meta)}): rerun with its settings to finish it, "
                                f"or with --force to start over")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, meta)

    def remove(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def drop_if_empty(self) -> None:
        """Remove a folder that holds no finished part: a run that failed before computing anything (wrong
        weights file, bad device) must not leave its settings behind to refuse the corrected rerun."""
        if self.dir.is_dir() and not any(self.dir.glob("part-*.npz")):
            shutil.rmtree(self.dir, ignore_errors=True)

    def ok(self, chunk: Chunk) -> bool:
        """True when the chunk's part exists and is whole; a damaged part is deleted so it gets recomputed."""
        k, s, e = chunk
        path = self.part_path(k)
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as z:
                ok = z["features"].shape[0] == e - s and z["valid"].shape[0] == e - s
                ok = ok and (z["grid"].shape[:2] == (e - s, self.regions) if self.regions else "grid" not in z)
            with np.load(self.stats_path(k), allow_pickle=False) as z:  # written just before the part
                ok = ok and z["file_size"].shape[0] == e - s
        except Exception:  # noqa: BLE001 - any damage (or a part without its image records) means: compute it again
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
        return ok

    def write_stats(self, k: int, stats: dict[str, np.ndarray]) -> None:
        """The image records (changes.py) of chunk k, written before its part: a part never lacks them."""
        with atomic_path(self.stats_path(k)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **stats)

    def write_part(self, k: int, feats: np.ndarray, errors: list[str], grid: np.ndarray | None = None) -> None:
        """Chunk k's features (rows, D), grids (rows, G*G, D) if kept, and decode errors ("" for a valid row),
        made durable at once."""
        valid = np.array([not err for err in errors], dtype=bool)
        extra = {} if grid is None else {"grid": grid}
        with atomic_path(self.part_path(k)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=feats, valid=valid, errors=np.array(errors, dtype=str), **extra)

    def seed(self, every: list[Chunk], redo: np.ndarray, now: dict, verify: str) -> list[Chunk]:
        """Fill the folder from `out` for every chunk without a row to `redo`; return the chunks to compute.

        A chunk to redo keeps a part left by an interrupted earlier update only if that part's image records
        still match the files `now`. Assembling then gives the file a from-scratch run would write."""
        pending = []
        with h5py.File(self.out, "r") as f:
            for k, s, e in every:
                if redo[s:e].any():
                    if not self._fresh((k, s, e), now, verify):
                        self.part_path(k).unlink(missing_ok=True)
                        pending.append((k, s, e))
                elif not self.ok((k, s, e)):
                    self.write_stats(k, {key: f[key][s:e].astype(f[key].dtype.str) for key in STAT_KEYS})
                    self.write_part(k, f["features"][s:e], list(f["errors"].asstr()[s:e]),
                                    f[GRID_NAME][s:e] if self.regions else None)
        return pending

    def _fresh(self, chunk: Chunk, now: dict, verify: str) -> bool:
        """True when the chunk's part is whole and was made from the image files as they are `now`."""
        k, s, e = chunk
        if not self.ok(chunk):
            return False
        with np.load(self.stats_path(k), allow_pickle=False) as z:
            return not changed_rows({key: z[key] for key in STAT_KEYS},
                                    {key: v[s:e] for key, v in now.items()}, verify).any()

    def check_all_there(self, every: list[Chunk]) -> None:
        """Refuse to join when a part is missing (another machine's parts written to a folder not shared)."""
        missing = [self.part_path(k).name for k, _, _ in every if not self.part_path(k).exists()]
        if missing:
            raise PipelineError(f"{len(missing)} finished part(s) are not in {self.dir} (e.g. {missing[0]}): with "
                                f"several machines the cache folder must be on a filesystem they all share. "
                                f"Rerun the same command to compute them")

    def assemble(self, every: list[Chunk], manifest: Manifest, spec: EncoderSpec, preprocess: Preprocess,
                 settings: dict, dtype: str) -> None:
        """Join the parts into one feature file, one chunk in memory at a time, then remove them."""
        n, d = len(manifest.images), spec.feature_dim
        str_dt = h5py.string_dtype("utf-8")
        with atomic_path(self.out) as tmp:
            with h5py.File(tmp, "w", track_order=False) as f:
                ds = f.create_dataset("features", shape=(n, d), dtype=dtype, chunks=(min(max(n, 1), 256), d),
                                      track_times=False, **checksummed(n))
                # one chunk per image: a batch reads its own rows and nothing else
                grid = f.create_dataset(GRID_NAME, shape=(n, self.regions, d), dtype=dtype, chunks=(1, self.regions, d),
                                        track_times=False, **checksummed(n)) if self.regions and n else None
                valid = f.create_dataset("valid", shape=(n,), dtype=bool, track_times=False, **checksummed(n))
                errors = f.create_dataset("errors", shape=(n,), dtype=str_dt, track_times=False)
                records = {key: f.create_dataset(key, shape=(n,), dtype="S64" if key == "sha256" else np.int64,
                                                 track_times=False, **checksummed(n)) for key in STAT_KEYS}
                for k, s, e in every:
                    with np.load(self.part_path(k), allow_pickle=False) as z:
                        ds[s:e] = z["features"]
                        if grid is not None:
                            grid[s:e] = z["grid"]
                        valid[s:e] = z["valid"]
                        errors[s:e] = z["errors"].astype(object)
                    with np.load(self.stats_path(k), allow_pickle=False) as z:
                        for key, dset in records.items():
                            dset[s:e] = z[key]
                f.create_dataset("image_ids", data=np.array([r.id for r in manifest.images], dtype=np.int64),
                                 track_times=False, **checksummed(n))
                f.create_dataset("paths", data=np.array([r.file for r in manifest.images], dtype=object),
                                 dtype=str_dt, track_times=False)
                for key, value in _attrs(manifest, spec, preprocess, settings, dtype).items():
                    f.attrs[key] = value if isinstance(value, (int, float)) else str(value)
        shutil.rmtree(self.dir, ignore_errors=True)


def _attrs(manifest: Manifest, spec: EncoderSpec, preprocess: Preprocess, settings: dict, dtype: str) -> dict:
    """The feature file's attributes: the encoder spec, preprocessing, dtype, settings, library versions."""
    return {**spec.as_dict(), "preprocess": json.dumps(preprocess.describe()), "dtype": dtype,
            "manifest_fingerprint": manifest.fingerprint, "n_images": len(manifest.images),
            "settings": json.dumps(settings, sort_keys=True), "settings_fingerprint": sha256_json(settings),
            "pipeline_version": __version__, "torch_version": str(torch.__version__),
            "torchvision_version": _version("torchvision"), "h5py_version": h5py.__version__,
            "pillow_version": _version("PIL")}


def make_plan(parts: Parts, manifest: Manifest, settings: dict, feature_dim: int, dtype: str, chunk_size: int,
         verify: str, retry_failed: bool, force: bool, rebuild: Callable[[str], str]) -> Plan:
    """Rank 0, holding the lock of `parts.out`: refuse, report up to date, or list the chunks without a finished
    part. An existing file with these settings is checked through (`rebuild(dtype)`: the command that rebuilds
    it with these settings in that dtype, see core.cache.extract_command) and updated; one with other settings
    is refused unless `force`."""
    out = parts.out
    if out.exists() and not force:
        old = settings_of(read_features_attrs(out, rebuild(dtype)))
        if old != settings:
            raise PipelineError(f"{out} was made with other settings ({describe_difference(old or {}, settings)}). "
                                f"It is never reused or mixed: rerun with --force to rebuild it, or use --out for a second cache")
        verify_features_file(out, rebuild, dtype)
        return _plan_update(parts, manifest, settings, chunk_size, verify, retry_failed)
    if force:
        parts.remove()
    parts.prepare(settings, chunk_size)
    pending = [c for c in chunks(len(manifest.images), chunk_size) if not parts.ok(c)]
    try:
        _check_space(out, len(manifest.images), sum(e - s for _, s, e in pending), feature_dim, dtype, parts.regions)
    except PipelineError:
        parts.drop_if_empty()
        raise
    return Plan(pending)


def _plan_update(parts: Parts, manifest: Manifest, settings: dict, chunk_size: int, verify: str,
                 retry_failed: bool) -> Plan:
    """The plan for an existing file with these settings: redo the chunks of the images whose file changed
    (and with `retry_failed` of those that failed), the parts of the others seeded from the file."""
    found = _rows_to_redo(parts.out, manifest, verify, retry_failed)
    if found is None:
        return _up_to_date(parts, NO_RECORDS_NOTE)
    redo, valid, now = found
    if not redo.any():
        return _up_to_date(parts, "" if valid.all() or retry_failed else "--retry-failed redoes the failed images")
    parts.prepare(settings, chunk_size)
    pending = parts.seed(chunks(len(manifest.images), chunk_size), redo, now, verify)
    return Plan(pending, changed=int((redo & valid).sum()), retried=int((redo & ~valid).sum()))


def _up_to_date(parts: Parts, note: str) -> Plan:
    parts.remove()  # left by a run killed after its final rename
    return Plan([], up_to_date=True, note=note)


def _rows_to_redo(out: Path, manifest: Manifest, verify: str,
                  retry_failed: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """(redo, valid, now): rows (N,) bool of `out` to compute again, because their image file changed or (with
    `retry_failed`) they failed before; its valid rows (N,) bool; the image records now (every image stat'ed,
    and hashed with verify=hash). None when `out` has no image records (made before they existed)."""
    with h5py.File(out, "r") as f:
        old = read_stats(f)
        valid = f["valid"][:]
    if old is None:
        return None
    now = image_stats([manifest.path_of(i) for i in range(len(manifest.images))], verify == "hash")
    changed = changed_rows(old, now, verify)
    return changed | (~valid if retry_failed else np.zeros_like(changed)), valid, now


def settings_of(attrs: dict) -> dict | None:
    raw = attrs.get("settings")
    return json.loads(raw) if raw else None


def cache_bytes(n: int, d: int, dtype: str, regions: int = 0) -> int:
    """Bytes of n images' features: D values each, plus G*G x D for the grid when kept."""
    return n * d * (1 + regions) * np.dtype(NP_DTYPES[dtype]).itemsize


def row_size_text(d: int, dtype: str, regions: int = 0) -> str:
    """One image's bytes as the space messages spell them: '512 x 2', '512 x 2 x (1 + 49 regions)'."""
    return f"{d} x {np.dtype(NP_DTYPES[dtype]).itemsize}" + (f" x (1 + {regions} regions)" if regions else "")


def _check_space(out: Path, n: int, pending_rows: int, d: int, dtype: str, regions: int = 0) -> None:
    """Refuse before any work when `out`'s disk cannot hold the cache: N x D x bytes for features.h5 (times
    1 + G*G with the grid), plus the parts still to compute (they stay until features.h5 is joined from them)."""
    need = cache_bytes(n, d, dtype, regions) + cache_bytes(pending_rows, d, dtype, regions) + 64 * n  # + valid/ids/...
    per = row_size_text(d, dtype, regions)
    check_free_space(out.parent, need, f"the cache needs about {n} x {per} bytes for {out.name} plus "
                     f"{pending_rows} x {per} for the parts still to compute",
                     "free space, or use --out on a larger disk")


def verify_features_file(path: Path, rebuild: Callable[[str], str], dtype: str) -> None:
    """Read `path` through once, block by block: HDF5 verifies each chunk's checksum (files written since
    checksums were added) and every valid row must be finite. Cheap next to extraction (~1 s per GB),
    so an "up to date" answer is never given for a damaged file. `rebuild(dtype)`: see make_plan."""
    with reading(path, rebuild(dtype)), h5py.File(path, "r") as f:
        feats, valid = f["features"], f["valid"][:]
        f["image_ids"][:]
        step = max(1, (feats.chunks or (4096,))[0])
        for s in range(0, feats.shape[0], step):
            block = feats[s:s + step]  # (b, D)
            bad = ~np.isfinite(block).all(axis=1) & valid[s:s + step]
            if bad.any():
                raise PipelineError(f"{path} holds non-finite features (inf/NaN) at row {s + int(np.argmax(bad))}: "
                                    f"rebuild it with `{rebuild('float32')}`")
        if GRID_NAME in f:  # every grid chunk's checksum too (~1 s per GB)
            grid = f[GRID_NAME]
            for s in range(0, grid.shape[0], 256):
                grid[s:s + 256]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "unknown"
