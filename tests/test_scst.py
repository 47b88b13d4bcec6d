"""SCST pieces: the vectorised CIDEr-D reward against pycocoevalcap, its cached document frequencies,
sampling, the baselines and the REINFORCE loss. Tiny generated captions and a tiny decoder (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from pipeline.core.errors import PipelineError
from pipeline.core.vocab import SPECIALS, Vocabulary
from pipeline.decoder.data import CaptionData
from pipeline.decoder.decode import greedy_decode
from pipeline.decoder.model import CaptionDecoder, ModelConfig, ModelSettings
from pipeline.scst import cider, sample
from pipeline.scst.cider import (
    DF_NAME,
    CiderD,
    DocFreq,
    build_doc_freq,
    ids_to_text,
    load_or_build_df,
    pycoco_cider_d,
    with_end,
)
from pipeline.scst.sample import (
    CompiledStep,
    greedy_baseline,
    greedy_captions,
    leave_one_out_baseline,
    sample_captions,
    sampling_policy,
    scst_loss,
    sequence_logprobs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, START, END, UNK = 0, 1, 2, 3
V = 20  # few words, so captions repeat words and n-grams (clipping and df > 1 get exercised)


def random_words(rng: np.random.Generator, m: int, max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """m label rows (m, max_words) of skewed random words 4..V-1, 0-padded, 1..max_words words each."""
    n = rng.integers(1, max_words + 1, size=m)
    p = 1.0 / np.arange(1, V - 3)
    words = rng.choice(np.arange(4, V), size=(m, max_words), p=p / p.sum())
    words[np.arange(max_words) >= n[:, None]] = PAD
    return words, n


@pytest.fixture(scope="module")
def corpus():
    """30 images with 2-6 references each (words + <end>), as (tokens, lengths, images, texts per image)."""
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(30), rng.integers(2, 7, size=30))  # (R,)
    words, n = random_words(rng, len(images), 12)
    tokens, lengths = with_end(words, n, END)
    texts = [ids_to_text(tokens[images == i], lengths[images == i]) for i in range(30)]
    return tokens, lengths, images, texts


def candidates(corpus, per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """per_image candidates for each corpus image: edited copies of its references, random captions,
    a repeated word, one cut without <end>, one that is only <end>, one empty."""
    tokens, lengths, images, _ = corpus
    rng = np.random.default_rng(seed)
    cand_images = np.repeat(np.arange(30), per_image)  # (C,)
    src = np.array([rng.choice(np.flatnonzero(images == i)) for i in cand_images])
    cand, n = tokens[src].copy(), lengths[src].copy()  # (C, 13) copies of a reference, <end> included
    noise, _ = random_words(rng, len(src), cand.shape[1])
    edit = (rng.random(cand.shape) < 0.3) & (np.arange(cand.shape[1]) < n[:, None] - 1)
    cand[edit] = noise[edit]
    cand[1::7], n[1::7] = with_end(noise[1::7, :12], np.full(len(cand[1::7]), 9), END)  # random captions
    cand[2, :6], n[2] = [5, 5, 5, 5, 5, END], 6  # "a a a a a <end>": clipped counts
    n[3] -= 1  # cut: the <end> is not scored
    cand[4, 0], n[4] = END, 1  # only <end>
    n[5] = 0  # nothing at all
    return cand, n, cand_images


def test_cider_d_equals_pycocoevalcap_with_its_own_document_frequencies(corpus):
    """One candidate per image: pycocoevalcap's public Cider computes df and ref_len from these refs."""
    tokens, lengths, images, texts = corpus
    cand, n, cand_images = candidates(corpus, 1, seed=1)
    ours = CiderD(build_doc_freq(tokens, lengths, images, V), tokens, lengths, images).score(cand, n, cand_images)
    gts = {i: texts[i] for i in range(30)}
    res = {i: [t] for i, t in enumerate(ids_to_text(cand, n))}
    _, theirs = Cider().compute_score(gts, res)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ours.max() > 1.0 and (ours > 0).sum() > 20  # real matches, not a comparison of zeros
    assert ours[5] == 0.0  # the empty candidate


