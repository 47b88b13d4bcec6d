"""Region grids in the cache and the attention decoder: extraction, reading rows from the file in any
process, the decoder's exactness (weights, masking, beam search), and the stages run with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_evaluate, run_extract
from test_decode import END, START, all_sequences, lp_pen

from pipeline.caption.caption import caption_images, write_html
from pipeline.core.errors import PipelineError
from pipeline.decoder.attend import AttendDecoder
from pipeline.decoder.checkpoint import load_checkpoint, restore_decoder
from pipeline.decoder.data import load_cache
from pipeline.decoder.decode import beam_search
from pipeline.decoder.model import CaptionDecoder, ModelConfig, ModelSettings, packed_targets, teacher_forcing
from pipeline.encoder.encoder import build_encoder, make_spec

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)
GRID = dict(SMALL, features="grid", grid_size=2)  # a 64-px crop gives resnet18 a 2 x 2 map: one cell per region
TRAIN = dict(epochs=2, batch_size=8, lr=0.01, embed_size=16, hidden_size=24, attention_size=8, device="cpu",
             print_every=1000, val_images=4)


def tiny_attend(vocab: int = 6, d: int = 5, regions: int = 4, seed: int = 0, **kw) -> AttendDecoder:
    torch.manual_seed(seed)
    settings = ModelSettings(embed_size=6, hidden_size=8, decoder="attend", attention_size=7, **kw)
    model = AttendDecoder(ModelConfig.of(settings, d, vocab, grid_size=int(regions ** 0.5)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # peaked distributions: beam search differs from greedy
    return model.eval()


def image_inputs(n: int, d: int = 5, regions: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1 + regions, d, generator=torch.Generator().manual_seed(seed))  # (B, 1 + R, D)


@pytest.fixture
def grid_cache(prepared_cache: Path) -> Path:
    run_extract(prepared_cache, **GRID)
    return prepared_cache


def test_grid_is_stored_per_image_beside_the_pooled_features(grid_cache):
    with h5py.File(grid_cache / "features.h5") as f:
        pooled, grid = f["features"][:].astype(np.float32), f["grid"]
        assert grid.shape == (len(pooled), 4, 512) and grid.dtype == np.float16
        assert grid.chunks == (1, 4, 512) and grid.fletcher32  # one checksummed chunk per image
        assert int(f.attrs["grid_size"]) == 2
        cells = grid[:].astype(np.float32)
    # the map is 2 x 2 here, so the pooled feature is the mean of the four regions
    np.testing.assert_allclose(cells.mean(1), pooled, rtol=1e-2, atol=1e-2)
    # the encoder gives new images the same form: (B, 1 + R, D), row 0 pooled
    enc = build_encoder(make_spec("resnet18", "none", 72, 64, grid_size=2))
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (2, 5, 512)
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(1), rtol=1e-4, atol=1e-4)


def test_grid_reader_returns_the_rows_asked_in_their_order_repeats_included(grid_cache):
    """GridReader reads chunk by chunk (h5py's fancy index took 0.9 s for 128 COCO-sized rows): any order,
    repeats and an empty selection give exactly what the file holds, and image_inputs puts the pooled row first."""
    data = load_cache(grid_cache, grid=True)
    with h5py.File(grid_cache / "features.h5") as f:
        cells, pooled = f["grid"][:], f["features"][:]
    rows = torch.tensor([5, 0, 5, 11, 3, 0])
    assert torch.equal(data.grid[rows], torch.from_numpy(cells[rows.numpy()]))
    assert data.grid[torch.tensor([], dtype=torch.long)].shape == (0, *cells.shape[1:])
    inputs = data.image_inputs(rows)  # (B, 1 + R, D) float32
    assert inputs.dtype == torch.float32 and inputs.shape == (6, 1 + cells.shape[1], cells.shape[2])
    assert torch.equal(inputs[:, 0], torch.from_numpy(pooled[rows.numpy()]).float())
    assert torch.equal(inputs[:, 1:], torch.from_numpy(cells[rows.numpy()]).float())


def test_pooled_cache_refuses_the_attention_decoder_in_one_line(prepared_cache, tmp_path):
    from conftest import run_train

    run_extract(prepared_cache, **SMALL)
    with pytest.raises(PipelineError, match="pooled features only.*--features grid --grid-size 7"):
        run_train(prepared_cache, out=tmp_path / "ck", metrics_dir=tmp_path / "m", decoder="attend", **TRAIN)


def test_switching_to_grid_needs_force_and_keeps_old_caches_valid(prepared_cache):
    run_extract(prepared_cache, **SMALL)
    with pytest.raises(PipelineError, match="other settings.*grid_size.*--force"):
        run_extract(prepared_cache, **GRID)
    again = run_extract(prepared_cache, **{**SMALL, "grid_size": 3})  # grid_size alone: pooled features unchanged
    assert again.up_to_date


READ_IN_WORKERS = """
import sys, torch
from torch.utils.data import DataLoader
from pipeline.decoder.data import load_cache
data = load_cache(sys.argv[1], grid=True)
data.grid[torch.tensor([0])]  # the parent opens its handle first: the workers must not use it
rows = [torch.tensor([5, 1, 1, 7]), torch.tensor([3, 0]), torch.tensor([6, 2, 4])]
loader = DataLoader(rows, batch_size=None, num_workers=2, collate_fn=lambda r: data.image_inputs(r))
got = [b for b in loader]
want = [data.image_inputs(r) for r in rows]
assert all(torch.equal(a, b) for a, b in zip(got, want))
import torch.distributed as dist, os
if "RANK" in os.environ:
    if not dist.is_initialized():  # load_cache starts the group under torchrun (shared pooled features)
        dist.init_process_group("gloo")
    mine = data.image_inputs(torch.arange(int(os.environ["RANK"]), 12, 2))
    out = [None, None]
    dist.all_gather_object(out, mine)
    both = torch.empty(12, *mine.shape[1:])
    both[0::2], both[1::2] = out[0], out[1]
    assert torch.equal(both, data.image_inputs(torch.arange(12))), "ranks read other tensors"
print("same")
"""


def test_grid_rows_read_the_same_in_workers_and_torchrun_ranks(grid_cache, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(READ_IN_WORKERS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(grid_cache)], capture_output=True, text=True, env=env,
                         timeout=240)
    assert one.stdout.strip() == "same", one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(grid_cache)], capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode == 0 and two.stdout.count("same") == 2, two.stderr[-2000:]


def test_attention_weights_sum_to_one_and_padding_carries_no_gradient():
    model = tiny_attend().train()
    f = image_inputs(3)
    state = model.init_state(f)
    _, alpha = model.attend(state[0][0], state[2], state[3])
    torch.testing.assert_close(alpha.sum(0), torch.ones(3))  # (R, B) summed over regions
    words = torch.tensor([[3, 4, 5, 3], [4, 5, 0, 0], [5, 0, 0, 0]])
    inputs, targets, lengths, _ = teacher_forcing(words, torch.tensor([4, 2, 1]), START, END)
    model.eval()
    logits = model(f, inputs, lengths)  # (sum(lengths), V)
    assert logits.shape == (int(lengths.sum()), 6)
    # the packed logits are the step-by-step ones, in pack_padded_sequence order
    st = model.init_state(f)
    per_step = []
    for t in range(inputs.shape[1]):
        out, st = model.step(inputs[:, t], st)
        per_step.append(out)
    stepped = torch.stack(per_step, 1)  # (B, T, V)
    packed = torch.nn.utils.rnn.pack_padded_sequence(stepped, lengths, batch_first=True).data
    torch.testing.assert_close(logits, packed, rtol=1e-5, atol=1e-5)
    # padding is never read: another token there changes neither the loss nor any gradient
    noisy = inputs.clone()
    noisy[1, 3:], noisy[2, 2:] = 5, 5
    grads = []
    for x in (inputs, noisy):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(f, x, lengths), packed_targets(targets, lengths))
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_training_forward_recomputes_attention_scores_with_the_same_gradients():
    """The teacher-forced forward recomputes each word's tanh scores in the backward pass (to keep an
    attention step's memory near Show-and-Tell's): its loss and every gradient equal those of the same
    captions stepped word by word, where nothing is recomputed."""
    model = tiny_attend().eval()  # no dropout: both ways see the same network
    f = image_inputs(3)
    words = torch.tensor([[3, 4, 5, 3], [4, 5, 0, 0], [5, 0, 0, 0]])
    inputs, targets, lengths, _ = teacher_forcing(words, torch.tensor([4, 2, 1]), START, END)
    packed = packed_targets(targets, lengths)
    results = []
    for stepped in (False, True):
        model.zero_grad()
        if stepped:
            st, per_step = model.init_state(f), []
            for t in range(inputs.shape[1]):
                out, st = model.step(inputs[:, t], st)
                per_step.append(out)
            logits = torch.nn.utils.rnn.pack_padded_sequence(torch.stack(per_step, 1), lengths, batch_first=True).data
            loss = torch.nn.functional.cross_entropy(logits, packed)
        else:
            loss = model(f, inputs, lengths, packed)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_attend_beam_search_equals_exhaustive_search(alpha):
    V, L = 6, 3
    model, f = tiny_attend(vocab=V, seed=3), image_inputs(5, seed=2)
    n_words = V - 1
    K = sum(n_words ** k for k in range(L)) + n_words ** L
    hyps = beam_search(model, f, beam_size=K, max_length=L, start_id=START, end_id=END, length_penalty=alpha)
    for i, h in enumerate(hyps):
        seqs = all_sequences(model, f[i], L)
        tokens, ended, lp = max(seqs, key=lambda s: s[2] / lp_pen(len(s[0]) + s[1], alpha))
        assert (h.tokens, h.ended) == (tokens, ended)
        assert h.logprob == pytest.approx(lp, abs=1e-5)


def test_attend_trains_scst_evaluates_and_captions_with_maps(grid_cache, tmp_path):
    from conftest import run_scst, run_train

    run_train(grid_cache, out=tmp_path / "xe", metrics_dir=tmp_path / "m", decoder="attend", **TRAIN)
    ckpt = load_checkpoint(tmp_path / "xe" / "best.pt")
    assert ckpt["model_config"]["decoder"] == "attend" and ckpt["model_config"]["grid_size"] == 2
    run_scst(grid_cache, init=tmp_path / "xe" / "best.pt", out=tmp_path / "scst", metrics_dir=tmp_path / "sm",
             epochs=1, batch_size=4, samples=2, max_length=8, device="cpu", val_images=4)
    metrics = run_evaluate(tmp_path / "scst" / "best.pt", grid_cache, tmp_path / "eval.json", split="val",
                           tokenizer="simple", beam_size=2)
    assert metrics.images > 0 and "CIDEr" in metrics.scores
    images = [load_cache(grid_cache).manifest.path_of(i) for i in range(3)]
    results = caption_images(tmp_path / "scst" / "best.pt", images, attention=True, workers=0)
    assert any(r.caption for r in results)
    for r in results:
        assert len(r.attention) == len(r.caption.split())
        assert all(len(w) == 4 and sum(w) == pytest.approx(1, abs=1e-3) for _, w in r.attention)
    write_html(results, tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert page.count('class="att"') == sum(len(r.attention) for r in results) and "<rect" in page


def test_old_showtell_checkpoint_loads_and_refuses_attention_maps(prepared_cache, tmp_path):
    from conftest import run_train

    run_extract(prepared_cache, **SMALL)
    run_train(prepared_cache, out=tmp_path / "xe", metrics_dir=tmp_path / "m", **{**TRAIN, "epochs": 1})
    path = tmp_path / "xe" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("decoder", "attention_size", "grid_size"):  # as written before attention existed
        del ckpt["model_config"][key]
    torch.save(ckpt, tmp_path / "old.pt")
    model, _, _ = restore_decoder(load_checkpoint(tmp_path / "old.pt"))
    assert isinstance(model, CaptionDecoder)
    image = load_cache(prepared_cache).manifest.path_of(0)
    old = caption_images(tmp_path / "old.pt", [image], workers=0)[0]
    assert not old.error and old.logprob < 0 and old.attention is None
    with pytest.raises(PipelineError, match="--attention.*showtell"):
        caption_images(tmp_path / "old.pt", [image], attention=True, workers=0)
    assert json.loads((tmp_path / "m" / "train.json").read_text())
