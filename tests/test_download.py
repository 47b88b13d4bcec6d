"""`download_coco2014` and `download_flickr8k` against a local HTTP server serving tiny archives
with the real layout.

The server (127.0.0.1, port 0, daemon thread, stopped by the fixture) implements `Range: bytes=N-`
itself, and can cut a response halfway or ignore Range, which is how real servers misbehave.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import re
import shlex
import socket
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_jpeg

from pipeline.acquire import download
from pipeline.acquire.download import COCO2014_FILES, FLICKR8K_FILES, download_coco2014, download_flickr8k
from pipeline.cli import main
from pipeline.core.errors import PipelineError

_rng = random.Random(0)
TRAIN_JPG = _rng.randbytes(30_000)  # incompressible, so "half the bytes" is half the archive
VAL_JPG = _rng.randbytes(20_000)
CAPTIONS = {
    "train": json.dumps({"images": [{"id": 9}], "annotations": [{"image_id": 9, "caption": "A cat."}]}).encode(),
    "val": json.dumps({"images": [{"id": 42}], "annotations": [{"image_id": 42, "caption": "A dog."}]}).encode(),
}
KARPATHY = json.dumps({"images": [{"filename": "COCO_val2014_000000000042.jpg", "split": "test"}] * 50,
                       "dataset": "coco"}).encode()

PATHS = {
    "train2014.zip": "/zips/train2014.zip",
    "val2014.zip": "/zips/val2014.zip",
    "annotations_trainval2014.zip": "/annotations/annotations_trainval2014.zip",
    "caption_datasets.zip": "/karpathy/caption_datasets.zip",
}


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_archives(caption_compression: int = zipfile.ZIP_STORED) -> dict[str, bytes]:
    return {
        "train2014.zip": make_zip({
            "train2014/": b"",
            "train2014/COCO_train2014_000000000009.jpg": TRAIN_JPG,
            "train2014/COCO_train2014_000000000025.jpg": TRAIN_JPG[::-1],
        }),
        "val2014.zip": make_zip({
            "val2014/COCO_val2014_000000000042.jpg": VAL_JPG,
            "val2014/COCO_val2014_000000000073.jpg": VAL_JPG[::-1],
        }),
        "annotations_trainval2014.zip": make_zip({
            "annotations/captions_train2014.json": CAPTIONS["train"],
            "annotations/captions_val2014.json": CAPTIONS["val"],
            "annotations/instances_val2014.json": b"{}",
        }, zipfile.ZIP_DEFLATED),
        "caption_datasets.zip": make_zip({
            "dataset_coco.json": KARPATHY,
            "dataset_flickr8k.json": b'{"images": []}',
        }, caption_compression),
    }


class Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a server thread forever

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        wanted = None if srv.ignore_range else self.headers.get("Range")
        if wanted:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            payload = payload[: len(payload) // 2]  # then HTTP/1.0 closes the socket: a cut mid-file
        self.wfile.write(payload)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(download, "_BACKOFF_S", 0.0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.archives = make_archives()
    httpd.files = {PATHS[name]: data for name, data in httpd.archives.items()}
    httpd.requests, httpd.cut_once, httpd.ignore_range = [], set(), False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def table(archives: dict[str, bytes], sizes: bool = True, checksums: bool = True) -> list:
    """The real file table with the test archives' sizes and md5s (Karpathy's stays unknown, as in reality)."""
    rows = []
    for remote in COCO2014_FILES:
        data = archives[remote.name]
        known = remote.size is not None
        rows.append(dataclasses.replace(
            remote,
            size=len(data) if sizes and known else None,
            checksum="md5:" + hashlib.md5(data).hexdigest() if checksums and known else None,
        ))
    return rows


def fetch(dest: Path, srv, files=None, **kwargs):
    host = f"http://127.0.0.1:{srv.server_address[1]}"
    messages: list[str] = []
    kwargs = {"progress": False, "retries": 3, "timeout": 5, "log": messages.append, **kwargs}
    summary = download_coco2014(dest, f"{host}/", f"{host}/karpathy/caption_datasets.zip",
                                files=files if files is not None else table(srv.archives), **kwargs)
    return summary, messages


def requests_for(srv, name: str) -> list:
    return [r for r in srv.requests if r[0] == PATHS[name]]


def test_full_download_gives_expected_layout(tmp_path, server):
    summary, _ = fetch(tmp_path, server, progress=True)

    assert (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes() == TRAIN_JPG
    assert (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes() == VAL_JPG
    assert (tmp_path / "annotations" / "captions_train2014.json").read_bytes() == CAPTIONS["train"]
    assert (tmp_path / "annotations" / "captions_val2014.json").read_bytes() == CAPTIONS["val"]
    assert (tmp_path / "dataset_coco.json").read_bytes() == KARPATHY
    assert not (tmp_path / "dataset_flickr8k.json").exists()  # only the COCO split is wanted
    for name, data in server.archives.items():
        assert (tmp_path / name).read_bytes() == data
        assert (tmp_path / f".{name}.extracted").exists()
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.tmp"))
    assert [f.action for f in summary.files] == ["downloaded"] * 4
    assert all(f.extracted for f in summary.files)
    assert summary.nbytes == sum(len(d) for d in server.archives.values())
    assert summary.line().startswith(f"coco2014 in {tmp_path}: 4 downloaded, 4 extracted;")


def test_cut_connection_is_resumed_with_range(tmp_path, server):
    server.cut_once = {PATHS["train2014.zip"]}
    summary, messages = fetch(tmp_path, server)

    data = server.archives["train2014.zip"]
    half = len(data) // 2
    assert requests_for(server, "train2014.zip") == [(PATHS["train2014.zip"], None),
                                                     (PATHS["train2014.zip"], f"bytes={half}-")]
    assert (tmp_path / "train2014.zip").read_bytes() == data
    result = summary.files[0]
    assert (result.action, result.nbytes, result.reconnects) == ("downloaded", len(data), 1)
    assert any("connection closed" in m for m in messages)


def test_part_from_earlier_run_is_resumed(tmp_path, server):
    data = server.archives["val2014.zip"]
    (tmp_path / "val2014.zip.part").write_bytes(data[:1000])
    summary, _ = fetch(tmp_path, server)

    assert requests_for(server, "val2014.zip") == [(PATHS["val2014.zip"], "bytes=1000-")]
    assert (tmp_path / "val2014.zip").read_bytes() == data  # and the md5 over both halves matched
    result = summary.files[1]
    assert (result.action, result.nbytes) == ("resumed", len(data) - 1000)


def test_complete_part_gets_416_and_is_accepted(tmp_path, server):
    data = server.archives["val2014.zip"]
    (tmp_path / "val2014.zip.part").write_bytes(data)
    summary, _ = fetch(tmp_path, server, files=table(server.archives, sizes=False, checksums=False))

    assert requests_for(server, "val2014.zip") == [(PATHS["val2014.zip"], f"bytes={len(data)}-")]
    assert (tmp_path / "val2014.zip").read_bytes() == data
    assert (summary.files[1].action, summary.files[1].nbytes) == ("resumed", 0)
    assert (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes() == VAL_JPG


def test_server_ignoring_range_still_gives_correct_file(tmp_path, server):
    server.ignore_range = True
    server.cut_once = {PATHS["train2014.zip"]}
    (tmp_path / "val2014.zip.part").write_bytes(b"garbage that must not survive")
    summary, messages = fetch(tmp_path, server)

    assert (tmp_path / "train2014.zip").read_bytes() == server.archives["train2014.zip"]
    assert (tmp_path / "val2014.zip").read_bytes() == server.archives["val2014.zip"]
    assert [r[1] for r in requests_for(server, "train2014.zip")][1].startswith("bytes=")
    assert summary.files[1].action == "downloaded"  # restarted from byte 0, not resumed
    assert sum("server ignored the resume request" in m for m in messages) == 2


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_archive_is_reported_and_not_extracted(tmp_path, server, compression):
    archives = make_archives(compression)
    data = bytearray(archives["caption_datasets.zip"])
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("dataset_coco.json")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])  # in the member's data
    archives["caption_datasets.zip"] = bytes(data)  # same length, so Content-Length still matches
    server.archives = archives
    server.files = {PATHS[name]: blob for name, blob in archives.items()}

    with pytest.raises(PipelineError, match=r"caption_datasets\.zip is corrupt: delete it and rerun"):
        fetch(tmp_path, server)
    assert not (tmp_path / "dataset_coco.json").exists()
    assert not (tmp_path / ".caption_datasets.zip.extracted").exists()
    assert (tmp_path / ".val2014.zip.extracted").exists()  # files before it are complete


def test_second_run_skips_everything_without_requests(tmp_path, server):
    fetch(tmp_path, server)
    server.requests.clear()
    summary, messages = fetch(tmp_path, server)

    assert server.requests == []
    assert [f.action for f in summary.files] == ["skipped"] * 4
    assert not any(f.extracted for f in summary.files)
    assert sum("already downloaded and extracted, skipping" in m for m in messages) == 4
    assert summary.line() == f"coco2014 in {tmp_path}: 4 skipped, 0 extracted; 0 B in 0.0 s"


def test_archives_can_be_deleted_after_extraction(tmp_path, server):
    fetch(tmp_path, server, keep_archives=False)
    assert not list(tmp_path.glob("*.zip"))
    assert (tmp_path / "dataset_coco.json").read_bytes() == KARPATHY
    server.requests.clear()
    summary, _ = fetch(tmp_path, server, keep_archives=False)
    assert server.requests == [] and [f.action for f in summary.files] == ["skipped"] * 4


def test_deleted_output_is_extracted_again_from_kept_archive(tmp_path, server):
    fetch(tmp_path, server)
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    (tmp_path / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    (tmp_path / "val2014").rmdir()
    server.requests.clear()
    summary, _ = fetch(tmp_path, server)

    assert server.requests == []
    assert (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes() == VAL_JPG
    assert [f.extracted for f in summary.files] == [False, True, False, False]


def test_zip_slip_is_refused(tmp_path, server):
    evil = make_zip({"annotations/captions_train2014.json": b"{}", "annotations/captions_val2014.json": b"{}",
                     "annotations/../../evil.json": b"{}"})
    server.archives["annotations_trainval2014.zip"] = evil
    server.files[PATHS["annotations_trainval2014.zip"]] = evil
    dest = tmp_path / "coco"

    with pytest.raises(PipelineError, match="unsafe path"):
        fetch(dest, server)
    assert not (tmp_path / "evil.json").exists()
    assert not (dest / "annotations").exists()  # refused before anything was written


def test_missing_file_on_server_names_the_url(tmp_path, server):
    del server.files[PATHS["train2014.zip"]]
    with pytest.raises(PipelineError, match=r"zips/train2014\.zip answered HTTP 404"):
        fetch(tmp_path, server)
    assert len(server.requests) == 1  # a 404 is not retried


def test_wrong_size_is_refused_before_downloading(tmp_path, server):
    files = table(server.archives)
    files[0] = dataclasses.replace(files[0], size=files[0].size + 1)
    with pytest.raises(PipelineError, match="should be"):
        fetch(tmp_path, server, files=files)
    assert not (tmp_path / "train2014.zip").exists()


def test_checksum_mismatch_deletes_the_download(tmp_path, server):
    files = table(server.archives)
    files[0] = dataclasses.replace(files[0], checksum="md5:" + "0" * 32)
    with pytest.raises(PipelineError, match="failed its md5 check"):
        fetch(tmp_path, server, files=files)
    assert not (tmp_path / "train2014.zip").exists()
    assert not (tmp_path / "train2014.zip.part").exists()


def test_unreachable_server_gives_up_after_retries(tmp_path, server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match="after 3 failed attempts"):
        download_coco2014(tmp_path, f"http://127.0.0.1:{port}/", progress=False, retries=2, timeout=2,
                          files=table(server.archives), log=lambda m: None)


# ------------------------------------------------------------------------------------------ Flickr8k

FLICKR_PATHS = {"Flickr8k_text.zip": "/flickr8k/Flickr8k_text.zip",
                "Flickr8k_Dataset.zip": "/flickr8k/Flickr8k_Dataset.zip"}
FLICKR_SPLITS = {"train": ["101_aaa.jpg", "102_bbb.jpg", "103_ccc.jpg"], "dev": ["201_ddd.jpg", "202_eee.jpg"],
                 "test": ["301_fff.jpg"]}
FLICKR_COLOURS = ("red", "green", "blue", "white", "black", "yellow")


def flickr_photos(tmp: Path) -> dict[str, bytes]:
    """Small real JPEGs with noise appended (decoders stop at EOI), so the archive is not tiny."""
    photos = {}
    for i, name in enumerate(n for names in FLICKR_SPLITS.values() for n in names):
        path = make_jpeg(tmp / name, color=(40 * i, 200 - 30 * i, 90))
        photos[name] = path.read_bytes() + _rng.randbytes(10_000)
    return photos


def make_flickr_archives(photos: dict[str, bytes], text: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Both archives as the mirror has them: text files at the top, photos under the misspelt
    Flicker8k_Dataset/, plus macOS resource forks under __MACOSX/ and the extra text files."""
    tokens = "".join(f"{name}#{j}\tA {colour} thing number {j} .\n"
                     for name, colour in zip(photos, FLICKR_COLOURS) for j in range(5))
    if text is None:
        text = {
            "Flickr8k.token.txt": tokens.encode(),
            "Flickr8k.lemma.token.txt": tokens.encode(),
            **{f"Flickr_8k.{split}Images.txt": ("\n".join(names) + "\n").encode()
               for split, names in FLICKR_SPLITS.items()},
            "ExpertAnnotations.txt": b"",
            "readme.txt": b"Flickr8k\n",
            "__MACOSX/._Flickr8k.token.txt": b"\0\5\26\7",
        }
    images = {"Flicker8k_Dataset/": b""}
    for name, data in photos.items():
        images[f"Flicker8k_Dataset/{name}"] = data
        images[f"__MACOSX/Flicker8k_Dataset/._{name}"] = b"\0\5\26\7"
    return {"Flickr8k_text.zip": make_zip(text, zipfile.ZIP_DEFLATED), "Flickr8k_Dataset.zip": make_zip(images)}