@pytest.mark.parametrize("chunk", [4096, 7])
def test_cider_d_equals_pycocoevalcap_with_corpus_document_frequencies(corpus, chunk, monkeypatch):
    """Several candidates per image (as SCST scores them), df and ref_len of the whole reference corpus;
    with chunk 7 the references are tabulated in several chunks of images, as COCO's are."""
    monkeypatch.setattr(cider, "CHUNK_IMAGES", chunk)
    tokens, lengths, images, texts = corpus
    corpus_df, ref_len = _pycoco_df(dict(enumerate(texts)))

    df = build_doc_freq(tokens, lengths, images, V)
    assert len(df.keys) == len(corpus_df) and df.df.sum() == sum(corpus_df.values())
    assert df.ref_len == ref_len and df.n_images == 30

    cand, n, cand_images = candidates(corpus, 5, seed=2)
    keep = np.isin(cand_images, [29, 3, 4, 17, 8, 9, 10, 11, 0, 21, 22, 14])  # a batch of 12 images x 5 samples
    cand, n, cand_images = cand[keep], n[keep], cand_images[keep]
    ours = CiderD(df, tokens, lengths, images).score(torch.from_numpy(cand), torch.from_numpy(n), cand_images)
    refs = [texts[i] for i in cand_images]
    theirs = pycoco_cider_d(ids_to_text(cand, n), refs, corpus_df, ref_len)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    batch_only = pycoco_cider_d(ids_to_text(cand, n), refs)  # df from the batch's own refs: other numbers
    assert np.abs(batch_only - theirs).max() > 1e-3


def test_scorer_refuses_images_without_references(corpus):
    tokens, lengths, images, _ = corpus
    scorer = CiderD(build_doc_freq(tokens, lengths, images, V), tokens, lengths, images)
    with pytest.raises(ValueError, match="no references"):
        scorer.score(tokens[:1], lengths[:1], [30])
    with pytest.raises(ValueError, match="token ids"):
        scorer.score(np.full((1, 3), V), [3], [0])


def caption_data(seed: int = 0) -> CaptionData:
    """A CaptionData without files: 8 train, 3 val images (one train image invalid), 3-5 captions each."""
    rng = np.random.default_rng(seed)
    split = torch.tensor([0] * 8 + [1] * 3)  # (N,)
    valid = torch.ones(11, dtype=torch.bool)
    valid[6] = False
    caption_image = torch.from_numpy(np.repeat(np.arange(11), rng.integers(3, 6, size=11)))  # (M,)
    words, n = random_words(rng, len(caption_image), 10)
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(4, V)])
    return CaptionData(manifest=None, vocab=vocab, encoder=None, features=torch.zeros(11, 4), valid=valid,
                       labels=torch.from_numpy(words), lengths=torch.from_numpy(n), caption_image=caption_image,
                       image_split=split, fingerprints={})


def test_document_frequencies_round_trip_as_plain_data_and_follow_the_train_labels(tmp_path, monkeypatch):
    data = caption_data()
    df = load_or_build_df(tmp_path, data)
    path = tmp_path / DF_NAME
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: no pickle needed to read it
        assert {"keys", "df", "ref_len", "fingerprint"} <= set(z.files)
        assert all(z[name].dtype != object for name in z.files)
    loaded = DocFreq.load(path)
    np.testing.assert_array_equal(loaded.keys, df.keys)
    np.testing.assert_array_equal(loaded.df, df.df)
    assert (loaded.ref_len, loaded.fingerprint, loaded.vocab_size) == (df.ref_len, df.fingerprint, V)
    assert df.n_images == 7 and df.ref_len == pytest.approx(np.log(7))  # valid train images only

    train = data.caption_rows("train")
    tokens, lengths = with_end(data.labels[train], data.lengths[train], END)
    direct = build_doc_freq(tokens, lengths, data.caption_image[train], V)
    np.testing.assert_array_equal(direct.keys, df.keys)
    np.testing.assert_array_equal(direct.df, df.df)

    def no_rebuild(*args, **kw):
        raise AssertionError("rebuilt although the training labels did not change")

    with monkeypatch.context() as m:
        m.setattr(cider, "build_doc_freq", no_rebuild)
        assert load_or_build_df(tmp_path, data).fingerprint == df.fingerprint
        data.labels[data.caption_rows("val")[0], 0] = 5  # val captions do not enter the df
        assert load_or_build_df(tmp_path, data).fingerprint == df.fingerprint

    first = int(train[0])
    data.labels[first, : int(data.lengths[first])] = V - 1  # a train caption changes: a new n-gram appears
    rebuilt = load_or_build_df(tmp_path, data)
    assert rebuilt.fingerprint != df.fingerprint
    assert DocFreq.load(path).fingerprint == rebuilt.fingerprint
    key = (V - 1 + 1) * (V + 1) + V - 1 + 1  # the bigram (V-1, V-1)
    assert df.counts([key])[0] == 0 and rebuilt.counts([key])[0] == 1

    path.write_bytes(b"not a zip file")  # a broken file is rebuilt, not trusted
    np.testing.assert_array_equal(load_or_build_df(tmp_path, data).df, rebuilt.df)
    assert DocFreq.load(path).fingerprint == rebuilt.fingerprint



