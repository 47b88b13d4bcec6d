"""Stage 2: training from the cache, resume, decoding with the real decoder, evaluate, caption, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_evaluate
from conftest import run_extract as extract

from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.core.vocab import Vocabulary
from pipeline.decoder import model as model_module
from pipeline.decoder.checkpoint import load_checkpoint
from pipeline.decoder.data import length_grouped_batches, load_cache
from pipeline.decoder.decode import beam_search, greedy_decode
from pipeline.decoder.decoders import make_decoder
from pipeline.decoder.model import CaptionDecoder, ModelConfig, ModelSettings, packed_targets, teacher_forcing
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.evaluate import evaluate
from pipeline.extract.config import ExtractConfig
from pipeline.train.config import TrainConfig
from pipeline.train.train import Trainer, accumulation_group, global_batches, run_epoch, train

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=8, workers=0)
TINY_MODEL = dict(embed_size=32, hidden_size=48)


@pytest.fixture
def cache(prepared_cache: Path) -> Path:
    extract(prepared_cache, **SMALL)
    return prepared_cache


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 5e-3, "device": "cpu", **TINY_MODEL, **kw})


def run(cache: Path, out: Path, model: dict | None = None, **kw):
    return train(cache, out / "ckpt", out / "metrics", cfg(**{**(model or {}), **kw}), progress=False,
                 log=lambda m: None)


def test_teacher_forcing_and_packing():
    words = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]])
    inputs, targets, lengths, order = teacher_forcing(words, torch.tensor([2, 3]), start_id=1, end_id=2)
    assert order.tolist() == [1, 0] and lengths.tolist() == [4, 3]
    assert inputs.tolist() == [[1, 7, 8, 9], [1, 5, 6, 0]]
    assert targets.tolist() == [[7, 8, 9, 2], [5, 6, 2, 0]]
    packed = packed_targets(targets, lengths)
    assert sorted(packed.tolist()) == sorted([7, 8, 9, 2, 5, 6, 2])  # no padding reaches the loss


@pytest.mark.parametrize("decoder", ["showtell", "attend"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_in_blocks_equals_the_whole_logits_loss_and_gradients(decoder, smoothing, monkeypatch):
    """The loss the decoders compute a block of rows at a time (under glibc's mmap threshold) is the
    cross-entropy of the whole (sum(lengths), V) logits, with the same gradients, also for a last, short block,
    and label-smoothed as torch's cross_entropy smooths."""
    torch.manual_seed(0)
    settings = ModelSettings(embed_size=6, hidden_size=8, decoder=decoder, attention_size=5)
    model = make_decoder(ModelConfig.of(settings, 5, 11, grid_size=2)).eval()
    features = torch.randn(4, 5) if decoder == "showtell" else torch.randn(4, 5, 5)  # (B, D) / (B, 1 + R, D)
    words = torch.randint(3, 11, (4, 6))
    inputs, targets, lengths, order = teacher_forcing(words, torch.tensor([6, 4, 3, 1]), start_id=1, end_id=2)
    targets = packed_targets(targets, lengths)  # 18 tokens
    monkeypatch.setattr(model_module, "LOGIT_BLOCK_BYTES", 4 * 11 * 4)  # blocks of 4 rows: 4 + 4 + 4 + 4 + 2
    results = []
    whole = torch.nn.functional.cross_entropy
    for loss_of in (lambda: whole(model(features[order], inputs, lengths), targets, label_smoothing=smoothing),
                    lambda: model(features[order], inputs, lengths, targets, smoothing)):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert len(results[1][1]) == len(results[0][1])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want)


def test_length_grouped_batches_cover_every_caption_once():
    lengths = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 5)
    rows = torch.arange(len(lengths))
    batches = length_grouped_batches(rows, lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == rows.tolist()
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches)
    assert spread <= 8  # sorted by length: a batch spans at most one length boundary or two


