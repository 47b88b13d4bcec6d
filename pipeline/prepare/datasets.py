"""Readers that turn a dataset's own annotation files into a `Manifest`.

Each reader takes the files as downloaded (COCO captions JSON, Karpathy's split JSON, Flickr8k's text
files) plus the folders holding the images, and returns `(Manifest, ReadStats)`. Images named in the
annotations but absent on disk are skipped and counted (partial downloads are common); `strict=True`
turns that into an error. Rows are sorted by (split: train, val, test; then image id) so that the same
inputs always give the same manifest, hence the same fingerprint and feature-cache rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.core.errors import PipelineError
from pipeline.core.manifest import SPLITS, ImageRecord, Manifest

PathLike = str | os.PathLike
DATASETS = ("coco", "karpathy", "flickr8k")
SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}
# Folders that the usual downloads unpack images into, tried under each image dir.
FLICKR_IMAGE_SUBDIRS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
_EXAMPLES = 5
INT64 = (-(2 ** 63), 2 ** 63 - 1)  # image ids are stored as int64 (labels.h5, features.h5, checkpoints)


@dataclass
class ReadStats:
    """Counts for the prepare summary: what the annotation files named and what was left out."""

    annotated_images: int = 0  # images the annotations place in a split (before looking on disk)
    missing_images: int = 0  # of those, not found in any image dir: skipped
    missing_examples: list[str] = field(default_factory=list)  # a few of their names
    unsplit_images: int = 0  # Flickr8k: captioned but in no split list given: left out
    unknown_listed: int = 0  # Flickr8k: in a split list but not in the token file: left out
    unmatched_captions: int = 0  # COCO: captions whose image_id names no image of their file: left out
    outside_images: int = 0  # named by a path leaving the image folders, allowed by allow_outside


def read_dataset(dataset: str, annotations: Sequence[PathLike], images: Sequence[PathLike],
                 strict: bool = False, allow_outside: bool = False) -> tuple[Manifest, ReadStats]:
    """Dispatch on the dataset name the CLI was given."""
    annotations = list(annotations)
    if not annotations:
        raise PipelineError("no annotation files given: pass --annotations (a captions JSON, split file or folder)")
    if dataset == "coco":
        return read_coco(annotations, images, strict=strict, allow_outside=allow_outside)
    if dataset == "karpathy":
        if len(annotations) != 1:
            raise PipelineError(f"karpathy takes one split file (e.g. dataset_coco.json), got {len(annotations)}")
        return read_karpathy(annotations[0], images, strict=strict, allow_outside=allow_outside)
    if dataset == "flickr8k":
        return read_flickr8k(annotations, images, strict=strict, allow_outside=allow_outside)
    raise PipelineError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------- COCO


def read_coco(annotation_files: Sequence[PathLike], image_dirs: Sequence[PathLike],
              strict: bool = False, allow_outside: bool = False) -> tuple[Manifest, ReadStats]:
    """COCO captions files (captions_{train,val}{2014,2017}.json, image_info_test*.json), read via pycocotools.

    The split comes from the file name. An image is looked up as `<dir>/<file_name>`, then in the
    split folder (`<dir>/train2014/<file_name>`, the folder named by the annotation file or the coco_url),
    so `--images <coco_root>` works as well as `--images <coco_root>/train2014 <coco_root>/val2014`.
    """
    from pycocotools.coco import COCO

    finder = _Finder(image_dirs, allow_outside)
    stats = ReadStats()
    records: list[ImageRecord] = []
    origin: dict[int, Path] = {}
    for ann in _existing_files(annotation_files, "COCO captions file (e.g. annotations/captions_train2014.json)"):
        split = _split_from_name(ann)
        data = _read_json(ann)
        _check_coco_shape(ann, data, split)
        stats.unmatched_captions += _check_coco_values(ann, data)
        coco = COCO()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.dataset = data
            coco.createIndex()
        # "captions_train2014" -> "train2014": the folder COCO's own zips unpack this split into
        hint = ann.stem.split("_")[-1]
        for img_id in coco.getImgIds():
            img = coco.imgs[img_id]
            _check_unique(int(img_id), ann, origin)
            name = str(img["file_name"])
            subs = [hint]
            url = img.get("coco_url") or img.get("flickr_url") or ""
            if isinstance(url, str) and "/" in url:
                subs.append(url.rstrip("/").split("/")[-2])
            candidates = [name] + [f"{s}/{name}" for s in dict.fromkeys(subs) if s]
            captions = [str(a["caption"]) for a in coco.imgToAnns.get(img_id, [])]
            _add(records, stats, finder, int(img_id), split, candidates, captions)
    return _finish("coco", finder, records, stats, strict, annotation_files)


def _check_coco_shape(path: Path, data: object, split: str) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PipelineError(f'{path} is not a COCO annotation file (no "images" list): '
                            "pass captions_train2014.json / captions_val2014.json from cocodataset.org")
    if not data["images"]:
        raise PipelineError(f'{path} lists no images ("images" is empty): pass the captions file of a split '
                            "as downloaded (e.g. captions_train2014.json)")
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise PipelineError(f'{path}: an entry of "images" lacks "id" or "file_name": is this a COCO file?')
    anns = data.get("annotations")
    if anns is None:
        if split != "test":  # test image-info files carry no captions; train/val ones must
            raise PipelineError(f'{path} has no "annotations": pass the captions_*.json file of this split')
        data["annotations"] = []
        return
    if not isinstance(anns, list):
        raise PipelineError(f'{path}: "annotations" is not a list: is this a COCO file?')
    for a in anns:
        if not isinstance(a, dict) or "image_id" not in a:
            raise PipelineError(f'{path}: an annotation lacks "image_id": is this a COCO file?')
        if "caption" not in a:
            raise PipelineError(f"{path} holds annotations without captions (an instances or keypoints file?): "
                                "pass the captions_*.json file instead")
    for i, a in enumerate(anns):  # pycocotools indexes annotations by "id"; caption files have it, be lenient
        a.setdefault("id", i)


def _check_coco_values(path: Path, data: dict) -> int:
    """Refuse ids that are not integers and captions that are not text, naming the entry (pycocotools
    would crash on the one and store "['a', 'list']" for the other). Returns how many captions name an
    image_id that no image of the file has: they are left out, and counted in the summary. One id
    listed with two different files is refused (pycocotools would silently keep the last)."""
    ids: dict[int, tuple[int, str]] = {}  # id -> (index, file_name) of its first entry
    for n, img in enumerate(data["images"]):
        img["id"] = _integer(img["id"], f'{path}: images[{n}] ("file_name": {str(img["file_name"])[:80]!r}) has "id"')
        first = ids.setdefault(img["id"], (n, str(img["file_name"])))
        if first[1] != str(img["file_name"]):
            raise PipelineError(f'{path}: image id {img["id"]} is listed with two files, {first[1][:80]!r} '
                                f'(images[{first[0]}]) and {str(img["file_name"])[:80]!r} (images[{n}]): keep '
                                f'one entry per id, or re-download the file')
    unmatched = 0
    for n, a in enumerate(data["annotations"]):
        a["image_id"] = _integer(a["image_id"], f'{path}: annotations[{n}] has "image_id"')
        if not isinstance(a["caption"], str):
            raise PipelineError(f'{path}: annotations[{n}] (image_id {a["image_id"]}) has a "caption" that is not '
                                f'text ({type(a["caption"]).__name__} {str(a["caption"])[:60]}): fix that entry '
                                f'or re-download the file')
        unmatched += a["image_id"] not in ids
    return unmatched


def _integer(value: object, where: str) -> int:
    """`value` as an int when it is one (or a string of digits) that fits int64, the type every later
    stage stores ids as; else PipelineError "`where` VALUE, which ...". Negative ids are kept: nothing
    downstream reads meaning into the sign (ids are only compared, sorted and stored as int64)."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None:
        raise PipelineError(f"{where} {str(value)[:60]!r}, which is not an integer id: fix that entry or "
                            f"re-download the file")
    if not INT64[0] <= number <= INT64[1]:
        raise PipelineError(f"{where} {str(value)[:60]}, which does not fit in 64 bits (ids are stored as int64, "
                            f"at most {INT64[1]}): fix that entry or re-download the file")
    return number


