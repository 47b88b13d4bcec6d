"""The CIDEr-D reward's speed against pycocoevalcap's Cider on the same captions (an SCST batch's scoring).

    python -m pipeline.bench.cider_speed

Times CiderD.score on 128 images x 5 sampled captions (5 references each, a 10k-word vocabulary, document
frequencies from a 20k-image synthetic corpus) and pycocoevalcap on the same input, and prints both with
their largest difference.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.scst.cider import CiderD, build_doc_freq, count_ngrams, ids_to_text, pycoco_cider_d, with_end


def synthetic_batch(n_images: int, k: int, refs: int, vocab_size: int, length: tuple[int, int],
                    corpus_images: int, end_id: int = 2, seed: int = 0):
    """Random captions shaped like COCO's for timing: Zipf-distributed words, K candidates per image
    that are references with some words changed (so many n-grams match), plus a reference corpus.

    Returns (ref_tokens (R, T), ref_lengths, ref_images, cand_tokens (n_images*k, T), cand_lengths,
    cand_images); the candidates belong to n_images random images of the corpus, as in an SCST batch.
    """
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size - 3)  # words are ids 4..V-1, the most frequent first
    p /= p.sum()

    def captions(m):
        n = rng.integers(length[0], length[1] + 1, size=m)  # (m,) words
        words = np.zeros((m, length[1]), dtype=np.int64)
        words[:] = rng.choice(np.arange(4, vocab_size), size=words.shape, p=p)
        words[np.arange(length[1]) >= n[:, None]] = 0
        return with_end(words, n, end_id)

    ref_images = np.repeat(np.arange(corpus_images), refs)  # (R,)
    ref_tokens, ref_lengths = captions(len(ref_images))
    cand_images = np.repeat(rng.choice(corpus_images, size=n_images, replace=False), k)  # (C,)
    src = cand_images * refs + rng.integers(0, refs, size=len(cand_images))  # a reference of the same image
    cand_tokens, cand_lengths = ref_tokens[src].copy(), ref_lengths[src].copy()
    noise, _ = captions(len(src))
    change = (rng.random(cand_tokens.shape) < 0.4) & (np.arange(cand_tokens.shape[1]) < cand_lengths[:, None] - 1)
    cand_tokens[change] = noise[change]  # change ~40% of the words, keep <end>
    return ref_tokens, ref_lengths, ref_images, cand_tokens, cand_lengths, cand_images


def benchmark(n_images: int = 128, k: int = 5, refs: int = 5, vocab_size: int = 10000, length=(8, 16),
              corpus_images: int = 20000, repeats: int = 20, seed: int = 0) -> dict:
    """Time CiderD.score on n_images*k candidates (and pycocoevalcap on the same input); print and return.

    The df come from a synthetic corpus of corpus_images images (COCO train has ~113k).
    """
    ref_t, ref_n, ref_i, cand_t, cand_n, cand_i = synthetic_batch(n_images, k, refs, vocab_size, length,
                                                                  corpus_images, seed=seed)
    t0 = time.perf_counter()
    df = build_doc_freq(ref_t, ref_n, ref_i, vocab_size)
    t1 = time.perf_counter()
    scorer = CiderD(df, ref_t, ref_n, ref_i)
    t2 = time.perf_counter()
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        ours = scorer.score(cand_t, cand_n, cand_i)
        times.append(time.perf_counter() - s)

    # pycocoevalcap on the same candidates, with the corpus df restricted to the n-grams it will look up
    cand_text = ids_to_text(cand_t, cand_n)
    batch_refs = np.isin(ref_i, cand_i)  # (R,) the references of the batch's images
    ref_text = {i: ids_to_text(ref_t[ref_i == i], ref_n[ref_i == i]) for i in np.unique(cand_i).tolist()}
    refs_per_cand = [ref_text[i] for i in cand_i.tolist()]
    needed = np.unique(np.concatenate([count_ngrams(cand_t, cand_n, vocab_size)[1],
                                       count_ngrams(ref_t[batch_refs], ref_n[batch_refs], vocab_size)[1]]))
    df_needed = dict(zip(map(_key_to_tuple(vocab_size), needed.tolist()), df.counts(needed).tolist()))
    s = time.perf_counter()
    theirs = pycoco_cider_d(cand_text, refs_per_cand, df_needed, df.ref_len)
    t_pycoco = time.perf_counter() - s

    out = dict(candidates=len(cand_i), vocab_size=vocab_size, corpus_images=corpus_images,
               df_build_s=t1 - t0, scorer_build_s=t2 - t1, score_ms_median=1e3 * float(np.median(times)),
               score_ms_min=1e3 * min(times), pycoco_ms=1e3 * t_pycoco,
               max_abs_diff=float(np.abs(ours - theirs).max()), mean_cider=float(ours.mean()))
    print(f"CIDEr-D reward, {out['candidates']} candidates ({n_images} images x {k}, {refs} refs, V={vocab_size}, "
          f"{length[0]}-{length[1]} words): {out['score_ms_median']:.1f} ms median ({out['score_ms_min']:.1f} min) "
          f"vs pycocoevalcap {out['pycoco_ms']:.0f} ms; max |diff| {out['max_abs_diff']:.1e}; "
          f"df over {corpus_images} images {out['df_build_s']:.2f} s, scorer build {out['scorer_build_s']:.2f} s")
    return out


def _key_to_tuple(vocab_size: int):
    """key -> the n-gram as a tuple of decimal id strings (pycocoevalcap's n-gram form)."""
    base = vocab_size + 1

    def decode(key: int) -> tuple[str, ...]:
        ids = []
        while key:
            key, d = divmod(key, base)
            ids.append(str(d - 1))
        return tuple(reversed(ids))
    return decode


if __name__ == "__main__":
    benchmark()
