"""A tiny synthetic captioning dataset in the COCO captions format, for demos and end-to-end tests.

Why synthetic: the real datasets are gigabytes and need a download; this one is generated offline in
about a second, is byte-for-byte the same on every run, and still makes a captioner *look*: every
caption states facts about the picture (colour, size and place of a shape, background colour), each
image gets several phrasings, so a decoder that ignores the image cannot score well.

Why these attributes: the demo encoder is a ResNet with seeded *random* weights (no ImageNet weights
offline), global-average-pooled. A linear probe (ridge on standardised features, 1200 train images,
300 test) on seeded random resnet18 features recovers, for this design: background 1.00, colour
0.97, size 0.97, row 0.94, column 0.93, shape 0.83 (chance 0.33-0.5). Position survives the
averaging because zero padding makes responses near the border differ. Shape is the weakest (filled
circle/square/triangle probe at only 0.70, hence ring/square/star, whose edge textures differ more);
every caption also carries colour, and most carry size, place and background, which the features keep.

Layout written under `out_dir`:

    train/demo_000001.jpg ...          val/...          test/...
    train/attributes.json ...          # {file name: {attribute: value}}: what evaluate and caption check
    annotations/captions_{train,val,test}.json   # exact cocodataset.org captions format

Image and annotation ids are unique across the three splits. `file_name` is relative to the
split's folder, like COCO's `train2014/` layout.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.fileio import write_json
from pipeline.decoder.attributes import (
    ATTRIBUTES_FILE,
    BACKGROUNDS,
    COLOURS,
    COLUMNS,
    ROWS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    VERTICAL_WORDS,
)

SPLITS = ("train", "val", "test")

# The attributes' values and words are pipeline.decoder.attributes' (which reads captions back); here, how
# each looks. Saturated colours near the corners of the RGB cube, so they are far apart in the space a random
# first convolution sees linearly. (Orange sat between red and yellow and was the most confused.)
COLOUR_RGB = {
    "red": (230, 25, 25),
    "yellow": (250, 225, 20),
    "green": (20, 170, 40),
    "cyan": (20, 200, 230),
    "blue": (30, 60, 235),
    "purple": (180, 40, 220),
}
BACKGROUND_RGB = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
# SHAPES were chosen by probing seven candidates (circle, square, triangle, ring, cross, star, stripes):
# random features confuse filled circle/square/triangle (~70%); a hollow ring, a filled square and a
# spiky star differ in edge texture, which global averaging keeps (~85%).
# ROWS x COLUMNS is a 3x3 grid of places. Position survives global average pooling in a random ResNet
# (zero padding makes responses near the border differ), so it can carry part of the caption.

# Shape extent as a fraction of the image side; grid centres per size. Large shapes sit nearer the
# middle so they stay inside an encoder's centre crop (e.g. 224 of 256, or 112 of 128).
_SIZE_FRAC = {"small": 0.3, "large": 0.6}
_GRID = {"small": (0.26, 0.5, 0.74), "large": (0.36, 0.5, 0.64)}

# Phrasings. Each image gets `captions_per_image` distinct templates, so the same facts appear in
# varied words and orders, as human COCO captions do.
_TEMPLATES = (
    "a {size} {colour} {shape} {place}",
    "a {size} {colour} {shape} {place} on a {bg} background",
    "there is a {colour} {shape} {place}",
    "a {bg} background with a {size} {colour} {shape} {place}",
    "{place} there is a {size} {colour} {shape}",
    "a {colour} {shape} on a {bg} background",
    "a picture of a {size} {colour} {shape} {place}",
    "a {size} {shape} colored {colour} {place}",
)

CAPTIONS_PER_IMAGE = 5


def make_demo_data(
    out_dir: str | os.PathLike,
    n_train: int = 1200,
    n_val: int = 150,
    n_test: int = 150,
    image_size: int = 128,
    seed: int = 0,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
) -> dict:
    """Write the demo dataset under `out_dir` and return counts and paths.

    Deterministic: the same arguments give the same bytes (seeded `random.Random` per split, fixed
    JPEG settings, no timestamps). Images go first, annotation JSONs last and atomically, so a crash
    never leaves annotations that point at missing images.

    Returns {"root", "image_dirs": {split: path}, "annotations": {split: path},
    "attributes": {split: its attributes.json}, "counts": {split: n_images}, "n_captions": {split: n},
    "vocabulary": sorted words}.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_arguments(counts, image_size, captions_per_image)
    root = Path(out_dir)
    ann_dir = root / "annotations"
    result: dict = {"root": str(root), "image_dirs": {}, "annotations": {}, "attributes": {},
                    "counts": dict(counts), "n_captions": {}}
    vocab: set[str] = set()
    image_ids, ann_ids = itertools.count(1), itertools.count(1)  # unique across the three splits
    for split in SPLITS:
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes
        # (unlike hash()), and each split gets its own stream: changing n_train leaves the val/test
        # pictures and captions alone (only their ids shift).
        rng = random.Random(f"demo-data/{seed}/{split}")
        split_dir = _make_folder(root / split)
        images, annotations, attributes = _draw_split(split_dir, counts[split], image_size, captions_per_image,
                                                      rng, image_ids, ann_ids)
        vocab.update(word for a in annotations for word in a["caption"].split())
        ann_path = ann_dir / f"captions_{split}.json"
        attr_path = split_dir / ATTRIBUTES_FILE
        write_json(attr_path, attributes)
        write_json(ann_path, _coco_captions(split, seed, images, annotations))
        result["image_dirs"][split] = str(split_dir)
        result["annotations"][split] = str(ann_path)
        result["attributes"][split] = str(attr_path)
        result["n_captions"][split] = len(annotations)
    result["vocabulary"] = sorted(vocab)
    return result