def _split_from_name(path: Path) -> str:
    name = path.name.lower()
    found = [s for s in SPLITS if s in name]
    if len(found) != 1:
        raise PipelineError(f"cannot tell the split of {path} from its name (it must contain exactly one of "
                            f"'train', 'val', 'test', like captions_train2014.json): rename it")
    return found[0]


# ------------------------------------------------------------------------------------------ Karpathy


def read_karpathy(annotation_file: PathLike, image_dirs: Sequence[PathLike],
                  strict: bool = False, allow_outside: bool = False) -> tuple[Manifest, ReadStats]:
    """Karpathy's split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

    "restval" (COCO val images given to training) counts as train. Ids are `cocoid` when present, so a
    COCO manifest from this file shares ids with the official COCO files; else `imgid`.
    """
    (path,) = _existing_files([annotation_file], "Karpathy split file (e.g. dataset_coco.json)")
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PipelineError(f'{path} is not a Karpathy split file (no "images" list): pass dataset_coco.json, '
                            "dataset_flickr8k.json or dataset_flickr30k.json")
    if not data["images"]:
        raise PipelineError(f'{path} lists no images ("images" is empty): pass dataset_coco.json, '
                            "dataset_flickr8k.json or dataset_flickr30k.json as downloaded")
    finder = _Finder(image_dirs, allow_outside)
    stats = ReadStats()
    records: list[ImageRecord] = []
    origin: dict[int, Path] = {}
    for n, img in enumerate(data["images"]):
        try:
            name = str(img["filename"])
            split = {"restval": "train"}.get(img["split"], img["split"])
            key = "cocoid" if "cocoid" in img else "imgid"
            img_id = _integer(img[key], f'{path}: images[{n}] ("filename": {name[:80]!r}) has "{key}"')
            captions = [str(s["raw"]) for s in img["sentences"]]
        except (KeyError, TypeError, ValueError) as e:
            raise PipelineError(f"{path}: image #{n} lacks a valid {e} field "
                                "(need filename, split, cocoid or imgid, sentences[*].raw): is this a Karpathy file?"
                                ) from None
        if split not in SPLITS:
            raise PipelineError(f"{path}: image {name} has split {img['split']!r}, expected train/val/test/restval")
        _check_unique(img_id, path, origin)
        filepath = img.get("filepath")
        candidates = ([f"{filepath}/{name}"] if filepath else []) + [name]
        candidates += [f"{s}/{name}" for s in FLICKR_IMAGE_SUBDIRS]
        _add(records, stats, finder, img_id, split, candidates, captions)
    return _finish("karpathy", finder, records, stats, strict, [path])


