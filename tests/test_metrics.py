"""Tests for pipeline.metrics. Java-free except the two marked tests, which skip without Java."""

import json
import shutil

import pytest

from pipeline.core.errors import PipelineError
from pipeline.decoder import metrics
from pipeline.decoder.metrics import fast_scores, score_captions, simple_tokenize

# Several distinct images: CIDEr's IDF is computed over the set, so one image would score 0.
REFS = {
    1: ["A dog runs across the green field.", "A brown dog is running on the grass."],
    2: ["Two people ride bicycles down a city street.", "Cyclists riding along a busy road."],
    3: ["A plate of pasta with tomato sauce.", "Spaghetti served on a white plate."],
    4: ["A red train pulls into the station.", "A train arriving at a railway platform."],
}
PERFECT = {i: refs[0] for i, refs in REFS.items()}
UNRELATED = {i: "purple elephants juggle violins underwater" for i in REFS}
ALL_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)


def test_no_java_perfect_and_unrelated(no_java):
    good = score_captions(REFS, PERFECT)
    bad = score_captions(REFS, UNRELATED)
    assert good.tokenizer == bad.tokenizer == "simple"
    assert set(good.scores) == ALL_KEYS - {"METEOR"}
    assert good.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert good.scores["ROUGE-L"] > 0.9
    assert good.scores["CIDEr"] > 1.0
    for key, value in bad.scores.items():
        assert value < 0.05, key
    notes = " ".join(good.notes)
    assert "METEOR skipped" in notes and "Java" in notes
    assert "tokenizer: simple" in notes
    assert "SPICE" in notes and "offline" in notes


def test_scale_is_zero_to_one(no_java):
    half = {i: refs[0].split(".")[0][: len(refs[0]) // 2] for i, refs in REFS.items()}
    for cands in (PERFECT, UNRELATED, half):
        scores = score_captions(REFS, cands).scores
        # CIDEr is not bounded by 1 (pycocoevalcap scales it by 10), the others are in [0, 1].
        assert all(0.0 <= v <= 1.0 + 1e-9 for k, v in scores.items() if k != "CIDEr"), scores
        assert 0.0 <= scores["CIDEr"] <= 10.0 + 1e-9


def test_no_java_via_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert metrics.java_available() is False
    report = score_captions(REFS, PERFECT)
    assert report.tokenizer == "simple"
    assert "METEOR" not in report.scores
    with pytest.raises(PipelineError, match="Java"):
        score_captions(REFS, PERFECT, tokenizer="ptb")


def test_mismatched_ids_raise():
    with pytest.raises(PipelineError, match="same image ids"):
        score_captions(REFS, {1: "a dog", 2: "bikes"}, tokenizer="simple")
    with pytest.raises(PipelineError, match="same image ids"):
        fast_scores({1: ["a dog"]}, {2: "a dog"})


def test_bad_arguments_raise():
    with pytest.raises(PipelineError):
        score_captions(REFS, PERFECT, tokenizer="spacy")
    with pytest.raises(PipelineError):
        score_captions(REFS, PERFECT, metrics=("BLEURT",), tokenizer="simple")
    with pytest.raises(PipelineError):
        score_captions({1: "not a list"}, {1: "a dog"}, tokenizer="simple")
    with pytest.raises(PipelineError):
        score_captions({}, {}, tokenizer="simple")


def test_metric_subset_and_json(no_java):
    report = score_captions(REFS, PERFECT, metrics=("CIDEr", "rouge-l"))
    assert set(report.scores) == {"ROUGE-L", "CIDEr"}
    d = json.loads(json.dumps(report.as_dict()))
    assert d["tokenizer"] == "simple" and d["scores"] == report.scores and d["notes"] == report.notes


def test_simple_tokenize():
    assert simple_tokenize("A Dog, running.  Then it's \"happy\"!") == "a dog running then it 's happy"
    assert simple_tokenize("A hot-dog. Then more.") == "a hot-dog then more"
    assert simple_tokenize("...") == ""


def test_fast_scores_match_simple_path(capsys):
    cands = {1: "A dog running on grass.", 2: "People riding bikes.", 3: "Pasta on a plate.",
             4: "A train at the station."}
    refs_tok = {i: [simple_tokenize(r) for r in refs] for i, refs in REFS.items()}
    cands_tok = {i: simple_tokenize(c) for i, c in cands.items()}
    fast = fast_scores(refs_tok, cands_tok)
    full = score_captions(REFS, cands, metrics=("BLEU", "CIDEr"), tokenizer="simple")
    assert set(fast) == {"CIDEr", "BLEU-4"}
    assert fast["CIDEr"] == pytest.approx(full.scores["CIDEr"])
    assert fast["BLEU-4"] == pytest.approx(full.scores["BLEU-4"])
    assert capsys.readouterr().out == ""  # scorer chatter suppressed


needs_java = pytest.mark.skipif(shutil.which("java") is None or not metrics.java_available(),
                                reason="java not found on PATH; METEOR and the PTB tokenizer need it")


@pytest.fixture(scope="module")
def java_run():
    """One Java-backed run for the module: a METEOR JVM start takes seconds, more on a busy box.

    Wraps Meteor to record its subprocess, so we can check it was shut down afterwards.
    """
    procs = []
    real = metrics.Meteor

    def tracking():
        m = real()
        procs.append(m.meteor_p)
        return m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "Meteor", tracking)
        return score_captions(REFS, PERFECT), procs


@needs_java
@pytest.mark.slow
def test_with_java_meteor_and_ptb(java_run):
    report, _ = java_run
    assert report.tokenizer == "ptb"
    assert set(report.scores) == ALL_KEYS
    assert 0.0 < report.scores["METEOR"] <= 1.0
    assert report.scores["METEOR"] > 0.5
    assert report.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert report.scores["CIDEr"] > 1.0
    assert not any("METEOR skipped" in n for n in report.notes)
    assert any("tokenizer: ptb" in n for n in report.notes)
    assert any("SPICE" in n for n in report.notes)


@needs_java
@pytest.mark.slow
def test_meteor_process_closed(java_run):
    _, procs = java_run
    assert len(procs) == 1 and procs[0].poll() is not None
    assert procs[0].stdin.closed and procs[0].stdout.closed