def serve(srv, archives: dict[str, bytes]) -> None:
    srv.archives = archives
    srv.files = {FLICKR_PATHS[name]: data for name, data in archives.items()}


@pytest.fixture
def flickr_server(server, tmp_path_factory):
    photos = flickr_photos(tmp_path_factory.mktemp("photos"))
    server.photos = photos
    serve(server, make_flickr_archives(photos))
    return server


def flickr_base(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/flickr8k/"


def fetch_flickr(dest: Path, srv, **kwargs):
    messages: list[str] = []
    kwargs = {"progress": False, "retries": 3, "timeout": 5, "log": messages.append, **kwargs}
    return download_flickr8k(dest, flickr_base(srv), **kwargs), messages


def flickr_requests(srv, name: str) -> list:
    return [r for r in srv.requests if r[0] == FLICKR_PATHS[name]]


def test_flickr8k_table_has_no_invented_checksums():
    assert [f.name for f in FLICKR8K_FILES] == ["Flickr8k_text.zip", "Flickr8k_Dataset.zip"]
    assert all(f.size is None and f.checksum is None for f in FLICKR8K_FILES)
    assert all(f.url == "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/" + f.name
               for f in FLICKR8K_FILES)


def test_flickr8k_cli_gives_a_folder_prepare_reads(tmp_path, flickr_server):
    dest = tmp_path / "my flickr8k"  # a space: the printed command must quote it
    r = CliRunner().invoke(main, ["download", "flickr8k", str(dest), "--base-url", flickr_base(flickr_server)])
    assert r.exit_code == 0, r.output

    prepare_cmd = f"pipeline prepare --dataset flickr8k --annotations '{dest}' --images '{dest}'"
    assert r.stdout.splitlines() == [r.stdout.splitlines()[0], f"next: {prepare_cmd}"]
    assert r.stdout.startswith(f"flickr8k in {dest}: 2 downloaded, 2 extracted;")
    for name, data in flickr_server.photos.items():
        assert (dest / "Flicker8k_Dataset" / name).read_bytes() == data
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                 "Flickr_8k.testImages.txt", "Flickr8k.lemma.token.txt", "readme.txt"):
        assert (dest / name).is_file()
    assert not (dest / "__MACOSX").exists()  # resource forks are not written
    assert not list(dest.rglob("*.part")) and not list(dest.rglob("*.tmp"))

    # the printed command, as a shell splits it (plus an out dir), finds every caption and every image
    args = shlex.split(r.stdout.splitlines()[-1].removeprefix("next: "))
    assert args[:2] == ["pipeline", "prepare"]
    args = args[1:]
    cache = tmp_path / "cache"
    r = CliRunner().invoke(main, args + ["--strict", "--vocab-threshold", "1", "--out-dir", str(cache)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["dataset"] == "flickr8k"
    by_split = Counter(rec["split"] for rec in manifest["images"])
    assert by_split == {"train": 3, "val": 2, "test": 1}

    # a rerun asks the server nothing
    flickr_server.requests.clear()
    summary, _ = fetch_flickr(dest, flickr_server)
    assert flickr_server.requests == [] and [f.action for f in summary.files] == ["skipped"] * 2


def test_flickr8k_resumes_a_cut_and_an_earlier_part(tmp_path, flickr_server):
    text = flickr_server.archives["Flickr8k_text.zip"]
    photos = flickr_server.archives["Flickr8k_Dataset.zip"]
    (tmp_path / "Flickr8k_text.zip.part").write_bytes(text[:100])  # a run killed earlier
    flickr_server.cut_once = {FLICKR_PATHS["Flickr8k_Dataset.zip"]}  # and a cut in this one
    summary, messages = fetch_flickr(tmp_path, flickr_server)

    assert flickr_requests(flickr_server, "Flickr8k_text.zip") == [(FLICKR_PATHS["Flickr8k_text.zip"], "bytes=100-")]
    # no size is known: the server's Content-Length is what tells a cut from the end of the file
    half = len(photos) // 2
    assert flickr_requests(flickr_server, "Flickr8k_Dataset.zip") == [
        (FLICKR_PATHS["Flickr8k_Dataset.zip"], None), (FLICKR_PATHS["Flickr8k_Dataset.zip"], f"bytes={half}-")]
    assert any(f"connection closed at byte {half} of {len(photos)}" in m for m in messages)
    assert (tmp_path / "Flickr8k_text.zip").read_bytes() == text
    assert (tmp_path / "Flickr8k_Dataset.zip").read_bytes() == photos
    assert [(f.action, f.nbytes, f.reconnects) for f in summary.files] == [
        ("resumed", len(text) - 100, 0), ("downloaded", len(photos), 1)]
    name = FLICKR_SPLITS["test"][0]
    assert (tmp_path / "Flicker8k_Dataset" / name).read_bytes() == flickr_server.photos[name]


def test_flickr8k_corrupt_archive_is_refused_in_one_line(tmp_path, flickr_server):
    data = bytearray(flickr_server.archives["Flickr8k_Dataset.zip"])
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("Flicker8k_Dataset/" + FLICKR_SPLITS["dev"][1])
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])  # same length: passes Content-Length
    flickr_server.files[FLICKR_PATHS["Flickr8k_Dataset.zip"]] = bytes(data)
    dest = tmp_path / "f8k"

    r = CliRunner().invoke(main, ["download", "flickr8k", str(dest), "--base-url", flickr_base(flickr_server)])
    assert r.exit_code == 1
    errors = r.stderr.splitlines()[-1:]
    assert errors == [f"Error: {dest / 'Flickr8k_Dataset.zip'} is corrupt: delete it and rerun `pipeline download` "
                      f"to fetch it again (member Flicker8k_Dataset/{FLICKR_SPLITS['dev'][1]} fails its CRC check)"]
    assert "Traceback" not in r.output
    assert not (dest / "Flicker8k_Dataset").exists()  # nothing of it was written
    assert not (dest / ".Flickr8k_Dataset.zip.extracted").exists()
    assert (dest / ".Flickr8k_text.zip.extracted").exists()  # the text archive before it is complete