# ------------------------------------------------------------------------------------------ Flickr8k

_FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
_FLICKR8K_TOKEN = "Flickr8k.token.txt"


def read_flickr8k(annotation_files: Sequence[PathLike], image_dirs: Sequence[PathLike] = (),
                  strict: bool = False, allow_outside: bool = False) -> tuple[Manifest, ReadStats]:
    """Flickr8k's own text files: Flickr8k.token.txt and the Flickr_8k.{train,dev,test}Images.txt lists.

    `annotation_files` may name the files or the folder holding them. dev -> val. Images in no split
    list given are left out and counted (the test list may be withheld). Ids are positions in the sorted
    list of file names of the token file, so they do not depend on which split lists are present.
    With no image dirs, the annotation folders are searched (and their images/ subfolder).
    """
    token_file, lists = _flickr8k_files(annotation_files)
    captions = _read_flickr8k_tokens(token_file)
    ids = {name: i for i, name in enumerate(sorted(captions))}
    split_of: dict[str, str] = {}
    stats = ReadStats()
    for split in SPLITS:
        if split not in lists:
            continue
        for name in _read_lines(lists[split]):
            if name in split_of and split_of[name] != split:
                raise PipelineError(f"{name} is listed in both the {split_of[name]} and the {split} split lists: "
                                    "fix the split files")
            if name not in ids:
                stats.unknown_listed += 1
                continue
            split_of[name] = split
    stats.unsplit_images = len(ids) - len(split_of)
    if not image_dirs:
        image_dirs = list(dict.fromkeys([token_file.parent] + [p.parent for p in lists.values()]))
    finder = _Finder(image_dirs, allow_outside)
    records: list[ImageRecord] = []
    for name, split in split_of.items():
        candidates = [name] + [f"{s}/{name}" for s in FLICKR_IMAGE_SUBDIRS]
        _add(records, stats, finder, ids[name], split, candidates, captions[name])
    return _finish("flickr8k", finder, records, stats, strict, [token_file])


