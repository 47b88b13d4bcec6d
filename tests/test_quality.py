"""`pipeline bench quality`: the whole real-photo run (prepare -> extract -> train, blind, scst -> evaluate,
gallery) on a tiny generated Flickr8k folder, with a tiny recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.bench.quality import ANCHORS, split_lists, table
from pipeline.cli import main
from pipeline.core.errors import PipelineError

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(tmp_path: Path) -> Path:
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "flickr8k.yaml").read_text())
    recipe["extract"].update(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)
    recipe["train"].update(embed_size=16, hidden_size=24, attention_size=8, epochs=2, batch_size=8, patience=0, device="cpu")
    recipe["scst"].update(epochs=1, batch_size=2, device="cpu")
    recipe["evaluate"].update(tokenizer="simple", device="cpu")
    recipe["prepare"].update(vocab_threshold=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_whole_run_writes_scores_anchors_and_a_gallery(flickr8k_dataset, tmp_path):
    data = flickr8k_dataset["annotations"][0]
    work = tmp_path / "work"
    result = CliRunner().invoke(main, ["bench", "quality", str(data), "--recipe", str(tiny_recipe(tmp_path)),
                                       "--work", str(work), "--holdout", "2", "--min-cider", "0", "0",
                                       "--min-bleu4", "0", "0", "--min-blind-ratio", "0", "--max-minutes", "60",
                                       "--compare", "showtell"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((work / "quality.json").read_text())
    assert report["splits"] == {"train": 4, "val": 2, "test": 3}  # 6 listed train (1 missing on disk), dev -> test
    # the recipe's attention decoder, and (--compare) Show-and-Tell trained beside it on the same cache, timed apart
    assert set(report["scores"]) == {"cross-entropy", "SCST", "image-blind", "showtell cross-entropy", "showtell SCST"}
    seconds = report["seconds"]
    compared = sum(t for name, t in seconds.items() if "showtell" in name)
    assert compared > 0 and seconds["benchmark"] == pytest.approx(seconds["total"] - compared, abs=0.2)
    assert all(set(s) >= {"BLEU-4", "CIDEr", "ROUGE-L"} for s in report["scores"].values())
    for name in ANCHORS:
        assert name in result.output
    page = (work / "gallery.html").read_text()
    gallery = json.loads((work / "gallery.json").read_text())
    assert len(gallery) == 3 and all(len(g["references"]) == 5 for g in gallery)
    assert gallery[0]["references"][0].split()[0] in page  # the human captions are on the page


def test_compare_with_the_recipes_own_decoder_is_one_line(flickr8k_dataset, tmp_path):
    result = CliRunner().invoke(main, ["bench", "quality", str(flickr8k_dataset["annotations"][0]), "--recipe",
                                       str(tiny_recipe(tmp_path)), "--work", str(tmp_path / "w"),
                                       "--compare", "attend"])
    assert result.exit_code != 0 and "already" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w" / "cache").exists()  # refused before any work


def test_split_lists_use_the_test_list_when_there_is_one(flickr8k_dataset, tmp_path):
    data = flickr8k_dataset["annotations"][0]
    (data / "Flickr_8k.testImages.txt").write_text(flickr8k_dataset["unsplit"] + "\n")
    counts = split_lists(data, tmp_path / "lists", holdout=2)
    assert counts == {"train": 6, "val": 3, "test": 1}  # dev stays validation: nothing is held out of train
    assert (tmp_path / "lists" / "Flickr_8k.testImages.txt").read_text().split() == [flickr8k_dataset["unsplit"]]


def test_held_out_photos_come_from_train_and_are_fixed_by_the_seed(flickr8k_dataset, tmp_path):
    data = flickr8k_dataset["annotations"][0]
    split_lists(data, tmp_path / "a", holdout=2)
    split_lists(data, tmp_path / "b", holdout=2)
    val = (tmp_path / "a" / "Flickr_8k.devImages.txt").read_text().split()
    train = (tmp_path / "a" / "Flickr_8k.trainImages.txt").read_text().split()
    assert val == (tmp_path / "b" / "Flickr_8k.devImages.txt").read_text().split()
    assert not set(val) & set(train) and set(val) | set(train) == {n for n, s in flickr8k_dataset["splits"].items()
                                                                     if s == "train"}
    with pytest.raises(PipelineError, match="holdout"):
        split_lists(data, tmp_path / "c", holdout=6)


def test_not_a_flickr8k_folder_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match="pipeline download flickr8k"):
        split_lists(tmp_path, tmp_path / "lists", holdout=2)


def test_table_lines_up_ours_and_the_papers():
    text = table({"cross-entropy": {"BLEU-4": 0.2, "CIDEr": 0.5}})
    lines = text.splitlines()
    assert len(lines) == 2 + len(ANCHORS) and len({len(line) for line in lines}) == 1
    assert "0.160" in text and "0.213" in text
