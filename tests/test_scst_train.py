"""The SCST stage: starts from a cross-entropy checkpoint, keeps the best validation CIDEr, resumes
exactly, samples the same captions whatever the batch's split over ranks, and its checkpoints
evaluate like train's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_evaluate, run_extract

from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.decoder.checkpoint import load_checkpoint
from pipeline.decoder.model import CaptionDecoder, ModelConfig, ModelSettings
from pipeline.scst.config import ScstConfig
from pipeline.scst.sample import sample_captions
from pipeline.scst.scst import scst
from pipeline.train.config import TrainConfig
from pipeline.train.train import train

QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture
def xe(prepared_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(cache, best.pt of a 2-epoch cross-entropy decoder trained on it)."""
    run_extract(prepared_cache, arch="resnet18", weights="none", resize=72, crop=64, batch_size=8, workers=0)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=5e-3, device="cpu", embed_size=32, hidden_size=48)
    train(prepared_cache, tmp_path / "xe", tmp_path / "xe_m", cfg, **QUIET)
    return prepared_cache, tmp_path / "xe" / "best.pt"


def scfg(**kw) -> ScstConfig:
    return ScstConfig(**{"epochs": 2, "batch_size": 4, "samples": 3, "lr": 1e-3, "max_length": 8, "device": "cpu", **kw})


def test_scst_logs_keeps_the_best_and_its_checkpoint_evaluates(xe, tmp_path):
    cache, init = xe
    s = scst(cache, init, tmp_path / "scst", tmp_path / "m", scfg(), **QUIET)
    hist = json.loads((tmp_path / "m" / "scst_epochs.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # epoch 0: the cross-entropy checkpoint, scored first
    assert hist[0]["CIDEr"] == pytest.approx(s.start["CIDEr"])
    # every row has the same keys (`dvc plots show` warned on the starting row, which lacked the sampling ones)
    assert all(list(h) == list(hist[1]) for h in hist) and hist[0]["reward"] is None
    for h in hist[1:]:
        assert {"reward", "baseline", "sample_length", "CIDEr", "BLEU-4"} <= set(h)
        assert 0 <= h["reward"] and 1 <= h["sample_length"] <= 9
        assert h["baseline"] == pytest.approx(h["reward"])  # leave-one-out: the baselines average to the reward
    assert s.best["CIDEr"] == max(h["CIDEr"] for h in hist) and s.best_epoch == max(hist, key=lambda h: h["CIDEr"])["epoch"]
    summary = json.loads((tmp_path / "m" / "scst.json").read_text())
    assert summary["best_epoch"] == s.best_epoch and summary["epochs"] == 2
    assert (tmp_path / "m" / "scst.png").stat().st_size > 10_000
    assert len((tmp_path / "m" / "scst_steps.csv").read_text().splitlines()) == 1 + 2 * 3  # 12 images / 4 a batch
    assert (cache / "cider_df.npz").exists()
    ckpt = load_checkpoint(tmp_path / "scst" / "last.pt")
    assert ckpt["scst"]["init"] == str(init) and ckpt["epoch"] == 2
    ev = run_evaluate(tmp_path / "scst" / "best.pt", cache, tmp_path / "e.json", tmp_path / "r.json", split="val",
                      beam_size=2, tokenizer="simple")
    assert ev.images > 0 and "CIDEr" in ev.scores


def test_resume_is_exact(xe, tmp_path):
    cache, init = xe
    scst(cache, init, tmp_path / "a", tmp_path / "am", scfg(epochs=3), **QUIET)
    scst(cache, init, tmp_path / "b", tmp_path / "bm", scfg(epochs=1), **QUIET)
    scst(cache, init, tmp_path / "b", tmp_path / "bm", scfg(epochs=3), resume=True, **QUIET)
    a, b = (load_checkpoint(tmp_path / x / "last.pt")["model"] for x in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "am" / "scst_steps.csv").read_text() == (tmp_path / "bm" / "scst_steps.csv").read_text()


def test_compiled_step_trains_what_eager_does_and_resumes_exactly(xe, tmp_path):
    """scst.compile true: the same run as eager up to float rounding, the choice in the log, and within the
    setting --resume still ends where an uninterrupted run does."""
    cache, init = xe
    notes = []
    scst(cache, init, tmp_path / "e", tmp_path / "em", scfg(epochs=2, compile="false"), **QUIET)
    scst(cache, init, tmp_path / "c", tmp_path / "cm", scfg(epochs=2, compile="true"), progress=False, log=notes.append)
    assert "compile: true" in notes and any("compiled the decoder's step" in n for n in notes)
    eager, compiled = (load_checkpoint(tmp_path / x / "last.pt")["model"] for x in ("e", "c"))
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-4)
    scst(cache, init, tmp_path / "r", tmp_path / "rm", scfg(epochs=1, compile="true"), **QUIET)
    scst(cache, init, tmp_path / "r", tmp_path / "rm", scfg(epochs=2, compile="true"), resume=True, **QUIET)
    resumed = load_checkpoint(tmp_path / "r" / "last.pt")["model"]
    assert all(torch.equal(resumed[k], compiled[k]) for k in compiled)


def test_greedy_baseline_and_refusals(xe, tmp_path):
    cache, init = xe
    s = scst(cache, init, tmp_path / "g", tmp_path / "gm", scfg(epochs=1, baseline="greedy", samples=1), **QUIET)
    assert s.epochs_run == 1
    with pytest.raises(PipelineError, match="samples >= 2"):
        scst(cache, init, tmp_path / "x", tmp_path / "xm", scfg(samples=1), **QUIET)
    with pytest.raises(PipelineError, match="no checkpoint"):
        scst(cache, tmp_path / "missing.pt", tmp_path / "x", tmp_path / "xm", scfg(), **QUIET)


def test_sampling_with_uniforms_does_not_depend_on_the_batch_split():
    """Rows drawn from their own uniform numbers: two ranks' halves equal one process's whole batch."""
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig.of(ModelSettings(embed_size=8, hidden_size=16), 6, 12)).eval()
    feats, u = torch.randn(4, 6), torch.rand(4 * 3, 7)
    whole = sample_captions(model, feats, 3, 7, 1, 2, (0, 1, 3), uniforms=u)
    halves = [sample_captions(model, feats[r::2], 3, 7, 1, 2, (0, 1, 3),
                              uniforms=u.view(4, 3, 7)[r::2].reshape(-1, 7)) for r in (0, 1)]
    for r, h in enumerate(halves):
        rows = torch.arange(12).view(4, 3)[r::2].reshape(-1)
        T = h.tokens.shape[1]
        assert torch.equal(whole.tokens[rows, :T][h.mask], h.tokens[h.mask])
        assert torch.equal(whole.lengths[rows], h.lengths)