def _flickr8k_files(paths: Sequence[PathLike]) -> tuple[Path, dict[str, Path]]:
    token: list[Path] = []
    lists: dict[str, Path] = {}
    for p in map(Path, paths):
        if p.is_dir():
            if (p / _FLICKR8K_TOKEN).is_file():
                token.append(p / _FLICKR8K_TOKEN)
            for split, fname in _FLICKR8K_LISTS.items():
                if (p / fname).is_file():
                    lists[split] = p / fname
        elif p.is_file():
            low = p.name.lower()
            kind = next((s for s, key in (("train", "trainimages"), ("val", "devimages"), ("test", "testimages"))
                         if key in low), None)
            if kind:
                lists[kind] = p
            elif low.endswith("token.txt"):
                token.append(p)
            else:
                raise PipelineError(f"{p} is not a Flickr8k file: expected {_FLICKR8K_TOKEN} or "
                                    f"{', '.join(_FLICKR8K_LISTS.values())}, or the folder holding them")
        else:
            raise PipelineError(f"annotation path {p} does not exist: pass the Flickr8k text folder "
                                f"(with {_FLICKR8K_TOKEN}) or its files")
    if len(token) != 1:
        raise PipelineError(f"need exactly one {_FLICKR8K_TOKEN}, found {len(token)} in "
                            f"{', '.join(map(str, paths))}: pass the Flickr8k text folder or the token file")
    if len(token) == 1 and not lists:  # the token file alone: Flickr8k ships the split lists beside it
        lists = {split: token[0].parent / fname for split, fname in _FLICKR8K_LISTS.items()
                 if (token[0].parent / fname).is_file()}
    if not lists:
        raise PipelineError(f"no Flickr8k split list ({', '.join(_FLICKR8K_LISTS.values())}) among "
                            f"{', '.join(map(str, paths))}: pass them or the folder holding them")
    return token[0], lists


def _read_flickr8k_tokens(path: Path) -> dict[str, list[str]]:
    """name -> captions ordered by their #N. The real file has one key spelled `X.jpg.1#0`: it is `X.jpg`'s."""
    numbered: dict[str, list[tuple[int, str]]] = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, num = key.strip().rpartition("#")
        if not tab or not hash_ or not name or not num.isdigit():
            raise PipelineError(f"{path}:{n}: expected 'image.jpg#N<TAB>caption', got {line[:80]!r}")
        m = re.fullmatch(r"(.+\.jpe?g)\.\d+", name, flags=re.IGNORECASE)
        numbered.setdefault(m.group(1) if m else name, []).append((int(num), caption.strip()))
    if not numbered:
        raise PipelineError(f"{path} holds no captions: pass Flickr8k.token.txt")
    return {name: [c for _, c in sorted(caps, key=lambda nc: nc[0])] for name, caps in numbered.items()}


def _read_lines(path: Path) -> list[str]:
    return [s.strip() for s in _read_text(path).splitlines() if s.strip()]


# ----------------------------------------------------------------------------------------- helpers


def leaves_folder(rel: str) -> bool:
    """Whether an annotation's image path, taken relative to an image folder, names a file outside it:
    absolute, or climbing out with "..". Judged on the normalised text only: a symlinked image folder
    works, and a symlink inside a folder is followed (it is the folder owner's own doing)."""
    return os.path.isabs(rel) or posixpath.normpath(rel).split("/")[0] == ".."


