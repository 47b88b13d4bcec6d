"""The demo dataset must be valid COCO, byte-for-byte reproducible, and captioned from the picture."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.acquire import demo_data
from pipeline.acquire.demo_data import make_demo_data
from pipeline.core.errors import PipelineError
from pipeline.decoder.attributes import NAMES, read_caption, truth_of

SMALL = dict(n_train=12, n_val=4, n_test=5, image_size=64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, make_demo_data(root, **SMALL)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_return_value(demo):
    root, info = demo
    assert info["counts"] == {"train": 12, "val": 4, "test": 5}
    for split in ("train", "val", "test"):
        assert Path(info["image_dirs"][split]) == root / split
        assert Path(info["annotations"][split]) == root / "annotations" / f"captions_{split}.json"
        assert len(list((root / split).glob("*.jpg"))) == info["counts"][split]
        assert info["n_captions"][split] == info["counts"][split] * demo_data.CAPTIONS_PER_IMAGE
    assert 30 <= len(info["vocabulary"]) <= 60


def test_exact_coco_captions_format(demo):
    root, info = demo
    from PIL import Image

    for split in ("train", "val", "test"):
        data = json.loads(Path(info["annotations"][split]).read_text())
        assert set(data) == {"info", "licenses", "images", "annotations"}
        assert data["licenses"] == []
        for im in data["images"]:
            assert set(im) == {"id", "file_name", "width", "height"}
            with Image.open(root / split / im["file_name"]) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert img.size == (im["width"], im["height"]) == (64, 64)
        for ann in data["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            assert isinstance(ann["caption"], str) and ann["caption"]


def test_loadable_with_pycocotools(demo):
    coco_mod = pytest.importorskip("pycocotools.coco")
    _, info = demo
    coco = coco_mod.COCO(info["annotations"]["val"])
    assert len(coco.getImgIds()) == 4
    for img_id in coco.getImgIds():
        assert len(coco.getAnnIds(imgIds=img_id)) == demo_data.CAPTIONS_PER_IMAGE


def test_ids_unique_across_splits(demo):
    _, info = demo
    image_ids, ann_ids = [], []
    for split in ("train", "val", "test"):
        data = json.loads(Path(info["annotations"][split]).read_text())
        image_ids += [im["id"] for im in data["images"]]
        ann_ids += [a["id"] for a in data["annotations"]]
        assert {a["image_id"] for a in data["annotations"]} == {im["id"] for im in data["images"]}
    assert len(set(image_ids)) == len(image_ids) == 21
    assert len(set(ann_ids)) == len(ann_ids)


def test_same_arguments_same_bytes(tmp_path):
    make_demo_data(tmp_path / "a", **SMALL)
    make_demo_data(tmp_path / "b", **SMALL)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 21 + 6
    assert all(a[k] == b[k] for k in a)


def test_seed_changes_data(tmp_path):
    make_demo_data(tmp_path / "a", **SMALL, seed=0)
    make_demo_data(tmp_path / "b", **SMALL, seed=1)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert a["annotations/captions_train.json"] != b["annotations/captions_train.json"]


def test_several_distinct_phrasings_per_image(demo):
    _, info = demo
    data = json.loads(Path(info["annotations"]["train"]).read_text())
    by_image: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    for caps in by_image.values():
        assert len(set(caps)) == demo_data.CAPTIONS_PER_IMAGE


def test_captions_follow_the_picture_attributes(demo):
    """Different pictures get different captions: no caption is shared by two images that differ in
    colour or shape, and each image's caption set names exactly its own attributes."""
    _, info = demo
    data = json.loads(Path(info["annotations"]["train"]).read_text())
    attrs = _attributes_by_id(info, "train")
    caps: dict[int, set[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], set()).add(a["caption"])
    for i, j in itertools.combinations(caps, 2):
        ai, aj = attrs[i], attrs[j]
        if (ai["colour"], ai["shape"]) != (aj["colour"], aj["shape"]):
            assert not caps[i] & caps[j]
    for image_id, cs in caps.items():
        for c in cs:
            _check_caption(c, attrs[image_id])


