"""Shared fixtures: tiny generated datasets in each supported format (nothing downloaded or read from
/work/shared), and a prepared cache built from the COCO one.

Images are solid colour with a shape drawn on them, in the sizes and modes real datasets contain
(RGB, grayscale, CMYK JPEG, palette PNG, RGBA PNG), so the image loader meets them in tests.
Captions name the colour and shape and reuse words, so vocabulary thresholds have something to cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
VAL_ONLY_COLOUR = "purple"  # appears only in val captions: must not enter the (train-only) vocabulary
SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny ops (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    they run ~25x faster than with two threads on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
# (mode, suffix, size) cycled over the generated images
VARIANTS = (("RGB", ".jpg", (64, 48)), ("L", ".jpg", (40, 40)), ("CMYK", ".jpg", (48, 64)),
            ("P", ".png", (32, 32)), ("RGBA", ".png", (50, 30)), ("RGB", ".jpg", (96, 72)))


def make_jpeg(path: str | Path, size: tuple[int, int] = (64, 48), mode: str = "RGB",
              color: tuple[int, int, int] = (210, 40, 40), shape: str | None = None) -> Path:
    """Write a small image of `color` (with `shape` drawn in grey) in `mode`; the suffix picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if shape:
        w, h = size
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse(box, fill=(128, 128, 128))
        elif shape == "square":
            draw.rectangle(box, fill=(128, 128, 128))
        else:
            draw.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=(128, 128, 128))
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.new("L", size, 200))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def captions_for(colour: str, shape: str, n: int) -> list[str]:
    """n (3-5) captions describing one image; the first two templates repeat across images."""
    templates = [f"A {colour} {shape}.", f"A picture of a {colour} {shape} on a plain background.",
                 f"The {shape} is {colour}!", f"Small {shape}, {colour} in colour", f"  a {colour} {shape}\n"]
    return templates[:n]


def image_spec(i: int, val: bool = False) -> tuple[str, str, str, str, tuple[int, int]]:
    """(colour, shape, mode, suffix, size) of generated image number i."""
    names = list(COLOURS)
    colour = VAL_ONLY_COLOUR if val and i == 0 else names[i % len(names)]
    mode, suffix, size = VARIANTS[i % len(VARIANTS)]
    return colour, SHAPES[i % len(SHAPES)], mode, suffix, size


def _rgb(colour: str) -> tuple[int, int, int]:
    return COLOURS.get(colour, (128, 40, 160))


def write_coco_split(root: Path, split_folder: str, ids: list[int], val: bool = False,
                     missing_id: int | None = None) -> tuple[Path, Path, dict[int, list[str]]]:
    """captions_<split_folder>.json under root/annotations and images under root/<split_folder>.

    Ids are written in a scrambled order so tests see the reader sort them. `missing_id` is annotated
    but gets no file on disk.
    """
    img_dir = root / split_folder
    images, anns, caps = [], [], {}
    for i, img_id in enumerate(ids):
        colour, shape, mode, suffix, size = image_spec(i, val)
        name = f"COCO_{split_folder}_{img_id:012d}{suffix}"
        images.append({"id": img_id, "file_name": name, "width": size[0], "height": size[1],
                       "coco_url": f"http://images.cocodataset.org/{split_folder}/{name}"})
        caps[img_id] = captions_for(colour, shape, 3 + i % 3)
        if img_id != missing_id:
            make_jpeg(img_dir / name, size=size, mode=mode, color=_rgb(colour), shape=shape)
    for img_id, cs in caps.items():
        for c in cs:
            anns.append({"id": len(anns) + 1, "image_id": img_id, "caption": c})
    images.reverse()
    ann_file = root / "annotations" / f"captions_{split_folder}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    img_dir.mkdir(parents=True, exist_ok=True)
    return ann_file, img_dir, caps


@pytest.fixture
def coco_dataset(tmp_path: Path) -> dict:
    """COCO-2014 layout: 12 train images (+1 annotated but missing on disk) and 6 val images.

    Keys: annotations=[train_json, val_json], images=[train_dir, val_dir], root (holding both image
    folders), captions ({id: [raw captions]}), train_ids, val_ids, missing_id.
    """
    root = tmp_path / "coco"
    train_ids = [9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 72, 77]
    missing_id = 99
    val_ids = [139, 285, 632, 724, 776, 785]
    train_json, train_dir, train_caps = write_coco_split(root, "train2014", train_ids + [missing_id],
                                                         missing_id=missing_id)
    val_json, val_dir, val_caps = write_coco_split(root, "val2014", val_ids, val=True)
    return dict(annotations=[train_json, val_json], images=[train_dir, val_dir], root=root,
                captions={**train_caps, **val_caps}, train_ids=train_ids, val_ids=val_ids, missing_id=missing_id)