def _check_arguments(counts: dict, image_size, captions_per_image) -> None:
    for split, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise PipelineError(f"demo data: n_{split} must be a positive integer, got {n!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise PipelineError(f"demo data: image_size must be an integer >= 32, got {image_size!r}")
    if not 1 <= captions_per_image <= len(_TEMPLATES):
        raise PipelineError(f"demo data: captions_per_image must be 1..{len(_TEMPLATES)}, got {captions_per_image}")


def _make_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"demo data: cannot create {path}: {e}; pick another output folder") from e
    return path


def _draw_split(split_dir: Path, n: int, image_size: int, captions_per_image: int, rng: random.Random,
                image_ids: Iterator[int], ann_ids: Iterator[int]) -> tuple[list, list, dict]:
    """Draw n scenes, write their JPEGs into split_dir and caption them, taking ids from the two counters
    -> (COCO "images" entries, COCO "annotations" entries, {file name: scene})."""
    images, annotations, attributes = [], [], {}
    for _ in range(n):
        image_id = next(image_ids)
        scene = sample_scene(rng)
        file_name = f"demo_{image_id:06d}.jpg"
        (split_dir / file_name).write_bytes(render_jpeg(scene, image_size, rng))
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        attributes[file_name] = scene
        for caption in describe(scene, rng, captions_per_image):
            annotations.append({"id": next(ann_ids), "image_id": image_id, "caption": caption})
    return images, annotations, attributes


def _coco_captions(split: str, seed: int, images: list, annotations: list) -> dict:
    """A captions file in cocodataset.org's format, with fixed info (no timestamps)."""
    return {
        "info": {"description": f"pipeline synthetic shapes demo ({split}, seed {seed})",
                 "version": "1.0", "year": 2024, "contributor": "pipeline.demo_data",
                 "url": "", "date_created": "2024-01-01"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }


def sample_scene(rng: random.Random) -> dict:
    """Draw one scene's attributes uniformly and independently (so none predicts another)."""
    colour = rng.choice(sorted(COLOURS))
    return {
        "colour": colour,
        "background": rng.choice(sorted(BACKGROUNDS)),
        "shape": rng.choice(SHAPES),
        "size": rng.choice(SIZES),
        "row": rng.choice(ROWS),
        "column": rng.choice(COLUMNS),
    }


def render_jpeg(scene: dict, image_size: int, rng: random.Random) -> bytes:
    """Draw the scene and return JPEG bytes.

    Small jitter in position, size and colour makes every image distinct (a decoder cannot just
    memorise a few hundred exact pictures) without blurring the attribute boundaries.
    """
    from PIL import Image, ImageDraw

    s = image_size
    bg = _jitter_colour(BACKGROUND_RGB[scene["background"]], rng, 8)
    fg = _jitter_colour(COLOUR_RGB[scene["colour"]], rng, 12)
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    half = _SIZE_FRAC[scene["size"]] * s * rng.uniform(0.9, 1.1) / 2
    grid = _GRID[scene["size"]]
    cx = (grid[COLUMNS.index(scene["column"])] + rng.uniform(-0.03, 0.03)) * s
    cy = (grid[ROWS.index(scene["row"])] + rng.uniform(-0.03, 0.03)) * s
    box = [cx - half, cy - half, cx + half, cy + half]
    shape = scene["shape"]
    if shape == "ring":
        draw.ellipse(box, outline=fg, width=max(2, round(half * 0.45)))
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "star":  # five points, inner radius 0.45 of the outer one
        points = []
        for k in range(10):
            r = half if k % 2 == 0 else half * 0.45
            angle = math.pi * (k / 5 - 0.5)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fg)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, optimize=False, progressive=False)
    return buf.getvalue()


def describe(scene: dict, rng: random.Random, n: int) -> list[str]:
    """Return `n` distinct captions of the scene, each from a different template and word choice."""
    templates = rng.sample(_TEMPLATES, n)
    captions = []
    for t in templates:
        captions.append(t.format(
            size=rng.choice(SIZE_WORDS[scene["size"]]),
            colour=scene["colour"],
            shape=rng.choice(SHAPE_WORDS[scene["shape"]]),
            place=place_phrase(scene["row"], scene["column"], rng),
            bg=scene["background"],
        ))
    # "a" before a vowel becomes "an" (no word above starts with one; a word added later may).
    return [re.sub(r"\ba (?=[aeiou])", "an ", c) for c in captions]


def place_phrase(row: str, column: str, rng: random.Random) -> str:
    """Say where a grid cell is, in one of a few equivalent ways ("in the upper left corner")."""
    if row == "middle" and column == "center":
        return rng.choice(("in the middle", "in the center", "at the center"))
    if row == "middle":
        return rng.choice((f"on the {column}", f"on the {column} side", f"at the {column}"))
    vertical = rng.choice(VERTICAL_WORDS[row])
    if column == "center":
        return rng.choice((f"at the {vertical}", f"near the {vertical}", f"in the {vertical} middle"))
    return rng.choice((f"in the {vertical} {column} corner", f"at the {vertical} {column}", f"in the {vertical} {column}"))


def _jitter_colour(rgb: tuple, rng: random.Random, amount: int) -> tuple:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