def test_training_reduces_loss_and_writes_outputs(cache, tmp_path):
    s = run(cache, tmp_path, epochs=4)
    hist = s.history
    losses = [h["train_loss"] for h in hist]
    assert len(hist) == 4 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    for key in ("val_loss", "val_perplexity", "CIDEr", "BLEU-4", "captions_per_second"):
        assert key in hist[0]
    ck = tmp_path / "ckpt"
    assert (ck / "last.pt").exists() and (ck / "best.pt").exists()
    m = tmp_path / "metrics"
    lines = (m / "train_steps.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,perplexity,lr" and len(lines) == 1 + s.steps
    assert json.loads((m / "train_epochs.json").read_text())[-1]["epoch"] == 4
    summary = json.loads((m / "train.json").read_text())
    assert summary["best_epoch"] == s.best_epoch and "CIDEr" in summary
    ckpt = load_checkpoint(ck / "last.pt")
    assert ckpt["encoder"]["arch"] == "resnet18" and ckpt["encoder"]["crop"] == 64
    assert ckpt["vocab"] == Vocabulary.load(cache).tokens and ckpt["epoch"] == 4
    assert ckpt["model_config"]["hidden_size"] == 48 and "optimizer" in ckpt and "torch" in ckpt["rng"]
    from PIL import Image  # the curves as a picture, for machines where `dvc plots show` cannot load Vega

    with Image.open(m / "train.png") as png:
        assert png.format == "PNG" and png.width > 800 and png.height > 300
        assert len(png.convert("RGB").getcolors(1 << 16) or []) > 50  # drawn on, not blank


def test_resume_reproduces_uninterrupted_run(cache, tmp_path):
    noisy = {"dropout": 0.3, "num_layers": 2}  # dropout draws random numbers: resume must restore the RNG
    straight = run(cache, tmp_path / "a", noisy, epochs=3)
    run(cache, tmp_path / "b", noisy, epochs=1)
    resumed = train(cache, tmp_path / "b" / "ckpt", tmp_path / "b" / "metrics", cfg(epochs=3, **noisy), resume=True,
                    progress=False, log=lambda m: None)
    a = load_checkpoint(tmp_path / "a" / "ckpt" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "metrics" / "train_steps.csv").read_text() == \
        (tmp_path / "b" / "metrics" / "train_steps.csv").read_text()
    assert [h["val_loss"] for h in straight.history] == [h["val_loss"] for h in resumed.history]


def test_resume_with_other_model_settings_is_refused(cache, tmp_path):
    run(cache, tmp_path, epochs=1)
    with pytest.raises(PipelineError, match="other model settings"):
        train(cache, tmp_path / "ckpt", tmp_path / "metrics", cfg(embed_size=16), resume=True, progress=False,
              log=lambda m: None)


def test_blind_decoder_cannot_see_the_image(cache, tmp_path):
    """The image-blind baseline: same captions whatever the picture, recorded in the checkpoint."""
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig.of(ModelSettings(embed_size=8, hidden_size=16, blind=True), 10, 12))
    model.fit_feature_stats(torch.randn(20, 10) * 3 + 1)
    a, b = model.init_state(torch.randn(4, 10)), model.init_state(torch.randn(4, 10) * 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    mean = model.init_state(model.feature_mean.expand(4, 10))  # the same as seeing only the mean feature
    model.cfg = ModelConfig.of(ModelSettings(embed_size=8, hidden_size=16, blind=False), 10, 12)
    assert all(torch.allclose(x, y) for x, y in zip(mean, model.init_state(model.feature_mean.expand(4, 10))))

    run(cache, tmp_path, {"blind": True}, epochs=2)
    assert load_checkpoint(tmp_path / "ckpt" / "best.pt")["model_config"]["blind"] is True
    run_evaluate(tmp_path / "ckpt" / "best.pt", cache, split="val", out=tmp_path / "e.json", results=tmp_path / "r.json",
             tokenizer="simple")
    captions = {r["caption"] for r in json.loads((tmp_path / "r.json").read_text())}
    assert len(captions) == 1  # one caption for every image: it never looked


def test_bench_blind_trains_both_ways_from_params(cache, tmp_path):
    """`pipeline --params params.yaml bench blind`: both runs take params.yaml's settings; a ratio below
    --target is a failure (one line, exit status 1)."""
    params = tmp_path / "params.yaml"
    params.write_text("train: {embed_size: 32, hidden_size: 48, blind: false, epochs: 3, batch_size: 8, lr: 0.005,"
                      " device: cpu}\n"
                      "evaluate: {split: val, beam_size: 2, max_length: 12, tokenizer: simple}\n")
    cli = CliRunner()
    out = tmp_path / "bench.json"
    r = cli.invoke(main, ["--params", str(params), "bench", "blind", "--cache-dir", str(cache), "--target", "0",
                          "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 epochs, hidden 48, val split" in r.output and "seeing / blind" in r.output
    res = json.loads(out.read_text())
    assert res["split"] == "val" and res["target"] == 0
    assert res["cider_ratio"] == pytest.approx(res["seeing"]["CIDEr"] / res["blind"]["CIDEr"])
    assert res["seeing"]["CIDEr"] != res["blind"]["CIDEr"]
    r = cli.invoke(main, ["--params", str(params), "bench", "blind", "--cache-dir", str(cache), "--epochs", "1",
                          "--target", "1000"])
    assert r.exit_code == 1 and "1 epochs" in r.output and "Traceback" not in r.output
    assert "target CIDEr seeing / blind >= 1000: MISSED" in r.output
    assert r.output.splitlines()[-1].startswith("Error: benchmark target missed: CIDEr seeing / blind")


def test_bench_train_prints_figures_and_fails_below_its_targets(cache, tmp_path):
    args = ["bench", "train", "--cache-dir", str(cache), "--batch-size", "8", "--embed-size", "32", "--hidden-size",
            "48", "--device", "cpu", "--notebook-batches", "2"]
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, args + ["--target-ratio", "0", "--target-speedup", "0", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["ratio"] == pytest.approx(res["train_captions_per_s"] / res["bare_captions_per_s"])
    assert res["bare_captions_per_s"] == max(res["bare_variants"].values())
    assert {"1 thread, heap", "1 thread, malloc default"} <= set(res["bare_variants"])
    assert res["speedup_vs_notebook"] == pytest.approx(res["train_captions_per_s"] / res["notebook_captions_per_s"])
    r = CliRunner().invoke(main, args + ["--target-speedup", "1e9"])
    assert r.exit_code == 1 and "target speed-up over the notebook way >= 1e+09: MISSED" in r.output
    assert r.output.splitlines()[-1].startswith("Error: benchmark target missed:")


def test_beam_one_equals_greedy_with_real_decoder():
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig.of(ModelSettings(embed_size=8, hidden_size=16), 10, 12)).eval()
    feats = torch.randn(5, 10)
    g = greedy_decode(model, feats, max_length=6, start_id=1, end_id=2, banned_ids=(0, 1, 3))
    b = beam_search(model, feats, beam_size=1, max_length=6, start_id=1, end_id=2, banned_ids=(0, 1, 3))
    assert [h.tokens for h in g] == [h.tokens for h in b]
    assert [h.logprob for h in g] == pytest.approx([h.logprob for h in b], abs=1e-6)
    wide = beam_search(model, feats, beam_size=8, max_length=6, start_id=1, end_id=2, banned_ids=(0, 1, 3))
    assert all(w.logprob >= h.logprob - 1e-6 for w, h in zip(wide, g))  # a beam never does worse than greedy


def test_evaluate_writes_every_metric(cache, tmp_path):
    run(cache, tmp_path, epochs=2)
    out = tmp_path / "eval.json"
    s = run_evaluate(tmp_path / "ckpt" / "best.pt", cache, split="val", out=out, results=tmp_path / "res.json",
                 beam_size=2, tokenizer="simple")
    metrics = json.loads(out.read_text())
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert 0.0 <= metrics[key] <= (10.0 if key == "CIDEr" else 1.0)
    assert metrics["split"] == "val" and metrics["images"] == s.images == 6
    assert any("SPICE" in n for n in metrics["notes"])
    results = json.loads((tmp_path / "res.json").read_text())
    assert len(results) == 6 and set(results[0]) == {"image_id", "caption"}
    with pytest.raises(PipelineError, match="no valid images in split 'test'"):
        run_evaluate(tmp_path / "ckpt" / "best.pt", cache, split="test", out=out, tokenizer="simple")


def test_mismatched_cache_is_refused(cache, tmp_path):
    run(cache, tmp_path, epochs=1)
    # features re-extracted with another encoder: the checkpoint must not be scored on them
    extract(cache, force=True, **{**SMALL, "arch": "resnet34"})
    with pytest.raises(PipelineError, match="another encoder.*arch"):
        run_evaluate(tmp_path / "ckpt" / "last.pt", cache, split="val", out=tmp_path / "e.json", tokenizer="simple")
    # a vocabulary that does not belong to labels.h5
    v = Vocabulary.load(cache)
    Vocabulary(v.tokens + ["zebra"]).save(cache / "vocab.json")
    with pytest.raises(PipelineError, match="another vocabulary"):
        load_cache(cache)


def test_features_from_another_manifest_are_refused(cache, prepared_cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    m = json.loads((other / "manifest.json").read_text())
    m["images"] = m["images"][::-1]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PipelineError, match="manifest"):
        load_cache(other)


def test_checkpoint_with_unexpected_object_is_refused(cache, tmp_path):
    run(cache, tmp_path, epochs=1)
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    ckpt["extra"] = Path("/etc/passwd")  # any non-tensor, non-plain object
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ckpt" / "last.pt").read_bytes()[:1000])
    with pytest.raises(PipelineError, match="cannot read"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(PipelineError, match="not a `pipeline train` checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--cache-dir", str(cache)])
    assert r.exit_code == 1 and r.output.startswith("Error: refusing") and "Traceback" not in r.output


def test_cli_end_to_end(coco_dataset, tmp_path, monkeypatch):
    """prepare -> extract -> train -> scst -> evaluate -> caption through the command line with their default
    paths, as a user runs it."""
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()

    def ok(*args):
        r = cli.invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    ann, img = coco_dataset["annotations"], coco_dataset["images"]
    ok("prepare", "--dataset", "coco", "--annotations", ann[0], "--annotations", ann[1], "--images", img[0],
       "--images", img[1], "--vocab-threshold", "1")
    ok("extract", "--arch", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--workers", "0", "--quiet")
    ok("train", "--epochs", "2", "--batch-size", "8", "--lr", "0.005", "--embed-size", "32", "--hidden-size", "48",
       "--quiet", "--device", "cpu")
    # evaluate and caption default to SCST's checkpoint (the DVC layout): after train alone, the error says so
    r = cli.invoke(main, ["evaluate", "--split", "val", "--tokenizer", "simple"])
    assert r.exit_code == 1 and "`pipeline scst`" in r.output and "--checkpoint checkpoints/xe/best.pt" in r.output
    ok("scst", "--epochs", "1", "--batch-size", "4", "--samples", "2", "--max-length", "8", "--device", "cpu", "--quiet")
    out = ok("evaluate", "--split", "val", "--tokenizer", "simple", "--beam-size", "2")
    assert "CIDEr" in out and json.loads(Path("metrics/eval.json").read_text())["images"] == 6
    bad = Path(img[1]) / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out = ok("caption", str(img[1]), "--json", "caps.json", "--html", "caps.html", "--beam-size", "2")
    lines = [l for l in out.splitlines() if "\t" in l]
    assert len(lines) == 6 and all(l.split("\t")[1].strip() for l in lines)
    assert "skipped" in out and "broken.jpg" in out
    caps = json.loads(Path("caps.json").read_text())
    assert len(caps) == 6 and {"image_id", "caption"} <= set(caps[0])
    page = Path("caps.html").read_text()
    assert page.count("<img ") == 6 and "data:image/jpeg;base64," in page
    r = cli.invoke(main, ["caption", "nothing-here/*.jpg"])
    assert r.exit_code == 1 and "Error:" in r.output


def test_evaluate_says_which_images_it_left_out(coco_dataset, prepared_cache, tmp_path):
    """Undecodable images and --max-images cut are counted in the summary and the metrics, not dropped silently."""
    [victim] = Path(coco_dataset["images"][1]).glob("COCO_val2014_000000000632.*")
    victim.write_bytes(b"\xff\xd8\xff garbage")
    extract(prepared_cache, **SMALL)
    run(prepared_cache, tmp_path, epochs=1)
    out = tmp_path / "x" / "eval.json"
    s = run_evaluate(tmp_path / "ckpt" / "best.pt", prepared_cache, split="val", out=out, tokenizer="simple",
                     max_images=3)
    metrics = json.loads(out.read_text())
    assert (s.images, s.split_images) == (3, 6) and metrics["split_images"] == 6
    assert metrics["left_out"] == {"undecodable": 1, "max_images": 2}
    assert s.table().splitlines()[0].startswith("val: 3 of 6 images")
    assert "1 could not be decoded at extraction, 2 beyond --max-images" in s.table()
    # outputs go where asked: the captions file beside --out, not in X/../results
    assert s.results_path == str(tmp_path / "x" / "captions_val.json") and Path(s.results_path).exists()
    assert not (tmp_path / "results").exists()


def test_evaluate_refuses_images_the_checkpoint_was_trained_on(cache, tmp_path):
    run(cache, tmp_path, epochs=1)
    best = tmp_path / "ckpt" / "best.pt"
    record = load_checkpoint(best)["train_images"]
    assert record["count"] == 12 and record["ids"].dtype == torch.int64 and record["ids"].tolist() == sorted(
        [9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 72, 77])
    with pytest.raises(PipelineError, match=r"^12 of the 12 images of split 'train' were in .*--allow-overlap"):
        run_evaluate(best, cache, split="train", out=tmp_path / "e.json", tokenizer="simple")
    s = evaluate(best, cache, EvaluateConfig(split="train", tokenizer="simple"), out=tmp_path / "e.json",
                 allow_overlap=True)
    assert any("12 of the 12 scored images were in the checkpoint's training set" in n for n in s.notes)
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(best), "--cache-dir", str(cache), "--split", "train",
                                  "--tokenizer", "simple", "--out", str(tmp_path / "e2.json")])
    assert r.exit_code == 1 and r.output.startswith("Error: 12 of the 12 images") and "Traceback" not in r.output
    # a checkpoint from before training images were recorded: evaluate says it cannot check, and goes on
    old = torch.load(best, weights_only=True)
    del old["train_images"]
    torch.save(old, tmp_path / "old.pt")
    s = run_evaluate(tmp_path / "old.pt", cache, split="val", out=tmp_path / "e3.json", tokenizer="simple")
    assert any("does not record its training images" in n for n in s.notes)
    assert any("not checked" in n for n in json.loads((tmp_path / "e3.json").read_text())["notes"])


def test_demo_caption_step_writes_its_files_when_piped_to_head(cache, tmp_path):
    """The Makefile's `pipeline caption ... --html X --json Y | head -n 8`: head leaves early, the files stay.

    The lines are made longer in total than a pipe's buffer (64 KiB, long folder names), so caption is
    still printing when head has gone, on every run."""
    run(cache, tmp_path, epochs=1)
    folder = tmp_path.joinpath(*(f"{'d' * 200}{k}" for k in range(5)))  # ~1 KiB paths
    folder.mkdir(parents=True)
    [source] = Path(json.loads((cache / "manifest.json").read_text())["image_dirs"][0]).glob("*000000000009.*")
    for k in range(80):
        shutil.copy(source, folder / f"img{k:03d}{source.suffix}")
    html, js = tmp_path / "out" / "demo.html", tmp_path / "out" / "demo.json"
    cmd = (f"'{sys.executable}' -m pipeline caption '{folder}' --checkpoint '{tmp_path / 'ckpt' / 'best.pt'}' "
           f"--html '{html}' --json '{js}' | head -n 2; echo \"caption exit ${{PIPESTATUS[0]}}\" >&2")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600)
    assert len(p.stdout.splitlines()) == 2
    assert html.exists() and js.exists() and len(json.loads(js.read_text())) == 80
    assert "Traceback" not in p.stderr and "caption exit 0" in p.stderr, p.stderr


def test_evaluation_only_dataset_prepared_with_a_checkpoints_vocabulary(cache, coco_dataset, tmp_path):
    """COCO val alone (no train split) + `prepare --vocab CHECKPOINT`: evaluate and caption work on it, train refuses."""
    run(cache, tmp_path, epochs=1)
    best, other = tmp_path / "ckpt" / "best.pt", tmp_path / "valonly"
    cli = CliRunner()
    r = cli.invoke(main, ["prepare", "--dataset", "coco", "--annotations", str(coco_dataset["annotations"][1]),
                          "--images", str(coco_dataset["images"][1]), "--vocab", str(best), "--out-dir", str(other)])
    assert r.exit_code == 0, r.output
    assert "train 0, val 6" in r.output and f"from {best}" in r.output
    extract(other, **SMALL)
    r = cli.invoke(main, ["evaluate", "--checkpoint", str(best), "--cache-dir", str(other), "--split", "val",
                          "--tokenizer", "simple", "--out", str(tmp_path / "e" / "eval.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["images"] == 6
    r = cli.invoke(main, ["caption", str(coco_dataset["images"][1]), "--checkpoint", str(best)])
    assert r.exit_code == 0 and len([line for line in r.output.splitlines() if "\t" in line]) == 6
    with pytest.raises(PipelineError, match="no training captions"):
        run(other, tmp_path / "t", epochs=1)
    # the benchmarks refuse it the same way (bench train once divided by its zero captions: a traceback)
    for cmd in (["bench", "train", "--notebook-batches", "1"], ["bench", "scst"]):
        r = cli.invoke(main, cmd + ["--cache-dir", str(other), "--device", "cpu"])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "no training captions" in r.output.splitlines()[-1]


# ------------------------------------------------------------------------ accumulation, batchnorm, DDP no_sync
def test_accumulation_groups_of_an_epoch():
    assert [accumulation_group(i, 6, 4) for i in range(6)] == [4, 4, 4, 4, 2, 2]
    assert [accumulation_group(i, 4, 2) for i in range(4)] == [2, 2, 2, 2]
    assert [accumulation_group(i, 3, 1) for i in range(3)] == [1, 1, 1]


def _update_grads(data, batches, **kw) -> list[torch.Tensor]:
    """The gradients each optimizer step of run_epoch sees, from a decoder seeded the same way every time."""
    c = cfg(clip=0.0, **kw)
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig.of(c, data.encoder.feature_dim, len(data.vocab)))
    trainer = Trainer(model, c, torch.device("cpu"))
    seen, step = [], trainer.opt.step

    def record(*a, **k):
        seen.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone())
        return step(*a, **k)

    trainer.opt.step = record
    run_epoch(trainer, data, batches)
    return seen


def test_partial_accumulation_group_is_averaged_over_its_own_batches(cache):
    """accumulate=4 over 2 batches: one update averaging 2 batches, the same gradient as accumulate=2."""
    data = load_cache(cache)
    batches = global_batches(data, data.caption_rows("train"), cfg(), epoch=0)[:2]
    [partial] = _update_grads(data, batches, accumulate=4)
    [whole] = _update_grads(data, batches, accumulate=2)
    assert torch.allclose(partial, whole, rtol=1e-5, atol=1e-7)


def test_batchnorm_survives_a_one_caption_batch(cache, tmp_path):
    data = load_cache(cache)
    n = len(data.caption_rows("train"))
    s = run(cache, tmp_path, model={"batchnorm": True}, epochs=1, batch_size=n - 1)  # last batch: 1 caption
    assert s.steps == 2
    model = CaptionDecoder(ModelConfig.of(cfg(batchnorm=True), data.encoder.feature_dim, len(data.vocab))).train()
    before = model.bn.running_mean.clone()
    model.init_state(data.features[:1].float())  # (1, D): running statistics, left unchanged
    assert torch.equal(model.bn.running_mean, before)


def test_ddp_accumulation_steps_do_not_all_reduce(cache, tmp_path):
    """Only the updating step of an accumulation group communicates: the forward pass is inside no_sync."""
    import torch.distributed as tdist

    data = load_cache(cache)
    batches = global_batches(data, data.caption_rows("train"), cfg(), epoch=0)[:4]
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = {}
        for accumulate in (1, 4):
            c = cfg(accumulate=accumulate)
            torch.manual_seed(0)
            trainer = Trainer(CaptionDecoder(ModelConfig.of(c, data.encoder.feature_dim, len(data.vocab))), c,
                              torch.device("cpu"), ddp=True)
            calls[accumulate] = 0

            def hook(state, bucket, accumulate=accumulate):
                calls[accumulate] += 1
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut

            trainer.net.register_comm_hook(None, hook)
            run_epoch(trainer, data, batches)
        assert calls[4] > 0 and calls[1] == 4 * calls[4]  # 4 updates vs 1 update, the same buckets each
    finally:
        tdist.destroy_process_group()


def test_process_group_timeout_is_explicit_and_at_least_30_minutes(monkeypatch):
    """torch's NCCL default (10 min) would abort a job while rank 0 validates: the timeout is always passed."""
    from datetime import timedelta

    import torch.distributed as tdist

    from pipeline.core import distributed

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("PIPELINE_DIST_TIMEOUT", raising=False)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: seen.append(kw))
    monkeypatch.setattr(tdist, "get_rank", lambda: 0)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    distributed.context()
    distributed.context(TrainConfig(dist_timeout=90).dist_timeout)
    monkeypatch.setenv("PIPELINE_DIST_TIMEOUT", "7200")
    distributed.context(45)
    assert [kw["timeout"] for kw in seen] == [timedelta(minutes=30), timedelta(minutes=90), timedelta(hours=2)]
    assert TrainConfig().dist_timeout == 30 and ExtractConfig().dist_timeout == 30


def test_train_under_torchrun_starts_the_process_group_with_its_own_timeout(monkeypatch, tmp_path):
    """A Python call `train(cfg=TrainConfig(dist_timeout=90))` under torchrun: the group is started with 90
    minutes (found: train joined the group with the 30-minute default before setup passed cfg's)."""
    from datetime import timedelta

    import torch.distributed as tdist

    from pipeline.core import distributed

    class Started(Exception):
        pass

    seen = []

    def init_process_group(**kw):
        seen.append(kw)
        raise Started  # the group's arguments are all this test needs: stop before any collective

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("PIPELINE_DIST_TIMEOUT", raising=False)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Started):
        train(tmp_path / "cache", tmp_path / "ckpt", tmp_path / "m", TrainConfig(dist_timeout=90), progress=False,
              log=lambda m: None)
    assert [kw["timeout"] for kw in seen] == [timedelta(minutes=90)]