@pytest.fixture
def karpathy_dataset(tmp_path: Path) -> dict:
    """dataset_coco.json-style file: train, restval, val and test images, one missing on disk.

    Keys: annotations=[json], images=[root], splits ({cocoid: expected split}), captions, missing_id.
    """
    root = tmp_path / "karpathy"
    plan = [(11, "train"), (12, "train"), (13, "restval"), (14, "restval"), (15, "val"), (16, "val"),
            (17, "test"), (18, "test"), (19, "train")]
    missing_id = 19
    images, splits, caps = [], {}, {}
    for i, (cocoid, split) in enumerate(plan):
        colour, shape, mode, suffix, size = image_spec(i)
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{cocoid:012d}{suffix}"
        caps[cocoid] = captions_for(colour, shape, 3 + i % 3)
        images.append({"filepath": folder, "filename": name, "imgid": i, "cocoid": cocoid, "split": split,
                       "sentids": list(range(5 * i, 5 * i + len(caps[cocoid]))),
                       "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i} for c in caps[cocoid]]})
        splits[cocoid] = "train" if split == "restval" else split
        if cocoid != missing_id:
            make_jpeg(root / folder / name, size=size, mode=mode, color=_rgb(colour), shape=shape)
    ann = root / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return dict(annotations=[ann], images=[root], splits=splits, captions=caps, missing_id=missing_id)


@pytest.fixture
def flickr8k_dataset(tmp_path: Path) -> dict:
    """Flickr8k's native layout: token file, train and dev lists (no test list, like the shared copy),
    images/ subfolder. One image is in no split list, one listed train image is missing on disk, and
    one caption uses the real file's `name.jpg.1#0` quirk.

    Keys: annotations=[folder], images=[folder], names (sorted token-file names), splits ({name: split}),
    captions ({name: [captions]}), unsplit, missing.
    """
    root = tmp_path / "flickr8k"
    names = [f"{1000 + 37 * i}_{'%010x' % (i * 7919)}.jpg" for i in range(10)]
    train, dev = names[:6], names[6:9]
    unsplit, missing, quirk = names[9], names[5], names[2]
    caps, lines = {}, []
    for i, name in enumerate(names):
        colour, shape, mode, _, size = image_spec(i)
        caps[name] = captions_for(colour, shape, 5)
        for j, c in enumerate(caps[name]):
            key = f"{name}.1#{j}" if (name == quirk and j == 0) else f"{name}#{j}"
            lines.append(f"{key}\t{c.strip()}")
        caps[name] = [c.strip() for c in caps[name]]
        if name != missing:
            make_jpeg(root / "images" / name, size=size, mode="L" if mode == "L" else "RGB",
                      color=_rgb(colour), shape=shape)
    lines.reverse()  # ids must come from sorted names, not file order
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    splits = {**{n: "train" for n in train}, **{n: "val" for n in dev}}
    return dict(annotations=[root], images=[root], names=sorted(names), splits=splits, captions=caps,
                unsplit=unsplit, missing=missing)


@pytest.fixture
def prepared_cache(tmp_path: Path, coco_dataset: dict) -> Path:
    """A cache dir (manifest.json, vocab.json, labels.h5) prepared from `coco_dataset` with threshold 1."""
    out = tmp_path / "cache"
    run_prepare("coco", coco_dataset["annotations"], coco_dataset["images"], out_dir=out, vocab_threshold=1)
    return out


# ---------------------------------------------------------------------- the stages with keyword settings
def run_prepare(dataset, annotations, images, out_dir, **settings):
    """prepare() with its PrepareConfig given as keywords, as tests write them."""
    from pipeline.prepare.config import PrepareConfig
    from pipeline.prepare.prepare import prepare

    cfg = PrepareConfig(dataset=dataset, annotations=[str(a) for a in annotations],
                        images=[str(i) for i in images], **settings)
    return prepare(cfg, out_dir=out_dir)


def run_extract(cache_dir, out=None, force=False, progress=False, **settings):
    """extract() with its ExtractConfig given as keywords."""
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.extract import extract

    return extract(cache_dir, ExtractConfig(**settings), out=out, force=force, progress=progress)


def relative_diff(a, b) -> float:
    """Largest difference of two feature tensors relative to `b`'s scale: float16 storage rounds at ~5e-4 of a value."""
    return float((a - b).abs().max() / b.abs().max())


def assert_same_cache(plain: Path, other: Path, datasets=("features",)) -> None:
    """Two feature files made by different ways of running the same encoder are the same cache: the same record
    (nothing says how the forward ran) and `datasets` equal up to float16 rounding of equal-to-1e-6 values."""
    import h5py
    import numpy as np

    with h5py.File(plain) as a, h5py.File(other) as b:
        assert dict(a.attrs) == dict(b.attrs)
        for name in datasets:
            fa, fb = a[name][:].astype(np.float32), b[name][:].astype(np.float32)
            assert np.abs(fa - fb).max() <= 2e-3 * np.abs(fa).max(), name


def run_evaluate(checkpoint, cache_dir, out, results=None, **settings):
    """evaluate() with its EvaluateConfig given as keywords."""
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.evaluate.evaluate import evaluate

    return evaluate(checkpoint, cache_dir, EvaluateConfig(**settings), out=out, results=results)


def run_train(cache_dir, out, metrics_dir, **settings):
    """train() with its TrainConfig given as keywords, quietly."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.train import train

    return train(cache_dir, out, metrics_dir, TrainConfig(**settings), progress=False, log=lambda m: None)


def run_scst(cache_dir, init, out, metrics_dir, **settings):
    """scst() with its ScstConfig given as keywords, quietly."""
    from pipeline.scst.config import ScstConfig
    from pipeline.scst.scst import scst

    return scst(cache_dir, init, out, metrics_dir, ScstConfig(**settings), progress=False, log=lambda m: None)