def test_scorer_from_cache_data_uses_valid_training_captions_with_end(tmp_path):
    data = caption_data()
    df = load_or_build_df(tmp_path, data)
    scorer = CiderD.from_data(df, data)
    train = data.caption_rows("train")
    tokens, lengths = with_end(data.labels[train], data.lengths[train], END)
    images = data.caption_image[train].numpy()
    texts = {i: ids_to_text(tokens[images == i], lengths[images == i]) for i in np.unique(images)}
    ours = scorer.score(tokens, lengths, images)  # every training caption against its own image's refs
    theirs = pycoco_cider_d(ids_to_text(tokens, lengths), [texts[i] for i in images], *_pycoco_df(texts))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert (ours > 0).all()
    with pytest.raises(ValueError, match="no references"):
        scorer.score(tokens[:1], lengths[:1], [6])  # the invalid training image is not a reference


def _pycoco_df(texts: dict) -> tuple[dict, float]:
    """pycocoevalcap's own document frequencies and ref_len over {image: reference strings}."""
    full = CiderScorer(n=4, sigma=6.0)
    for refs in texts.values():
        full += (None, refs)
    full.compute_doc_freq()
    return dict(full.document_frequency), float(np.log(float(len(texts))))

# ---- sampling, baselines, loss ----


def tiny_decoder(seed: int = 0, banned_bias: float = 0.0, end_bias: float = 0.0) -> CaptionDecoder:
    """A random 12-word CaptionDecoder; banned_bias pushes <pad>/<start>/<unk> up, end_bias moves <end>."""
    torch.manual_seed(seed)
    model = CaptionDecoder(ModelConfig.of(ModelSettings(embed_size=8, hidden_size=16), 6, 12))
    with torch.no_grad():
        model.out.weight.mul_(4.0)  # peakier distributions than the default init, so samples differ by image
        model.out.bias[[PAD, START, UNK]] += banned_bias
        model.out.bias[END] += end_bias
    return model


def test_sampling_respects_banned_ids_and_makes_well_formed_rows():
    model = tiny_decoder(banned_bias=50.0)  # unmasked, the banned ids would win nearly every draw
    features = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    k, max_length = 4, 6
    s = sample_captions(model, features, k, max_length, START, END, banned_ids=(PAD, START, UNK),
                        generator=torch.Generator().manual_seed(1))
    N, T = s.tokens.shape
    assert N == 64 and T <= max_length and s.logprobs.shape == s.mask.shape == (N, T)
    assert not torch.isin(s.tokens, torch.tensor([PAD, START, UNK])).any()
    assert (s.mask[:, 1:] <= s.mask[:, :-1]).all()  # real positions form a prefix
    assert torch.equal(s.lengths, s.mask.sum(1))
    assert (s.tokens[~s.mask] == END).all() and (s.logprobs[~s.mask] == 0).all()
    assert torch.isfinite(s.logprobs[s.mask]).all() and (s.logprobs[s.mask] < 0).all()
    ends = ((s.tokens == END) & s.mask).sum(1)  # (N,) <end> among the real tokens
    ended = ends == 1
    assert (ends <= 1).all() and ended.any() and (~ended).any()  # both kinds occur at this seed
    assert (s.tokens[ended, s.lengths[ended] - 1] == END).all()  # <end> is the last real token
    assert (s.lengths[~ended] == max_length).all()  # no <end>: cut at max_length words
    assert s.logprobs.requires_grad

    # image-major rows: re-scoring each row with its image's features gives the same log-probs
    again = sequence_logprobs(model, features.repeat_interleave(k, 0), s.tokens, s.mask, START, (PAD, START, UNK))
    torch.testing.assert_close(again, s.logprobs, rtol=0, atol=1e-5)
    same = sample_captions(model, features, k, max_length, START, END, (PAD, START, UNK),
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(same.tokens, s.tokens)  # the generator makes sampling reproducible


def test_leave_one_out_and_greedy_baselines():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 60.0])  # 2 images x 3 samples
    # image 0: (2+3)/2, (1+3)/2, (1+2)/2; image 1: (20+60)/2, (10+60)/2, (10+20)/2
    expected = torch.tensor([2.5, 2.0, 1.5, 40.0, 35.0, 15.0])
    torch.testing.assert_close(leave_one_out_baseline(rewards, 3), expected)
    with pytest.raises(ValueError):
        leave_one_out_baseline(rewards, 1)
    torch.testing.assert_close(greedy_baseline(torch.tensor([0.5, 0.7]), 3),
                               torch.tensor([0.5, 0.5, 0.5, 0.7, 0.7, 0.7]))


def test_greedy_captions_match_greedy_decode_in_the_sample_format():
    model = tiny_decoder(end_bias=1.0)
    model.train()
    features = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    tokens, lengths = greedy_captions(model, features, 5, START, END, (PAD, START, UNK))
    assert model.training  # the mode is restored
    hyps = greedy_decode(model.eval(), features, 5, START, END, (PAD, START, UNK))
    assert any(h.ended for h in hyps) and tokens.shape == (8, 5)
    for h, row, n in zip(hyps, tokens.tolist(), lengths.tolist()):
        assert row[:n] == h.tokens + [END] * h.ended and all(t == END for t in row[n:])