def test_flickr8k_truncated_archive_is_refused(tmp_path, flickr_server):
    """A server that ends the file early and says so in Content-Length cannot be told apart by length;
    the zip check catches it (the central directory is at the end)."""
    flickr_server.files[FLICKR_PATHS["Flickr8k_text.zip"]] = flickr_server.archives["Flickr8k_text.zip"][:-200]
    with pytest.raises(PipelineError, match=r"Flickr8k_text\.zip is corrupt") as e:
        fetch_flickr(tmp_path, flickr_server)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "Flickr8k.token.txt").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "__MACOSX/../../evil.txt", "/tmp/evil.txt"])
def test_flickr8k_zip_slip_is_refused(tmp_path, flickr_server, evil):
    archives = make_flickr_archives(flickr_server.photos)
    members = {n: zipfile.ZipFile(io.BytesIO(archives["Flickr8k_text.zip"])).read(n)
               for n in zipfile.ZipFile(io.BytesIO(archives["Flickr8k_text.zip"])).namelist()}
    archives["Flickr8k_text.zip"] = make_zip({**members, evil: b"owned"})
    serve(flickr_server, archives)
    dest = tmp_path / "f8k"

    with pytest.raises(PipelineError, match="unsafe path") as e:
        fetch_flickr(dest, flickr_server)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "Flickr8k.token.txt").exists()  # refused before anything was written
    assert flickr_requests(flickr_server, "Flickr8k_Dataset.zip") == []  # and the photos never fetched


