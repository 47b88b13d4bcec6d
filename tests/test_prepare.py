"""Stage "prepare": dataset readers, tokenizer/vocabulary, and the labels cache they produce."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import VAL_ONLY_COLOUR, make_jpeg
from conftest import run_prepare as prepare

from pipeline.core.cache import LABELS_NAME
from pipeline.core.errors import PipelineError
from pipeline.core.manifest import load_manifest
from pipeline.core.vocab import SPECIALS, Vocabulary, tokenize
from pipeline.prepare.datasets import read_coco, read_dataset, read_flickr8k, read_karpathy

# ------------------------------------------------------------------------------------------ readers


def test_read_coco_ids_splits_paths_and_missing(coco_dataset):
    m, stats = read_coco(coco_dataset["annotations"], coco_dataset["images"])
    assert m.dataset == "coco"
    ids = [r.id for r in m.images]
    assert ids == sorted(coco_dataset["train_ids"]) + sorted(coco_dataset["val_ids"])
    assert [r.split for r in m.images] == ["train"] * 12 + ["val"] * 6
    assert coco_dataset["missing_id"] not in ids
    assert stats.missing_images == 1 and stats.annotated_images == 19
    assert "000000000099" in stats.missing_examples[0]
    for i, r in enumerate(m.images):
        assert os.path.isfile(m.path_of(i))
        assert r.dir == (0 if r.split == "train" else 1)
        assert r.captions == coco_dataset["captions"][r.id]
    assert m.image_dirs == [str(Path(d).resolve()) for d in coco_dataset["images"]]


def test_read_coco_finds_split_subfolders_under_one_root(coco_dataset):
    m, stats = read_coco(coco_dataset["annotations"], [coco_dataset["root"]])
    assert len(m.images) == 18 and stats.missing_images == 1
    assert {r.dir for r in m.images} == {0}
    assert all(r.file.startswith(("train2014/", "val2014/")) for r in m.images)
    assert all(os.path.isfile(m.path_of(i)) for i in range(len(m.images)))


def test_read_coco_strict_raises_on_missing_image(coco_dataset):
    with pytest.raises(PipelineError, match="1 annotated images are missing.*000000000099"):
        read_coco(coco_dataset["annotations"], coco_dataset["images"], strict=True)


def test_read_coco_bad_inputs(coco_dataset, tmp_path):
    odd = tmp_path / "captions_2014.json"
    odd.write_text(coco_dataset["annotations"][0].read_text())
    with pytest.raises(PipelineError, match="cannot tell the split"):
        read_coco([odd], coco_dataset["images"])

    instances = tmp_path / "instances_train2014.json"
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                     "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(PipelineError, match="captions_"):
        read_coco([instances], coco_dataset["images"])

    wrong = tmp_path / "captions_train2014_list.json"
    wrong.write_text("[1, 2, 3]")
    with pytest.raises(PipelineError, match="not a COCO annotation file"):
        read_coco([wrong], coco_dataset["images"])

    broken = tmp_path / "captions_val2014_broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(PipelineError, match="not valid JSON"):
        read_coco([broken], coco_dataset["images"])

    with pytest.raises(PipelineError, match="appears in both"):
        same_ids = _copy(coco_dataset["annotations"][0], tmp_path / "captions_train2017.json")
        read_coco([coco_dataset["annotations"][0], same_ids], coco_dataset["images"])

    with pytest.raises(PipelineError, match="image folder .* does not exist"):
        read_coco(coco_dataset["annotations"], [tmp_path / "nope"])

    empty = tmp_path / "empty_images"
    empty.mkdir()
    with pytest.raises(PipelineError, match="none of the 13 images"):
        read_coco(coco_dataset["annotations"][:1], [empty])


def _copy(src: Path, dst: Path) -> Path:
    dst.write_text(src.read_text())
    return dst


def test_read_karpathy_splits_restval_and_missing(karpathy_dataset):
    m, stats = read_karpathy(karpathy_dataset["annotations"][0], karpathy_dataset["images"])
    assert m.dataset == "karpathy"
    expected = {k: v for k, v in karpathy_dataset["splits"].items() if k != karpathy_dataset["missing_id"]}
    assert {r.id: r.split for r in m.images} == expected
    assert [r.id for r in m.images] == [11, 12, 13, 14, 15, 16, 17, 18]  # restval 13, 14 sorted into train
    assert stats.missing_images == 1 and stats.annotated_images == 9
    for i, r in enumerate(m.images):
        assert r.file == f"{'train2014' if r.id in (11, 12) else 'val2014'}/{Path(r.file).name}"
        assert os.path.isfile(m.path_of(i))
        assert r.captions == karpathy_dataset["captions"][r.id]
    with pytest.raises(PipelineError, match="missing"):
        read_karpathy(karpathy_dataset["annotations"][0], karpathy_dataset["images"], strict=True)


def test_read_karpathy_flickr_style_uses_imgid_and_bad_split(tmp_path):
    make_jpeg(tmp_path / "imgs" / "b.jpg")
    make_jpeg(tmp_path / "imgs" / "a.jpg", mode="L")
    ann = tmp_path / "dataset_flickr8k.json"
    ann.write_text(json.dumps({"images": [
        {"filename": "b.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "A dog runs."}]},
        {"filename": "a.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "A cat sits."}]}]}))
    m, stats = read_karpathy(ann, [tmp_path / "imgs"])
    assert [(r.id, r.file, r.split) for r in m.images] == [(1, "a.jpg", "train"), (0, "b.jpg", "test")]
    assert stats.missing_images == 0

    ann.write_text(json.dumps({"images": [{"filename": "a.jpg", "imgid": 1, "split": "dev",
                                           "sentences": [{"raw": "x"}]}]}))
    with pytest.raises(PipelineError, match="'dev'"):
        read_karpathy(ann, [tmp_path / "imgs"])
    ann.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}))
    with pytest.raises(PipelineError, match="imgid"):
        read_karpathy(ann, [tmp_path / "imgs"])


def test_read_flickr8k_folder(flickr8k_dataset):
    d = flickr8k_dataset
    m, stats = read_flickr8k(d["annotations"], d["images"])
    assert m.dataset == "flickr8k"
    names = d["names"]
    expected = {names.index(n): s for n, s in d["splits"].items() if n != d["missing"]}
    assert {r.id: r.split for r in m.images} == expected
    assert [r.split for r in m.images] == ["train"] * 5 + ["val"] * 3
    assert stats.unsplit_images == 1 and stats.missing_images == 1 and stats.annotated_images == 9
    for i, r in enumerate(m.images):
        assert r.file == f"images/{names[r.id]}"
        assert os.path.isfile(m.path_of(i))
        assert r.captions == d["captions"][names[r.id]]  # in #N order; the `.jpg.1#0` line merged in
        assert len(r.captions) == 5


def test_read_flickr8k_explicit_files_and_default_image_dir(flickr8k_dataset):
    root = flickr8k_dataset["annotations"][0]
    files = [root / "Flickr8k.token.txt", root / "Flickr_8k.devImages.txt"]
    m, stats = read_dataset("flickr8k", files, [])
    assert {r.split for r in m.images} == {"val"} and len(m.images) == 3
    assert stats.unsplit_images == 7
    with pytest.raises(PipelineError, match="split list"):
        read_flickr8k([root / "Flickr8k.token.txt"], [root])
    with pytest.raises(PipelineError, match="does not exist"):
        read_flickr8k([root / "Flickr8k.tokens_typo.txt"], [root])


# ---------------------------------------------------------------------------------- tokenize & vocab


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize('A man\'s dog. Sitting on a "Bench"...') == ["a", "man", "'s", "dog", "sitting", "on", "a",
                                                                  "bench"]
    assert tokenize("Two dogs, playing; in the park!") == ["two", "dogs", "playing", "in", "the", "park"]
    assert tokenize(" ... !? ") == []


def test_vocabulary_threshold_order_and_special_ids():
    caps = [["a", "red", "circle"], ["a", "blue", "circle"], ["a", "red", "square"], ["zebra"]]
    v = Vocabulary.build(caps, threshold=2)
    assert v.tokens == ["<pad>", "<start>", "<end>", "<unk>", "a", "circle", "red"]  # ties alphabetical
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert [v.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]
    assert len(v) == 7 and v.counts == {"a": 3, "circle": 2, "red": 2}
    assert v.encode("A blue circle!") == [4, 3, 5]
    assert v.encode(["red", "zebra"]) == [6, 3]
    assert v.decode([1, 4, 6, 0, 5, 2, 6, 6]) == "a red circle"
    assert v.decode(np.array([4, 3])) == "a <unk>"
    assert len(Vocabulary.build(caps, threshold=1)) == 4 + 6
    with pytest.raises(PipelineError, match="threshold"):
        Vocabulary.build(caps, threshold=0)


def test_vocabulary_save_load_round_trip_is_json(tmp_path):
    v = Vocabulary.build([["a", "b", "b"], ["c"]], threshold=1)
    path = tmp_path / "vocab.json"
    v.save(path)
    obj = json.loads(path.read_text())  # plain JSON, not a pickle
    assert obj == {"tokens": v.tokens, "threshold": 1, "counts": {"b": 2, "a": 1, "c": 1}}
    w = Vocabulary.load(tmp_path)  # a cache dir works too
    assert w.tokens == v.tokens and w.stoi == v.stoi and w.fingerprint == v.fingerprint
    assert Vocabulary.build([["a"]], 1).fingerprint != v.fingerprint

    with pytest.raises(PipelineError, match="no vocabulary"):
        Vocabulary.load(tmp_path / "missing.json")
    path.write_bytes(b"\x80\x04\x95 pickled")
    with pytest.raises(PipelineError, match="not a valid vocabulary"):
        Vocabulary.load(path)
    path.write_text(json.dumps({"tokens": ["a", "b"]}))
    with pytest.raises(PipelineError, match="not a valid vocabulary"):
        Vocabulary.load(path)


# ------------------------------------------------------------------------------------------- prepare


def test_prepared_cache_labels_round_trip(prepared_cache, coco_dataset):
    m = load_manifest(prepared_cache)
    v = Vocabulary.load(prepared_cache)
    assert sorted(os.listdir(prepared_cache)) == ["labels.h5", "manifest.json", "vocab.json"]  # no temp files
    with h5py.File(prepared_cache / LABELS_NAME, "r") as f:
        labels, lengths = f["labels"][:], f["lengths"][:]
        caption_image, image_ids, image_split = f["caption_image"][:], f["image_ids"][:], f["image_split"][:]
        attrs = dict(f.attrs)
        assert labels.dtype == np.int32 and lengths.dtype == np.int32 and caption_image.dtype == np.int32
        assert image_ids.dtype == np.int64 and image_split.dtype == np.uint8
    assert list(attrs["splits"]) == ["train", "val", "test"]
    assert attrs["max_length"] == 20 and attrs["vocab_size"] == len(v)
    assert attrs["vocab_fingerprint"] == v.fingerprint and attrs["manifest_fingerprint"] == m.fingerprint
    assert image_ids.tolist() == [r.id for r in m.images]
    assert image_split.tolist() == [0] * 12 + [1] * 6

    n_caps = sum(len(r.captions) for r in m.images)
    assert labels.shape == (n_caps, 20) and lengths.shape == caption_image.shape == (n_caps,)
    rows = [(i, c) for i, r in enumerate(m.images) for c in r.captions]
    assert caption_image.tolist() == [i for i, _ in rows]
    train_words = set()
    for row, (i, raw) in enumerate(rows):
        assert raw.strip() in [c.strip() for c in coco_dataset["captions"][m.images[i].id]]
        toks = tokenize(raw)
        assert lengths[row] == len(toks) >= 1
        assert (labels[row, lengths[row]:] == v.pad_id).all()
        assert v.start_id not in labels[row] and v.end_id not in labels[row]
        if m.images[i].split == "train":
            train_words.update(toks)
            assert v.decode(labels[row]) == " ".join(toks)
        else:  # words never seen in training come back as <unk>
            assert v.decode(labels[row]) == " ".join(t if t in train_words else "<unk>" for t in toks)
    assert set(v.tokens[4:]) == train_words  # threshold 1: every train word, nothing from val
    assert VAL_ONLY_COLOUR not in v.stoi


def test_prepare_cuts_long_captions_and_reports(coco_dataset, tmp_path):
    s = prepare("coco", coco_dataset["annotations"], coco_dataset["images"], out_dir=tmp_path / "c",
                vocab_threshold=2, max_length=4)
    m = load_manifest(tmp_path / "c")
    v = Vocabulary.load(tmp_path / "c")
    all_toks = [tokenize(c) for r in m.images for c in r.captions]
    train_toks = [tokenize(c) for r in m.images if r.split == "train" for c in r.captions]
    assert s.cut_captions == sum(len(t) > 4 for t in all_toks) > 0
    assert s.train_fit_fraction == pytest.approx(np.mean([len(t) <= 4 for t in train_toks]))
    assert s.train_length_p99 == max(len(t) for t in train_toks)  # 99% of < 100 captions means all
    assert (s.images, s.captions, s.skipped_images, s.dropped_empty) == (18, len(all_toks), 1, 0)
    assert s.split_images == {"train": 12, "val": 6, "test": 0}
    assert s.vocab_size == len(v) and all(v.counts[w] >= 2 for w in v.tokens[4:])
    with h5py.File(tmp_path / "c" / LABELS_NAME, "r") as f:
        lengths, labels = f["lengths"][:], f["labels"][:]
    assert labels.shape[1] == 4
    assert lengths.tolist() == [min(len(t), 4) for t in all_toks]
    for row, toks in enumerate(all_toks):
        assert labels[row].tolist() == v.encode(toks[:4]) + [0] * (4 - min(len(toks), 4))
    line = s.line()
    assert "18 images" in line and f"cut {s.cut_captions}" in line and "skipped 1 missing" in line


def test_prepare_drops_empty_captions_and_keeps_captionless_images(tmp_path):
    imgs = tmp_path / "train2014"
    make_jpeg(imgs / "a.jpg")
    make_jpeg(imgs / "b.png", mode="RGBA")
    ann = tmp_path / "captions_train2014.json"
    ann.write_text(json.dumps({"images": [{"id": 2, "file_name": "b.png"}, {"id": 1, "file_name": "a.jpg"}],
                               "annotations": [{"id": 1, "image_id": 1, "caption": "A red circle."},
                                               {"id": 2, "image_id": 1, "caption": " ... "},
                                               {"id": 3, "image_id": 2, "caption": "!!"},
                                               {"id": 4, "image_id": 2, "caption": ""}]}))
    s = prepare("coco", [ann], [imgs], out_dir=tmp_path / "c", vocab_threshold=1)
    assert (s.dropped_empty, s.captions, s.images) == (3, 1, 2)
    m = load_manifest(tmp_path / "c")
    assert [(r.id, r.captions) for r in m.images] == [(1, ["A red circle."]), (2, [])]
    with h5py.File(tmp_path / "c" / LABELS_NAME, "r") as f:
        assert f["caption_image"][:].tolist() == [0] and f["lengths"][:].tolist() == [3]
        assert f["image_ids"][:].tolist() == [1, 2]


def test_prepare_karpathy_and_flickr8k(karpathy_dataset, flickr8k_dataset, tmp_path):
    s = prepare("karpathy", karpathy_dataset["annotations"], karpathy_dataset["images"], out_dir=tmp_path / "k",
                vocab_threshold=1)
    assert s.split_images == {"train": 4, "val": 2, "test": 2} and s.skipped_images == 1
    with h5py.File(tmp_path / "k" / LABELS_NAME, "r") as f:
        assert f["image_split"][:].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    s = prepare("flickr8k", flickr8k_dataset["annotations"], flickr8k_dataset["images"], out_dir=tmp_path / "f",
                vocab_threshold=1)
    assert (s.images, s.captions, s.unsplit_images, s.skipped_images) == (8, 40, 1, 1)


def test_prepare_bad_inputs_raise_pipeline_errors(coco_dataset, tmp_path):
    imgs = coco_dataset["images"]
    with pytest.raises(PipelineError, match=r"annotation file .*captions_train2015\.json not found"):
        prepare("coco", [tmp_path / "captions_train2015.json"], imgs, out_dir=tmp_path / "c")
    with pytest.raises(PipelineError, match="prepare.dataset must be one of coco, karpathy, flickr8k, got 'imagenet'"):
        prepare("imagenet", coco_dataset["annotations"], imgs, out_dir=tmp_path / "c")
    with pytest.raises(PipelineError, match="max_length"):
        prepare("coco", coco_dataset["annotations"], imgs, out_dir=tmp_path / "c", max_length=0)
    with pytest.raises(PipelineError, match="no training captions"):
        prepare("coco", coco_dataset["annotations"][1:], imgs, out_dir=tmp_path / "c")
    with pytest.raises(PipelineError, match="missing"):
        prepare("coco", coco_dataset["annotations"], imgs, out_dir=tmp_path / "c", strict=True)
    assert not (tmp_path / "c").exists()  # nothing half-written on failure