def test_scst_loss_is_advantage_weighted_and_normalised_by_tokens():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])  # 3 real tokens; -9 is past the end
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    baseline = torch.tensor([0.25, 0.25])
    loss = scst_loss(logprobs, mask, rewards, baseline)
    # -(0.75 * (-1 - 2) + (-0.25) * (-3)) / 3 = -(-2.25 + 0.75) / 3
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, -0.25], [1 / 12, 0.0]]))
    assert rewards.grad is None  # the advantage is a constant


def test_one_scst_step_raises_the_log_probability_of_the_best_sample():
    model = tiny_decoder(end_bias=-1.0)
    features = torch.randn(1, 6, generator=torch.Generator().manual_seed(4))
    banned = (PAD, START, UNK)
    s = sample_captions(model, features, 4, 6, START, END, banned, generator=torch.Generator().manual_seed(5))
    assert len({tuple(t[m].tolist()) for t, m in zip(s.tokens, s.mask)}) == 4  # four different captions
    rewards = torch.tensor([0.2, 1.5, 0.1, 0.3])  # sample 1 beats its siblings

    def score() -> torch.Tensor:
        with torch.no_grad():
            return sequence_logprobs(model, features.expand(4, -1), s.tokens, s.mask, START, banned).sum(1)

    before = score()
    torch.testing.assert_close(before, s.logprobs.detach().sum(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scst_loss(s.logprobs, s.mask, rewards, leave_one_out_baseline(rewards, 4)).backward()
    opt.step()
    after = score()
    assert after[1] > before[1]  # the winner became more likely


def test_compiled_step_samples_what_the_eager_step_does_and_trains_the_same():
    """scst.compile: the compiled per-word step draws the same captions from the same numbers, with the same
    log-probs and gradients up to float rounding; the last, smaller batch reuses it (dynamic shapes)."""
    eager, banned = tiny_decoder(end_bias=-1.0), (PAD, START, UNK)
    model = tiny_decoder(end_bias=-1.0)
    notes = []
    policy, why = sampling_policy(model, "showtell", "true", torch.device("cpu"), 1, notes.append)
    assert isinstance(policy, CompiledStep) and why == "compile: true"
    for images in (8, 3):
        features = torch.randn(images, 6, generator=torch.Generator().manual_seed(images))
        u = torch.rand(images * 4, 6, generator=torch.Generator().manual_seed(7))
        want = sample_captions(eager, features, 4, 6, START, END, banned, uniforms=u)
        got = sample_captions(policy, features, 4, 6, START, END, banned, uniforms=u)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
        rewards = torch.rand(images * 4, generator=torch.Generator().manual_seed(8))
        for m, s in ((eager, want), (model, got)):
            m.zero_grad()
            scst_loss(s.logprobs, s.mask, rewards, leave_one_out_baseline(rewards, 4)).backward()
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5)
    assert policy.compile_seconds is not None and "compiled the decoder's step" in notes[0]
    assert sampling_policy(model, "attend", "false", torch.device("cpu"), 10**9, notes.append)[0] is model


def test_scst_compile_auto_compiles_only_runs_that_repay_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    model = tiny_decoder()
    least = sample.MIN_SAMPLES[("attend", "cpu")]  # bench scst measured a gain for the attention decoder
    assert sampling_policy(model, "attend", "auto", cpu, least - 1, print)[0] is model
    policy, why = sampling_policy(model, "attend", "auto", cpu, least, print)
    assert isinstance(policy, CompiledStep) and policy.fallback and str(least) in why
    assert sampling_policy(model, "showtell", "auto", cpu, 10**9, print)[0] is model  # no gain measured
    assert sampling_policy(model, "attend", "auto", cuda, 10**9, print)[0] is model  # never measured on a GPU


def test_a_step_that_cannot_compile_runs_eagerly_or_says_what_to_do(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model, notes = tiny_decoder(), []
    features, u = torch.randn(2, 6), torch.rand(4, 5)
    want = sample_captions(model, features, 2, 5, START, END, uniforms=u)
    soft = CompiledStep(model, fallback=True, log=notes.append)
    assert torch.equal(sample_captions(soft, features, 2, 5, START, END, uniforms=u).tokens, want.tokens)
    assert soft.compiled is None and "eagerly" in notes[0] and len(notes) == 1
    with pytest.raises(PipelineError, match="compile false") as e:
        sample_captions(CompiledStep(model, fallback=False, log=notes.append), features, 2, 5, START, END)
    assert "\n" not in str(e.value)