def test_flickr8k_archive_without_the_split_lists_is_refused(tmp_path, flickr_server):
    archives = make_flickr_archives(flickr_server.photos, text={"Flickr8k.token.txt": b"x.jpg#0\tA cat .\n"})
    serve(flickr_server, archives)
    with pytest.raises(PipelineError, match=r"does not contain Flickr_8k\.trainImages\.txt: it is not the "
                                            r"expected archive; delete it and rerun \(check --base-url\)"):
        fetch_flickr(tmp_path, flickr_server)
    assert not (tmp_path / "Flickr8k.token.txt").exists()


def test_flickr8k_photo_archive_without_photos_is_refused(tmp_path, flickr_server):
    serve(flickr_server, {**flickr_server.archives,
                          "Flickr8k_Dataset.zip": make_zip({"Flicker8k_Dataset/": b"", "readme.txt": b""})})
    with pytest.raises(PipelineError, match="does not contain Flicker8k_Dataset"):
        fetch_flickr(tmp_path, flickr_server)


def test_flickr8k_404_names_the_url_and_the_mirror_option(tmp_path, flickr_server):
    del flickr_server.files[FLICKR_PATHS["Flickr8k_text.zip"]]
    with pytest.raises(PipelineError, match=r"flickr8k/Flickr8k_text\.zip answered HTTP 404 Not Found: check the "
                                            r"address \(--base-url when using a mirror\)"):
        fetch_flickr(tmp_path, flickr_server)
