"""Reading the demo's attributes back from a caption, scoring them, and showing them (caption's page)."""

from __future__ import annotations

import json

import pytest

from pipeline.caption.caption import Captioned, attribute_report, read_references, write_html
from pipeline.core.errors import PipelineError
from pipeline.decoder.attributes import accuracy_line, attribute_accuracy, read_caption, read_truths, truth_of

SCENE = {"colour": "red", "background": "gray", "shape": "ring", "size": "large", "row": "top", "column": "left"}


@pytest.mark.parametrize("caption, said", [
    ("a big red hoop in the upper left corner on a gray background",
     {"colour": "red", "size": "large", "shape": "ring", "place": "top left", "background": "gray"}),
    ("there is a red star on the right", {"colour": "red", "size": None, "shape": "star", "place": "middle right",
                                           "background": None}),
    ("a tiny cyan box in the lower middle", {"colour": "cyan", "size": "small", "shape": "square",
                                             "place": "bottom center", "background": None}),
    ("at the center there is a small blue star", {"colour": "blue", "size": "small", "shape": "star",
                                                  "place": "middle center", "background": None}),
    ("a red blue star near the top on a white background", {"colour": "?", "size": None, "shape": "star",
                                                            "place": "top center", "background": "white"}),
    ("a yellow ring", {"colour": "yellow", "size": None, "shape": "ring", "place": None, "background": None}),
])
def test_read_caption(caption, said):
    assert read_caption(caption) == said


def test_accuracy_counts_right_wrong_and_unsaid():
    truths = {1: truth_of(SCENE), 2: truth_of({**SCENE, "row": "middle", "column": "right"})}
    captions = {1: "a big red ring in the upper left corner on a gray background",  # all five right
                2: "a red ring on the right"}  # right, but size and background unsaid
    acc = attribute_accuracy(captions, truths)
    assert acc["images"] == 2 and acc["all_right"] == 1.0 and acc["all_five"] == 0.5
    assert acc["right"] == {"colour": 1.0, "size": 0.5, "shape": 1.0, "place": 1.0, "background": 0.5}
    assert acc["wrong"] == dict.fromkeys(acc["right"], 0.0)
    captions[2] = "a big red star on the left on a gray background"  # shape and place wrong
    acc = attribute_accuracy(captions, truths)
    assert acc["all_right"] == 0.5 and acc["wrong"]["shape"] == acc["wrong"]["place"] == 0.5
    assert "all right 0.50" in accuracy_line(acc) and "place 0.50/0.50" in accuracy_line(acc)


def test_truths_come_from_the_folders_attributes_file(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "attributes.json").write_text(json.dumps({"a.jpg": SCENE}))
    paths = [str(tmp_path / "demo" / "a.jpg"), str(tmp_path / "demo" / "b.jpg"), str(tmp_path / "photo.jpg")]
    assert read_truths(paths) == {paths[0]: truth_of(SCENE)}  # b.jpg unlisted, photo.jpg's folder has no file
    (tmp_path / "demo" / "attributes.json").write_text(json.dumps({"a.jpg": {"colour": "red"}}))
    with pytest.raises(PipelineError, match="not a demo attributes file"):
        read_truths(paths)


def test_caption_page_shows_accuracy_misses_and_references(tmp_path):
    from PIL import Image

    folder = tmp_path / "test"
    folder.mkdir()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(folder / "demo_000001.jpg")
    (folder / "attributes.json").write_text(json.dumps({"demo_000001.jpg": SCENE}))
    refs_file = tmp_path / "captions_test.json"
    refs_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "demo_000001.jpg"}],
                                     "annotations": [{"id": 5, "image_id": 1, "caption": "a big red ring at the upper left"}]}))
    results = [Captioned(str(folder / "demo_000001.jpg"), "a big red ring on the right")]
    summary, misses = attribute_report(results)
    assert "all right 0.00" in summary and misses == {results[0].path: ["place: says middle right, is top left",
                                                                        "background: not said, is gray"]}
    refs = read_references(refs_file, results)
    assert refs == {results[0].path: ["a big red ring at the upper left"]}
    write_html(results, tmp_path / "page.html", references=refs, summary=summary, misses=misses)
    page = (tmp_path / "page.html").read_text()
    assert "place: says middle right, is top left" in page and "a big red ring at the upper left" in page
    assert "all right 0.00" in page
    assert attribute_report([Captioned(str(tmp_path / "photo.jpg"), "a dog")]) == ("", {})  # no attributes known
    refs_file.write_text("{}")
    with pytest.raises(PipelineError, match="not a readable COCO captions file"):
        read_references(refs_file, results)