def test_cli_reads_its_params_section(xe, tmp_path):
    cache, init = xe
    params = tmp_path / "params.yaml"
    params.write_text("scst: {epochs: 1, batch_size: 6, samples: 2, lr: 0.001, max_length: 8, device: cpu}\n")
    r = CliRunner().invoke(main, ["--params", str(params), "scst", "--cache-dir", str(cache), "--init", str(init),
                                  "--out", str(tmp_path / "o"), "--metrics-dir", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "scst: 1 epoch(s)" in r.output and "validation CIDEr" in r.output
    assert len((tmp_path / "m" / "scst_steps.csv").read_text().splitlines()) == 1 + 2  # 12 images / 6


def test_bench_scst_reports_speeds_and_the_reward_share(xe, tmp_path):
    cache, _ = xe
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "scst", "--cache-dir", str(cache), "--batch-size", "4", "--samples", "2",
                                  "--max-length", "8", "--train-batch-size", "8", "--train-embed-size", "16",
                                  "--train-hidden-size", "16", "--steps", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["scst_captions_per_s"] > 0 and res["xe_captions_per_s"] > 0 and 0 < res["reward_share"] < 1
    assert "reward (CIDEr-D) share of the step" in r.output and "met" in r.output
    # the limit: the best of the step's ways (threads, allocator, oneDNN off, compiled), the project's beside it
    names = set(res["variants"])
    assert {"1 thread, heap", "1 thread, malloc default"} <= names and any(n.startswith("oneDNN off") for n in names)
    assert res["limit_captions_per_s"] == max(res["variants"].values()) and res["scst_vs_limit"] > 0
    assert "limit = best SCST step" in r.output and "compiled step" in r.output
    r = CliRunner().invoke(main, ["bench", "scst", "--cache-dir", str(cache), "--batch-size", "4", "--samples", "2",
                                  "--max-length", "8", "--steps", "1", "--max-reward-share", "0"])
    assert r.exit_code == 1 and "benchmark target missed: reward share" in r.output



def test_best_pt_never_gets_fewer_demo_pictures_all_right(xe, tmp_path, monkeypatch):
    """The demo's SCST once raised CIDEr while its captions said "on the right" for every place: where the
    val pictures' attributes are known, an epoch with a lower all-right share than the start is never best.pt,
    however high its CIDEr."""
    from pipeline.scst import scst as module

    rows = iter([{"CIDEr": 1.0, "all_right": 0.5}, {"CIDEr": 2.0, "all_right": 0.4},  # start, a better CIDEr
                 {"CIDEr": 1.5, "all_right": 0.5}, {"CIDEr": 1.2, "all_right": 0.6}])
    monkeypatch.setattr(module.ScstRun, "validate", lambda self: dict(next(rows)))
    cache, init = xe
    s = scst(cache, init, tmp_path / "scst", tmp_path / "m", scfg(epochs=3), **QUIET)
    assert s.best_epoch == 2 and s.best == {"CIDEr": 1.5, "all_right": 0.5}
    assert load_checkpoint(tmp_path / "scst" / "best.pt")["epoch"] == 2


def test_demo_scst_and_evaluate_score_the_attributes(tmp_path):
    """On demo pictures SCST's validation rows carry the all-right share, and evaluate the test captions'
    attributes (metrics JSON and table)."""
    from conftest import run_prepare

    from pipeline.acquire.demo_data import make_demo_data

    info = make_demo_data(tmp_path / "demo", n_train=24, n_val=8, n_test=6, image_size=32)
    cache = tmp_path / "cache"
    run_prepare("coco", info["annotations"].values(), info["image_dirs"].values(), cache, vocab_threshold=1)
    run_extract(cache, arch="resnet18", weights="none", resize=32, crop=32, batch_size=16, workers=0)
    train(cache, tmp_path / "xe", tmp_path / "xe_m", TrainConfig(epochs=1, batch_size=16, device="cpu",
                                                                 embed_size=16, hidden_size=16), **QUIET)
    scst(cache, tmp_path / "xe" / "best.pt", tmp_path / "scst", tmp_path / "m", scfg(epochs=1, batch_size=12), **QUIET)
    hist = json.loads((tmp_path / "m" / "scst_epochs.json").read_text())
    assert all(0 <= h["all_right"] <= 1 for h in hist) and len(hist) == 2
    ev = run_evaluate(tmp_path / "scst" / "best.pt", cache, tmp_path / "e.json", split="test", beam_size=1,
                      tokenizer="simple")
    assert ev.attributes["images"] == 6 and "attributes of 6 captions" in ev.table()
    assert json.loads((tmp_path / "e.json").read_text())["attributes"] == ev.attributes