class _Finder:
    """Finds image files under the given folders, listing each folder once rather than stat-ing 100k files.

    Names that lead outside the folders (`leaves_folder`) are looked up only with allow_outside; else
    they are collected (`outside`) and `_finish` refuses the dataset, listing a few."""

    def __init__(self, image_dirs: Sequence[PathLike], allow_outside: bool = False):
        if not image_dirs:
            raise PipelineError("no image folders given: pass --images (the folder(s) holding the images)")
        self.dirs = [Path(os.path.abspath(d)) for d in image_dirs]
        for d in self.dirs:
            if not d.is_dir():
                raise PipelineError(f"image folder {d} does not exist or is not a folder: check --images")
        self._listings: dict[Path, frozenset[str]] = {}
        self.allow_outside = allow_outside
        self.outside: list[str] = []  # names refused for leaving the folders (allow_outside off)
        self.outside_found = 0  # names leaving the folders, found (allow_outside on)

    def _names(self, folder: Path) -> frozenset[str]:
        if folder not in self._listings:
            try:
                self._listings[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._listings[folder] = frozenset()
        return self._listings[folder]

    def find(self, candidates: Sequence[str]) -> tuple[int, str] | None:
        """(dir index, path relative to it) of the first candidate found, dirs in order."""
        leaving = [rel for rel in candidates if leaves_folder(rel)]
        if leaving and not self.allow_outside:
            self.outside.append(leaving[0])
            return None
        hit = self._find(candidates)
        self.outside_found += bool(hit and leaves_folder(hit[1]))
        return hit

    def _find(self, candidates: Sequence[str]) -> tuple[int, str] | None:
        for i, d in enumerate(self.dirs):
            for rel in candidates:
                p = d / rel
                if p.name in self._names(p.parent):
                    return i, str(PurePosixPath(*Path(rel).parts))
        return None


def _add(records: list[ImageRecord], stats: ReadStats, finder: _Finder, img_id: int, split: str,
         candidates: Sequence[str], captions: list[str]) -> None:
    stats.annotated_images += 1
    hit = finder.find(candidates)
    if hit is None:
        stats.missing_images += 1
        if len(stats.missing_examples) < _EXAMPLES:
            stats.missing_examples.append(candidates[0])
        return
    records.append(ImageRecord(id=img_id, dir=hit[0], file=hit[1], split=split, captions=captions))


def _finish(dataset: str, finder: _Finder, records: list[ImageRecord], stats: ReadStats, strict: bool,
            sources: Sequence[PathLike]) -> tuple[Manifest, ReadStats]:
    dirs = ", ".join(map(str, finder.dirs))
    if finder.outside:
        examples = ", ".join(map(repr, finder.outside[:_EXAMPLES]))
        raise PipelineError(f"{len(finder.outside)} image names in {', '.join(map(str, sources))} lead outside the "
                            f"image folders ({dirs}), e.g. {examples}: fix those entries, or pass --allow-outside "
                            "(prepare.allow_outside: true) if reading files from there is meant")
    if not stats.annotated_images:
        raise PipelineError(f"{', '.join(map(str, sources))} list no images of any split: pass the dataset's "
                            "annotation files as downloaded")
    if not records:
        raise PipelineError(f"none of the {stats.annotated_images} images named in "
                            f"{', '.join(map(str, sources))} were found under {dirs}: "
                            "check --images (the folder holding the image files or their split folders)")
    if strict and stats.missing_images:
        raise PipelineError(f"{stats.missing_images} annotated images are missing under {dirs}, e.g. "
                            f"{', '.join(stats.missing_examples)}: complete the download or drop --strict")
    stats.outside_images = finder.outside_found
    records.sort(key=lambda r: (SPLIT_ORDER[r.split], r.id))
    return Manifest(dataset=dataset, image_dirs=[str(d) for d in finder.dirs], images=records), stats


def _check_unique(img_id: int, source: Path, origin: dict[int, Path]) -> None:
    if img_id in origin:
        where = "twice in " + str(source) if origin[img_id] == source else f"in both {origin[img_id]} and {source}"
        raise PipelineError(f"image id {img_id} appears {where}: pass annotation files of one release "
                            "(all 2014 or all 2017), each once")
    origin[img_id] = source


def _existing_files(paths: Sequence[PathLike], what: str) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise PipelineError(f"annotation file {p} not found: pass the {what}")
        out.append(p)
    if not out:
        raise PipelineError(f"no annotation files given: pass the {what}")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM at the start (some editors write one) is dropped
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path} is not UTF-8 text ({e}): pass the original annotation file") from None
    except OSError as e:
        raise PipelineError(f"cannot read {path} ({e.strerror})") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e}): re-download it") from None
