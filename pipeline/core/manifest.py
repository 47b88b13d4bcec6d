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
"""

from __future__ import annotations

import json
import os
from collections.abc import Container
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


def load_manifest(path: str | os.PathLike, captions: bool | Container[int] = True) -> Manifest:
    """Load `path` (a manifest file or a cache directory holding `manifest.json`).

    `captions`: keep every image's raw captions (True), none (False: their records get empty lists), or
    only those of these image rows. Dropped captions are let go image by image while the file is parsed,
    so a COCO-sized manifest never holds its 600k caption strings at once where they are not used."""
    path = cache_member(path, MANIFEST_NAME, "manifest")
    try:
        obj = read_json(path) if captions is True else _read_without_captions(path, captions)
        images = [ImageRecord(**r) for r in obj["images"]]
        m = Manifest(dataset=obj["dataset"], image_dirs=list(obj["image_dirs"]), images=images,
                     version=int(obj.get("version", 1)))
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path} is not a valid manifest ({e}): rerun `pipeline prepare`") from None
    return m


def _read_without_captions(path: Path, keep: bool | Container[int]) -> dict:
    """The manifest's JSON with the captions of image rows not in `keep` dropped as each image is parsed."""
    row = 0

    def hook(d: dict) -> dict:
        nonlocal row
        if "captions" in d and "file" in d:  # an image record (json builds them in file order)
            if keep is False or row not in keep:
                d["captions"] = []
            row += 1
        return d

    with open(path, encoding="utf-8") as f:
        return json.load(f, object_hook=hook)
