"""The manifest: one JSON file listing every image of a dataset, where it lives, its split, its captions.

`prepare` writes it (from COCO, Karpathy or Flickr8k files); every later stage reads it. Its row
order is the row order of `labels.h5` (image index) and of `features.h5`.

    {
      "version": 1,
      "dataset": "coco" | "karpathy" | "flickr8k",
      "image_dirs": ["/abs/path/to/images", ...],
      "images": [{"id": 42, "dir": 0, "file": "train2014/COCO_...jpg",
                  "split": "train" | "val" | "test", "captions": ["A raw caption.", ...]}, ...],
      "fingerprint": "<sha256 of the (id, file) list>"
    }

The fingerprint covers only which images are in which rows, so fixing a caption does not invalidate
a feature cache, while adding, removing or reordering images does.

The captions have their own fingerprint (`captions_fingerprint`), which prepare records in labels.h5:
labels.h5 holds the captions as word ids (what training learns), manifest.json as text (what evaluate
scores against), so a manifest edited by hand afterwards would make the two disagree unnoticed;
`check_captions` refuses that.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Container, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.cache import cache_member
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import read_json, sha256_json, write_json

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    id: int
    dir: int  # index into Manifest.image_dirs
    file: str  # path relative to that directory
    split: str
    captions: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    dataset: str
    image_dirs: list[str]
    images: list[ImageRecord]
    version: int = 1
    # `captions_fingerprint` of the captions as read from the file, even those load_manifest left out ("": made
    # in memory, not read): what `check_captions` compares with labels.h5's record
    read_captions_fingerprint: str = field(default="", compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.images)

    def path_of(self, i: int) -> str:
        rec = self.images[i]
        return os.path.join(self.image_dirs[rec.dir], rec.file)

    def indices(self, split: str) -> list[int]:
        return [i for i, rec in enumerate(self.images) if rec.split == split]

    def save(self, path: str | os.PathLike) -> None:
        obj = {
            "version": self.version,
            "dataset": self.dataset,
            "image_dirs": self.image_dirs,
            "images": [asdict(r) for r in self.images],
            "fingerprint": self.fingerprint,
        }
        write_json(path, obj, indent=None)


def manifest_fingerprint(images: list[ImageRecord]) -> str:
    return sha256_json([[r.id, r.file] for r in images])


def captions_fingerprint(captions: Iterable[list[str]]) -> str:
    """sha256 of every image's captions, image by image in row order (one JSON list a line), streamed."""
    h = hashlib.sha256()
    for caps in captions:
        h.update(_caption_line(caps))
    return h.hexdigest()


def _caption_line(captions: list[str]) -> bytes:
    return json.dumps(list(captions), ensure_ascii=False).encode("utf-8") + b"\n"


def check_captions(manifest: Manifest, labels_attrs: dict, cache_dir: str | os.PathLike) -> None:
    """Refuse (one line) a manifest whose captions are not those prepare encoded into labels.h5, whose
    attributes are `labels_attrs`: edited by hand after prepare, training would learn the old words and
    evaluate score against the new ones. A labels.h5 from before the record (no `captions_fingerprint`)
    is not checked. Works on a manifest loaded without its captions too (load_manifest records them)."""
    recorded = labels_attrs.get("captions_fingerprint")
    if recorded is None:
        return
    recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
    now = manifest.read_captions_fingerprint or captions_fingerprint(r.captions for r in manifest.images)
    if now != recorded:
        raise PipelineError(f"the captions in {Path(cache_dir) / MANIFEST_NAME} are not the ones prepare encoded "
                            f"into labels.h5 (edited after prepare?): training and scoring would use different text. "
                            f"Rerun `pipeline prepare --out-dir {cache_dir}` with its annotations and settings (it "
                            f"writes both again; make caption fixes in the annotation files)")


def check_cache_captions(cache_dir: str | os.PathLike, manifest: Manifest) -> None:
    """`check_captions` against the labels.h5 of `cache_dir` (its attributes only are read)."""
    import h5py

    from pipeline.core.cache import LABELS_NAME, reading

    labels = Path(cache_dir) / LABELS_NAME
    with reading(labels, f"pipeline prepare --out-dir {cache_dir}"), h5py.File(labels, "r") as f:
        attrs = dict(f.attrs)
    check_captions(manifest, attrs, cache_dir)


def load_manifest(path: str | os.PathLike, captions: bool | Container[int] = True) -> Manifest:
    """Load `path` (a manifest file or a cache directory holding `manifest.json`).

    `captions`: keep every image's raw captions (True), none (False: their records get empty lists), or
    only those of these image rows. Dropped captions are let go image by image while the file is parsed,
    so a COCO-sized manifest never holds its 600k caption strings at once where they are not used."""
    path = cache_member(path, MANIFEST_NAME, "manifest")
    try:
        if captions is True:
            obj = read_json(path)
            fingerprint = captions_fingerprint(r.get("captions", []) for r in obj["images"])
        else:
            obj, fingerprint = _read_without_captions(path, captions)
        images = [ImageRecord(**r) for r in obj["images"]]
        m = Manifest(dataset=obj["dataset"], image_dirs=list(obj["image_dirs"]), images=images,
                     version=int(obj.get("version", 1)), read_captions_fingerprint=fingerprint)
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path} is not a valid manifest ({e}): rerun `pipeline prepare`") from None
    return m


def _read_without_captions(path: Path, keep: bool | Container[int]) -> tuple[dict, str]:
    """The manifest's JSON with the captions of image rows not in `keep` dropped as each image is parsed,
    and the `captions_fingerprint` of all of them, dropped or not."""
    row = 0
    h = hashlib.sha256()

    def hook(d: dict) -> dict:
        nonlocal row
        if "file" in d and "split" in d:  # an image record (json builds them in file order)
            h.update(_caption_line(d.get("captions", [])))
        if "captions" in d and "file" in d:
            if keep is False or row not in keep:
                d["captions"] = []
            row += 1
        return d

    with open(path, encoding="utf-8") as f:
        obj = json.load(f, object_hook=hook)
    return obj, h.hexdigest()
