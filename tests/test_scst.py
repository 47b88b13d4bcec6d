"""SCST pieces: the vectorised CIDEr-D reward against pycocoevalcap, its cached document frequencies,
sampling, the baselines and the REINFORCE loss. Tiny generated captions and a tiny decoder (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from pipeline.core.vocab import SPECIALS, Vocabulary
from pipeline.decoder.data import CaptionData
from pipeline.scst import cider
from pipeline.scst.cider import (DF_NAME, CiderD, DocFreq, build_doc_freq, ids_to_text, load_or_build_df,
                                 pycoco_cider_d, with_end)

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


def test_cider_d_equals_pycocoevalcap_with_corpus_document_frequencies(corpus):
    """Several candidates per image (as SCST scores them), df and ref_len of the whole reference corpus."""
    tokens, lengths, images, texts = corpus
    full = CiderScorer(n=4, sigma=6.0)
    for refs in texts:
        full += (None, refs)
    full.compute_doc_freq()
    corpus_df, ref_len = dict(full.document_frequency), float(np.log(float(len(texts))))

    df = build_doc_freq(tokens, lengths, images, V)
    assert len(df.keys) == len(corpus_df) and df.df.sum() == sum(corpus_df.values())
    assert df.ref_len == ref_len and df.n_images == 30

    cand, n, cand_images = candidates(corpus, 5, seed=2)
    keep = cand_images < 12  # a batch of 12 images x 5 samples
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