def test_checkpoint_with_an_older_encoder_record_still_evaluates(cache, tmp_path):
    """Checkpoints written before the encoder record had `draft` and `interpolation` (found by evaluating
    an older demo checkpoint): the record gets today's defaults, as the cache's own attributes do."""
    from pipeline.decoder.checkpoint import save_checkpoint
    from pipeline.evaluate.evaluate import check_compatible

    run(cache, tmp_path, epochs=1)
    ckpt = load_checkpoint(tmp_path / "ckpt" / "best.pt")
    for key in ("draft", "interpolation"):
        ckpt["encoder"].pop(key, None)
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in ckpt.items() if k != "format"})
    old = load_checkpoint(tmp_path / "old.pt")
    from pipeline.decoder.data import load_cache

    check_compatible(old, load_cache(cache), "old.pt")  # no refusal
    s = run_evaluate(tmp_path / "old.pt", cache, split="val", out=tmp_path / "e.json", tokenizer="simple")
    assert s.images == 6


def test_feature_stats_read_each_row_once_and_match_torch():
    """set_stats merges blocks in one pass: a grid read from the file is read once, and the figures are exact."""
    from pipeline.decoder.model import set_stats

    class Counting:  # a (N, R, D) array that counts the rows read, like data.GridReader
        def __init__(self, x):
            self.x, self.reads = x, 0

        def __len__(self):
            return len(self.x)

        @property
        def shape(self):
            return self.x.shape

        def __getitem__(self, rows):
            self.reads += len(rows)
            self.largest = max(getattr(self, "largest", 0), len(rows))
            return self.x[rows]

    g = torch.Generator().manual_seed(0)
    grid = Counting(torch.randn(50, 3, 4, generator=g, dtype=torch.float64).float() * 5 + 100)
    rows = torch.arange(1, 50, 2)  # 25 of the 50 images
    mean, std = torch.empty(4), torch.empty(4)
    set_stats(mean, std, grid, rows, vectors=21)  # 21 vectors of 3 regions: blocks of 7, 7, 7, 4 images
    assert grid.reads == len(rows) and grid.largest == 7
    want = grid.x[rows].reshape(-1, 4).double()
    torch.testing.assert_close(mean, want.mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(std, want.std(0).float(), rtol=1e-5, atol=0)
