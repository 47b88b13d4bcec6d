"""Fetch and unpack public captioning data: `pipeline download coco2014 DIR`, `pipeline download flickr8k DIR`.

The image archives are large (train2014.zip is 13.5 GB) and servers drop long connections, so:

* every file downloads into `DIR/NAME.part`, resumes from that file's size with an HTTP Range
  request (in this run after a cut, or in a later run), and becomes `DIR/NAME` only once its size
  and, where one is published, its checksum are verified;
* every archive passes `ZipFile.testzip()` and a path-safety check before a single member is
  written, so a damaged or hostile archive is refused rather than half extracted;
* a marker `DIR/.NAME.extracted` records finished work, so a rerun skips it without any request.

Only the standard library speaks HTTP (`urllib.request`): it honours the usual proxy variables and
adds no dependency.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.core.fileio import write_json

COCO_BASE_URL = "http://images.cocodataset.org/"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
FLICKR8K_BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
USER_AGENT = "pipeline-download/0.1 (Python urllib)"

_CHUNK = 1 << 20
_BACKOFF_S = 1.0  # first pause between retries; doubles each time, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 30.0
_RETRIABLE_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)
_BROKEN_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                      RuntimeError, ValueError)


@dataclass(frozen=True)
class RemoteFile:
    """One archive to fetch and unpack into DIR.

    `size` and `checksum` are filled only where known for certain; when None the server's
    Content-Length is trusted and `testzip()` is the only integrity check.
    """

    name: str  # file name in DIR
    url: str  # default address; a COCO_BASE_URL prefix is swapped for `base_url`
    size: int | None  # bytes
    checksum: str | None  # "md5:<hex>" or "sha256:<hex>"
    outputs: tuple[str, ...]  # paths under DIR the archive must produce (checked on every rerun)
    only: tuple[str, ...] = ()  # extract just these members (matched by base name) to DIR/; () = all
    exclude: tuple[str, ...] = ()  # top-level folders never written (still checked for unsafe paths)


# Sizes and md5s as served by images.cocodataset.org (the md5s are also its S3 ETags).
# Karpathy's caption_datasets.zip has no published size or checksum.
COCO2014_FILES: tuple[RemoteFile, ...] = (
    RemoteFile("train2014.zip", COCO_BASE_URL + "zips/train2014.zip",
               13_510_573_713, "md5:0da8c0bd3d6becc4dcb32757491aca88", ("train2014",)),
    RemoteFile("val2014.zip", COCO_BASE_URL + "zips/val2014.zip",
               6_645_013_297, "md5:a3d79f5ed8d289b7a7554ce06a5782b3", ("val2014",)),
    RemoteFile("annotations_trainval2014.zip", COCO_BASE_URL + "annotations/annotations_trainval2014.zip",
               252_872_794, "md5:0a379cfc70b0e71301e0f377548639bd",
               ("annotations/captions_train2014.json", "annotations/captions_val2014.json")),
    RemoteFile("caption_datasets.zip", KARPATHY_URL, None, None,
               ("dataset_coco.json",), only=("dataset_coco.json",)),
)

# Flickr8k from its usual public mirror (Jason Brownlee's GitHub release). No size or checksum is
# published for these archives and none is invented here: see download_flickr8k for what is checked.
# The text archive comes first: 3 MB that prove the mirror right before the 1 GB of photos.
# __MACOSX/ holds macOS resource forks (`._NAME`) when an archive was zipped on a Mac: never written.
FLICKR8K_TOKEN = "Flickr8k.token.txt"
FLICKR8K_SPLIT_LISTS = ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")
FLICKR8K_IMAGES = "Flicker8k_Dataset"  # sic: the archive's folder is misspelt
FLICKR8K_FILES: tuple[RemoteFile, ...] = (
    RemoteFile("Flickr8k_text.zip", FLICKR8K_BASE_URL + "Flickr8k_text.zip", None, None,
               (FLICKR8K_TOKEN, *FLICKR8K_SPLIT_LISTS), exclude=("__MACOSX",)),
    RemoteFile("Flickr8k_Dataset.zip", FLICKR8K_BASE_URL + "Flickr8k_Dataset.zip", None, None,
               (FLICKR8K_IMAGES,), exclude=("__MACOSX",)),
)


@dataclass
class FileResult:
    name: str
    action: str  # "downloaded" (from byte 0), "resumed" (from an earlier .part) or "skipped"
    nbytes: int  # bytes received over the network in this run
    seconds: float
    extracted: bool = False  # unpacked in this run
    reconnects: int = 0  # retries after cuts or errors in this run


@dataclass
class DownloadSummary:
    dest: Path
    files: list[FileResult] = field(default_factory=list)
    dataset: str = "coco2014"

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.files)

    def line(self) -> str:
        """One line for the CLI, e.g. `coco2014 in data/coco: 3 downloaded, 1 skipped; 1.2 GiB in 40.1 s`."""
        counts = Counter(f.action for f in self.files)
        what = ", ".join(f"{counts[a]} {a}" for a in ("downloaded", "resumed", "skipped") if counts[a])
        extracted = sum(f.extracted for f in self.files)
        rate = f" ({_human(self.nbytes / self.seconds)}/s)" if self.nbytes and self.seconds > 0 else ""
        return (f"{self.dataset} in {self.dest}: {what or 'nothing to do'}, {extracted} extracted; "
                f"{_human(self.nbytes)} in {self.seconds:.1f} s{rate}")


def download_coco2014(
    dest: str | os.PathLike,
    base_url: str | None = None,
    karpathy_url: str | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60,
    *,
    files: Sequence[RemoteFile] = COCO2014_FILES,
    keep_archives: bool = True,
    log: Callable[[str], None] | None = None,
) -> DownloadSummary:
    """Download and extract COCO 2014 images, captions and Karpathy's split into `dest`.

    Result: dest/train2014/, dest/val2014/, dest/annotations/captions_{train,val}2014.json and
    dest/dataset_coco.json. Safe to interrupt and rerun: partial downloads resume, finished
    archives are neither fetched nor extracted again.

    `base_url` replaces http://images.cocodataset.org/ (a mirror), `karpathy_url` the whole
    Karpathy address. `retries` bounds consecutive failed attempts per file; an attempt that
    received data resets the count, so a long download survives any number of spaced-out cuts.
    `timeout` is the socket timeout in seconds. `files` exists for tests and other mirrors;
    `keep_archives=False` deletes each zip once extracted. `log` receives status lines (default:
    stderr, without breaking progress bars).
    """
    return _fetch("coco2014", dest, files,
                  lambda remote: _resolve_url(remote, COCO_BASE_URL, base_url, {KARPATHY_URL: karpathy_url}),
                  "--base-url / --karpathy-url", progress, retries, timeout, keep_archives, log)


def download_flickr8k(
    dest: str | os.PathLike,
    base_url: str | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60,
    *,
    files: Sequence[RemoteFile] = FLICKR8K_FILES,
    keep_archives: bool = True,
    log: Callable[[str], None] | None = None,
) -> DownloadSummary:
    """Download and extract Flickr8k's photos and text files into `dest`, ready for
    `pipeline prepare --dataset flickr8k --annotations DEST --images DEST` (see `flickr8k_prepare_command`).

    Result: dest/Flickr8k.token.txt, dest/Flickr_8k.{train,dev,test}Images.txt (and the archive's
    other text files) beside dest/Flicker8k_Dataset/ (sic) with the photos, which is where
    prepare's read_flickr8k looks (FLICKR_IMAGE_SUBDIRS). Resumable and rerunnable exactly as
    `download_coco2014`, by the same code.

    Checks: these archives have no published size or checksum, so none is compared. What is
    checked instead: the download's length against the server's Content-Length (a cut transfer
    is resumed, never accepted short), the CRC of every member (`ZipFile.testzip`) before anything
    is written, every member's path (zip-slip), and that the archive holds the token file, the
    three split lists and a non-empty Flicker8k_Dataset/ (before unpacking; on disk on every rerun).
    A mirror serving a different but intact zip with those names is not detected.

    `base_url` replaces the GitHub release address (a mirror with the same file names); the other
    arguments are those of `download_coco2014`.
    """
    return _fetch("flickr8k", dest, files, lambda remote: _resolve_url(remote, FLICKR8K_BASE_URL, base_url),
                  "--base-url", progress, retries, timeout, keep_archives, log)


def flickr8k_prepare_command(dest: str | os.PathLike) -> str:
    """The command that prepares a `download flickr8k` folder, quoted for a POSIX shell."""
    d = shlex.quote(str(dest))
    return f"pipeline prepare --dataset flickr8k --annotations {d} --images {d}"


def _fetch(dataset: str, dest: str | os.PathLike, files: Sequence[RemoteFile], url_of: Callable[[RemoteFile], str],
           mirror_flags: str, progress: bool, retries: int, timeout: float, keep_archives: bool,
           log: Callable[[str], None] | None) -> DownloadSummary:
    """What every `pipeline download DATASET` does: each archive fetched (resumably, verified), checked,
    unpacked and marked done, in order. `url_of` maps a file to its address (mirror options applied);
    `mirror_flags` names those options in error messages."""
    if retries < 0:
        raise PipelineError(f"retries must be >= 0, got {retries}")
    if timeout <= 0:
        raise PipelineError(f"timeout must be > 0 seconds, got {timeout}")
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise PipelineError(f"{dest} exists and is not a directory: pass a directory to download into")
    dest.mkdir(parents=True, exist_ok=True)

    summary = DownloadSummary(dest, dataset=dataset)
    for remote in files:
        start = time.monotonic()
        marker = dest / f".{remote.name}.extracted"
        if _is_extracted(dest, remote, marker):
            log(f"{remote.name}: already downloaded and extracted, skipping")
            summary.files.append(FileResult(remote.name, "skipped", 0, 0.0))
            continue

        archive = dest / remote.name
        if archive.exists():
            log(f"{remote.name}: already downloaded, extracting")
            _check_present_archive(archive, remote)
            action, nbytes, reconnects = "skipped", 0, 0
        else:
            action, nbytes, reconnects = _download(url_of(remote), archive, remote, retries, timeout, progress,
                                                   log, mirror_flags)

        members = _extract(archive, dest, remote, progress, log, mirror_flags)
        write_json(marker, {"archive": remote.name, "bytes": archive.stat().st_size,
                            "members": members, "outputs": list(remote.outputs)})
        if not keep_archives:
            archive.unlink()
        summary.files.append(FileResult(remote.name, action, nbytes, time.monotonic() - start,
                                        extracted=True, reconnects=reconnects))
    return summary


def _resolve_url(remote: RemoteFile, default_base: str, base_url: str | None,
                 replacements: dict[str, str | None] | None = None) -> str:
    """A whole-address replacement if one is given for `remote.url`, else `default_base` swapped for
    `base_url` (a mirror with the same layout), else the default address."""
    if replacements and replacements.get(remote.url):
        return replacements[remote.url]
    if base_url and remote.url.startswith(default_base):
        return base_url.rstrip("/") + "/" + remote.url[len(default_base):]
    return remote.url


def _is_extracted(dest: Path, remote: RemoteFile, marker: Path) -> bool:
    """Done means the marker exists and so does everything it promised (a user may delete a folder)."""
    return marker.exists() and all((dest / out).exists() for out in remote.outputs)


def _check_present_archive(archive: Path, remote: RemoteFile) -> None:
    """An archive already in DIR was verified when we renamed it there; a hand-copied one may be short."""
    size = archive.stat().st_size
    if remote.size is not None and size != remote.size:
        raise PipelineError(f"{archive} has {size} bytes but should have {remote.size}: "
                            f"delete it and rerun `pipeline download` to fetch it again")


# --- downloading ------------------------------------------------------------------------------


class _Retry(Exception):
    """A transient failure (cut connection, timeout, 5xx): wait, then try again from where we are."""


class _Transfer:
    """One file's download into NAME.part; survives any number of attempts.

    State kept across attempts: the bytes on disk (`offset`), a running hash of exactly those bytes
    (so a completed resume needs no second pass over 13 GB), and the progress bar.
    """

    def __init__(self, url: str, part: Path, remote: RemoteFile, timeout: float, progress: bool,
                 log: Callable[[str], None], mirror_flags: str):
        self.url, self.part, self.remote, self.timeout, self.log = url, part, remote, timeout, log
        self.mirror_flags = mirror_flags
        self.offset = part.stat().st_size if part.exists() else 0
        self.resumed = self.offset > 0
        self.received = 0
        self.total = remote.size  # refined from the server's answer
        self.hasher = None
        if remote.checksum:
            algo = remote.checksum.split(":", 1)[0]
            self.hasher = hashlib.new(algo)
            if self.offset:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        self.hasher.update(chunk)
        self.bar = tqdm(total=self.total, initial=self.offset, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=remote.name, disable=not progress, leave=True)

    def restart(self, why: str) -> None:
        """Throw away the .part: its bytes cannot be continued (server ignored Range, bad offset)."""
        if self.offset:
            self.log(f"{self.remote.name}: {why}; restarting from byte 0")
        self.part.write_bytes(b"")
        self.offset = 0
        self.resumed = False
        if self.hasher is not None:
            self.hasher = hashlib.new(self.hasher.name)
        self.bar.reset(total=self.total)

    def attempt(self) -> None:
        """Fetch the rest of the file; return when the .part is complete, raise _Retry when not."""
        headers = {"User-Agent": USER_AGENT}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            self._http_error(e)
            return
        except _RETRIABLE_NETWORK_ERRORS as e:
            raise _Retry(str(getattr(e, "reason", e))) from e

        with response:
            if response.status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != self.offset:
                    self.restart(f"server resumed at byte {start} instead of {self.offset}")
                    raise _Retry("resume offset mismatch")
                if total is None and response.headers.get("Content-Length"):
                    total = start + int(response.headers["Content-Length"])
            else:  # 200: the whole file, whether or not we asked for a range
                if self.offset:
                    self.restart("server ignored the resume request (HTTP 200 to a Range request)")
                length = response.headers.get("Content-Length")
                total = int(length) if length else None
            self._set_total(total)
            self._stream(response)

        if self.total is not None and self.offset < self.total:
            raise _Retry(f"connection closed at byte {self.offset} of {self.total}")

    def _http_error(self, e: urllib.error.HTTPError) -> None:
        if e.code == 416 and self.offset:
            # Range starts at or past the end: fine when the .part already holds the whole file.
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            total = total if total is not None else self.remote.size
            if total == self.offset:
                self._set_total(total)
                return
            self.restart(f"server refused to resume at byte {self.offset} (HTTP 416)")
            raise _Retry("HTTP 416")
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        raise PipelineError(f"{self.url} answered HTTP {e.code} {e.reason}: check the address "
                            f"({self.mirror_flags} when using a mirror) and rerun") from e

    def _set_total(self, total: int | None) -> None:
        """Refuse a file of the wrong size before fetching it, and before filling the disk."""
        expected = self.remote.size
        if total is not None and expected is not None and total != expected:
            raise PipelineError(f"{self.url} is {total} bytes but {self.remote.name} should be {expected}: "
                                f"the server sends a different file; check {self.mirror_flags}")
        self.total = total if total is not None else expected
        if self.total is not None:
            need = self.total - self.offset
            free = shutil.disk_usage(self.part.parent).free
            if need > free:
                raise PipelineError(f"{self.remote.name} needs {_human(need)} more but {self.part.parent} "
                                    f"has {_human(free)} free: free some space or choose another DIR")
            if self.bar.total != self.total:
                self.bar.total = self.total
                self.bar.refresh()

    def _stream(self, response) -> None:
        try:
            out = open(self.part, "ab")
        except OSError as e:
            raise PipelineError(f"cannot write {self.part}: {e}") from e
        with out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except _RETRIABLE_NETWORK_ERRORS as e:
                    raise _Retry(f"connection lost at byte {self.offset}: {e}") from e
                if not chunk:
                    return
                try:
                    out.write(chunk)
                except OSError as e:
                    raise PipelineError(f"cannot write {self.part}: {e}; free some disk space (or choose "
                                        f"another DIR) and rerun, the download will resume") from e
                self.offset += len(chunk)
                self.received += len(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                self.bar.update(len(chunk))


def _download(url: str, archive: Path, remote: RemoteFile, retries: int, timeout: float,
              progress: bool, log: Callable[[str], None], mirror_flags: str) -> tuple[str, int, int]:
    """Download `url` to `archive` via `archive.part`; return (action, bytes received, reconnects)."""
    part = archive.with_name(archive.name + ".part")
    transfer = _Transfer(url, part, remote, timeout, progress, log, mirror_flags)
    failures = reconnects = 0
    try:
        while True:
            received_before = transfer.received
            try:
                transfer.attempt()
                break
            except _Retry as e:
                failures = 1 if transfer.received > received_before else failures + 1
                if failures > retries:
                    raise PipelineError(
                        f"could not download {url} after {failures} failed attempts ({e}): check the network "
                        f"(or {mirror_flags}) and rerun; the download resumes from {part}") from e
                reconnects += 1
                delay = min(_BACKOFF_S * 2 ** (failures - 1), _BACKOFF_MAX_S)
                log(f"{remote.name}: {e}; retry {failures}/{retries} in {delay:.0f} s")
                time.sleep(delay)
    finally:
        transfer.bar.close()

    size = part.stat().st_size
    if transfer.total is not None and size != transfer.total:
        part.unlink()
        raise PipelineError(f"{remote.name} came out at {size} bytes instead of {transfer.total}; "
                            f"the download was deleted, rerun to fetch it again")
    if transfer.hasher is not None:
        algo, want = remote.checksum.split(":", 1)
        got = transfer.hasher.hexdigest()
        if got != want.lower():
            part.unlink()
            raise PipelineError(f"{remote.name} failed its {algo} check (got {got}, expected {want}); "
                                f"the damaged download was deleted, rerun to fetch it again")
    os.replace(part, archive)
    return ("resumed" if transfer.resumed else "downloaded"), transfer.received, reconnects


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000); total `*` -> None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


# --- extracting -------------------------------------------------------------------------------


def _extract(archive: Path, dest: Path, remote: RemoteFile, progress: bool, log: Callable[[str], None],
             mirror_flags: str) -> int:
    """Check the whole archive, then unpack it into `dest`; return the number of files written.

    Each member is written to a temporary name and renamed, so an interrupted extraction leaves
    only whole files (and no marker: the rerun extracts again).
    """
    corrupt = (f"{archive} is corrupt: delete it and rerun `pipeline download` to fetch it again")
    log(f"{remote.name}: checking archive integrity")
    try:
        zf = zipfile.ZipFile(archive)
    except _BROKEN_ZIP_ERRORS as e:
        raise PipelineError(f"{corrupt} ({e})") from e
    with zf:
        try:
            bad = zf.testzip()
        except _BROKEN_ZIP_ERRORS as e:
            raise PipelineError(f"{corrupt} ({e})") from e
        if bad is not None:
            raise PipelineError(f"{corrupt} (member {bad} fails its CRC check)")
        plan = _plan(zf, archive, remote, mirror_flags)

        written = 0
        for info, rel in tqdm(plan, desc=f"extract {remote.name}", unit="file", disable=not progress):
            target = dest / rel
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                with zf.open(info) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                os.replace(tmp, target)
            except OSError as e:
                raise PipelineError(f"cannot extract {info.filename} from {archive} to {target}: {e}") from e
            finally:
                tmp.unlink(missing_ok=True)
            written += 1
    return written


def _plan(zf: zipfile.ZipFile, archive: Path, remote: RemoteFile,
          mirror_flags: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Map members to safe relative paths, refusing the archive before anything is written when a
    name escapes DIR (zip-slip) or an expected output is missing (wrong file from a mirror).
    Members under `remote.exclude` folders are checked for safety like the rest, then left out."""
    plan = [(info, _safe_relpath(info.filename, archive)) for info in zf.infolist()]
    if remote.exclude:
        plan = [(info, rel) for info, rel in plan if not (rel.parts and rel.parts[0] in remote.exclude)]
    if remote.only:
        picked = []
        for want in remote.only:
            match = next((info for info, rel in plan if rel.name == want and not info.is_dir()), None)
            if match is None:
                raise PipelineError(f"{archive} has no {want}: it is not the expected archive; "
                                    f"delete it and rerun (check {mirror_flags})")
            picked.append((match, PurePosixPath(want)))
        plan = picked
    for out in remote.outputs:
        if not any(str(rel) == out or str(rel).startswith(out + "/") for info, rel in plan if not info.is_dir()):
            raise PipelineError(f"{archive} does not contain {out}: it is not the expected archive; "
                                f"delete it and rerun (check {mirror_flags})")
    return [(info, rel) for info, rel in plan if rel.parts]


def _safe_relpath(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise PipelineError(f"{archive} contains the unsafe path {name!r}, which would be written outside "
                            f"the target directory; refusing to extract it. Delete it and check its source")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _human(n: float) -> str:
    """Bytes for people: 512 B, 3.4 MiB, 12.6 GiB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