def _attributes_by_id(info: dict, split: str) -> dict[int, dict]:
    """The split's attributes.json (by file name) keyed by image id, through the captions file."""
    by_name = json.loads(Path(info["attributes"][split]).read_text())
    assert Path(info["attributes"][split]).parent == Path(info["image_dirs"][split])
    images = json.loads(Path(info["annotations"][split]).read_text())["images"]
    assert sorted(by_name) == sorted(im["file_name"] for im in images)
    return {im["id"]: by_name[im["file_name"]] for im in images}


def _check_caption(caption: str, scene: dict) -> None:
    words = caption.split()
    assert [w for w in words if w in demo_data.COLOURS] == [scene["colour"]], caption
    shape_words = {w: s for s, ws in demo_data.SHAPE_WORDS.items() for w in ws}
    assert [shape_words[w] for w in words if w in shape_words] == [scene["shape"]], caption
    size_words = {w: s for s, ws in demo_data.SIZE_WORDS.items() for w in ws}
    assert all(size_words[w] == scene["size"] for w in words if w in size_words), caption
    bgs = [w for w in words if w in demo_data.BACKGROUNDS]
    assert bgs in ([], [scene["background"]]), caption
    assert ("background" in words) == bool(bgs), caption
    # Place words, when a place is given at all, name the right row and column.
    if any(w in words for w in ("left", "right", "top", "upper", "bottom", "lower", "middle", "center")):
        assert ("left" in words) == (scene["column"] == "left"), caption
        assert ("right" in words) == (scene["column"] == "right"), caption
        assert bool({"top", "upper"} & set(words)) == (scene["row"] == "top"), caption
        assert bool({"bottom", "lower"} & set(words)) == (scene["row"] == "bottom"), caption


def test_grammar_covers_every_scene():
    """Every attribute combination yields captions that name it correctly (grammar, articles)."""
    rng = random.Random(0)
    for colour, bg, shape, size, row, column in itertools.product(
        demo_data.COLOURS, demo_data.BACKGROUNDS, demo_data.SHAPES, demo_data.SIZES, demo_data.ROWS, demo_data.COLUMNS
    ):
        scene = dict(colour=colour, background=bg, shape=shape, size=size, row=row, column=column)
        caps = demo_data.describe(scene, rng, len(demo_data._TEMPLATES))
        assert len(set(caps)) == len(caps)
        for c in caps:
            _check_caption(c, scene)
            assert " a orange" not in f" {c}" and "  " not in c and c == c.strip()
            # what evaluate reads back from a caption: every attribute it says is the scene's
            said, truth = read_caption(c), truth_of(scene)
            assert all(said[n] in (None, truth[n]) for n in NAMES) and said["colour"] and said["shape"], c
    assert set(demo_data.COLOUR_RGB) == set(demo_data.COLOURS) and set(demo_data.BACKGROUND_RGB) == set(demo_data.BACKGROUNDS)


def test_images_show_the_colour(demo):
    """The caption's colour really is in the picture: pixels that are not background are mostly
    nearest to the named colour, and the background is the named one."""
    root, info = demo
    from PIL import Image

    palette = np.array(list(demo_data.COLOUR_RGB.values()))
    names = list(demo_data.COLOUR_RGB)
    attrs = _attributes_by_id(info, "train")
    data = json.loads(Path(info["annotations"]["train"]).read_text())
    for im in data["images"]:
        scene = attrs[im["id"]]
        with Image.open(root / "train" / im["file_name"]) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.int32).reshape(-1, 3)
        bg = np.array(demo_data.BACKGROUND_RGB[scene["background"]])
        is_bg = np.abs(pixels - bg).sum(1) < 60
        assert is_bg.mean() > 0.5
        fg = pixels[~is_bg]
        assert len(fg) > 0.015 * len(pixels)
        nearest = np.abs(fg[:, None, :] - palette[None]).sum(2).argmin(1)
        assert np.bincount(nearest, minlength=len(names)).argmax() == names.index(scene["colour"])


@pytest.mark.parametrize("kwargs", [dict(n_train=0), dict(n_val=-1), dict(image_size=8), dict(captions_per_image=0)])
def test_bad_arguments_raise_pipeline_error(tmp_path, kwargs):
    with pytest.raises(PipelineError):
        make_demo_data(tmp_path, **{**SMALL, **kwargs})


def test_output_folder_that_is_a_file_raises_pipeline_error(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(PipelineError, match="cannot create"):
        make_demo_data(tmp_path / "out", **SMALL)
