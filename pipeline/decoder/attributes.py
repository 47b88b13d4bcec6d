"""What a demo caption says about its picture, and how often that is true.

The demo data (`pipeline demo-data`) draws each picture from five attributes and writes them beside the
images, `attributes.json` in each split's folder ({file name: {attribute: value}}). Its captions come from a
few templates over the words below, so a generated caption can be read back: each attribute is either
said (one value), contradicted (two values) or left out, and compared with the truth.

CIDEr cannot tell "on the right" from "in the upper right corner" apart from a few n-grams; these counts can.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.fileio import read_json

ATTRIBUTES_FILE = "attributes.json"
NAMES = ("colour", "size", "shape", "place", "background")

COLOURS = ("blue", "cyan", "green", "purple", "red", "yellow")
BACKGROUNDS = ("black", "gray", "white")
SHAPES = ("ring", "square", "star")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
# The words each value is said with (the demo's captions use exactly these).
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {"ring": ("ring", "hoop"), "square": ("square", "box"), "star": ("star",)}
VERTICAL_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
CENTRE_WORDS = ("middle", "center")


def _values(words: set[str], table: Mapping[str, Iterable[str]]) -> set[str]:
    return {value for value, said in table.items() if words & set(said)}


def read_caption(caption: str) -> dict[str, str | None]:
    """{attribute: the value the caption says, "?" when it says two, None when it says none}.

    The place is one value "row column" (as `place_of` writes it): a row word (top/upper, bottom/lower) or a
    side (left, right) says it; the one left unsaid is the middle row or the centre column."""
    words = set(caption.lower().replace(",", " ").replace(".", " ").split())
    said = {"colour": words & set(COLOURS), "background": words & set(BACKGROUNDS),  # no shape is black/white/gray
            "size": _values(words, SIZE_WORDS), "shape": _values(words, SHAPE_WORDS)}
    rows = _values(words, VERTICAL_WORDS)
    columns = words & {"left", "right"}
    if rows or columns or words & set(CENTRE_WORDS):
        said["place"] = {place_of(r, c) for r in (rows or {"middle"}) for c in (columns or {"center"})}
    else:
        said["place"] = set()
    return {k: (next(iter(v)) if len(v) == 1 else "?") if v else None for k, v in said.items()}


def place_of(row: str, column: str) -> str:
    return f"{row} {column}"


def truth_of(scene: Mapping[str, str]) -> dict[str, str]:
    """A demo scene (demo_data.sample_scene's dict) -> {attribute: value} in `read_caption`'s terms."""
    return {"colour": scene["colour"], "size": scene["size"], "shape": scene["shape"],
            "place": place_of(scene["row"], scene["column"]), "background": scene["background"]}


def wrong_attributes(caption: str, truth: Mapping[str, str]) -> list[str]:
    """The attributes `caption` does not get right, each as 'place: says top right, is top left' or
    'size: not said'."""
    said = read_caption(caption)
    out = []
    for name in NAMES:
        if said[name] != truth[name]:
            out.append(f"{name}: {'not said' if said[name] is None else 'says ' + said[name]}, is {truth[name]}")
    return out


def attribute_accuracy(captions: Mapping, truths: Mapping) -> dict:
    """Over the keys of `truths` (each with a caption in `captions`): {"images", "right": {attribute: share of
    captions saying it truly}, "wrong": {attribute: share saying it falsely}, "all_right", "all_five"}.

    all_right: the caption says the colour and the shape (as every demo caption does) and nothing false;
    all_five: it says all five attributes, truly. An attribute left unsaid is neither right nor wrong."""
    right, wrong = dict.fromkeys(NAMES, 0), dict.fromkeys(NAMES, 0)
    all_right = all_five = 0
    for key, truth in truths.items():
        said = read_caption(captions[key])
        ok = {n: said[n] == truth[n] for n in NAMES}
        bad = {n: said[n] is not None and not ok[n] for n in NAMES}
        for n in NAMES:
            right[n] += ok[n]
            wrong[n] += bad[n]
        all_right += ok["colour"] and ok["shape"] and not any(bad.values())
        all_five += all(ok.values())
    n = max(len(truths), 1)
    return {"images": len(truths), "right": {k: round(v / n, 4) for k, v in right.items()},
            "wrong": {k: round(v / n, 4) for k, v in wrong.items()}, "all_right": round(all_right / n, 4),
            "all_five": round(all_five / n, 4)}


def read_truths(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, str]]:
    """{path: its attributes} for the image files that an `attributes.json` beside them describes (the demo's
    pictures); other paths are left out, so real photos give {}."""
    tables: dict[Path, dict] = {}
    out = {}
    for path in paths:
        folder = Path(path).parent
        if folder not in tables:
            tables[folder] = _read_table(folder / ATTRIBUTES_FILE)
        scene = tables[folder].get(Path(path).name)
        if scene is not None:
            out[str(path)] = truth_of(scene)
    return out


def read_row_truths(manifest, rows) -> dict[int, dict[str, str]]:
    """{image row: its attributes} for the `rows` of a Manifest whose pictures `read_truths` knows."""
    paths = {manifest.path_of(int(r)): int(r) for r in rows}
    return {paths[p]: truth for p, truth in read_truths(paths).items()}


def _read_table(path: Path) -> dict:
    if not path.is_file():
        return {}
    table = read_json(path)
    if not isinstance(table, dict) or not all(isinstance(s, dict) and set(s) >= {"colour", "size", "shape", "row",
                                                                                     "column", "background"}
                                              for s in table.values()):
        raise PipelineError(f"{path} is not a demo attributes file ({{file name: {{colour, size, shape, row, column, "
                            f"background}}}}): regenerate it with `pipeline demo-data`, or remove it")
    return table


def accuracy_line(acc: Mapping) -> str:
    """'attributes of 150 captions, right/wrong: colour 0.81/0.19, ...; all right 0.23, all five said and right 0.01'"""
    parts = ", ".join(f"{k} {acc['right'][k]:.2f}/{acc['wrong'][k]:.2f}" for k in NAMES)
    return (f"attributes of {acc['images']} captions, right/wrong (the rest unsaid): {parts}; all right "
            f"{acc['all_right']:.2f} (colour and shape said, nothing false), all five said and right {acc['all_five']:.2f}")
