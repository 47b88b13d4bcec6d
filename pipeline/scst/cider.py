"""CIDEr-D over word-id sequences, vectorised with numpy: the reward of self-critical training.

SCST scores B*K sampled captions every step, so the reward must cost little next to the LSTM's
forward/backward. pycocoevalcap's scorer works on strings and Python dicts, one caption at a time;
here every n-gram is an int64 key and a whole batch is counted and matched with sorts and
searchsorted, with no Python loop over captions.

The numbers are pycocoevalcap's "CIDEr" (which is CIDEr-D) exactly, up to float summation order:
- n-grams of orders 1..4; tf-idf vectors tf * (ref_len - log(max(1, df))), unseen n-grams get df 1;
- per order, the clipped dot product sum(min(v_cand, v_ref) * v_ref) over the cosine norms (only
  divided when both norms are non-zero), times the gaussian length penalty exp(-d^2 / (2 * 6^2));
- mean over the orders, mean over the image's references, times 10.
pycocoevalcap's "length" is the number of bigrams (it counts when the order index is 1), i.e.
max(tokens - 1, 0); we copy that so the two agree token for token.

As in self-critical.pytorch, references carry the <end> id as their last token (so ending the
caption at the right place is rewarded), the document frequencies come from the training split's
references, not from the batch, and ref_len is log(number of training images). They are computed
once and cached as plain data in `cache/cider_df.npz`, with a hash of the training label rows so a
file left from other labels is rebuilt.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.fileio import atomic_path

N = 4  # n-gram orders 1..N
SIGMA = 6.0  # CIDEr-D's length penalty width
DF_NAME = "cider_df.npz"
DF_FORMAT = 1  # bump when the file's meaning changes, so old files are rebuilt
EMPTY = np.iinfo(np.int64).max  # n-gram matrices hold it where there is no n-gram: sorts after every key
CHUNK_IMAGES = 4096  # images whose references are sorted together when building df and scorer tables


def _np(x) -> np.ndarray:
    """A torch tensor (any device) or array-like -> numpy array, without copying when possible."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_vocab_size(vocab_size: int, n: int = N) -> int:
    """The key base (vocab_size + 1); refuses vocabularies whose n-gram keys would overflow int64."""
    base = int(vocab_size) + 1
    if vocab_size < 1 or base ** n >= 2 ** 63 - 1:
        raise ValueError(f"vocab_size {vocab_size} is out of range: {n}-gram keys need (V+1)^{n} < 2^63 - 1")
    return base


def ngram_matrix(tokens, lengths, vocab_size: int, n: int = N) -> np.ndarray:
    """The keys of all n-grams of orders 1..n of each row -> (R, W) int64, EMPTY where there is none.

    tokens (R, T) ids in [0, vocab_size); only the first lengths[r] tokens of row r count. An
    n-gram w1..wk is the base-(V+1) number with digits w1+1 .. wk+1: no digit is 0, so keys are
    exact (no hashing collisions) and n-grams of different orders never share a key.
    W = sum over k of (T - k + 1).
    """
    tokens = _np(tokens).astype(np.int64, copy=False)  # (R, T)
    lengths = _np(lengths).astype(np.int64, copy=False)  # (R,)
    base = check_vocab_size(vocab_size, n)
    R, T = tokens.shape
    if len(lengths) != R or (R and (lengths.min() < 0 or lengths.max() > T)):
        raise ValueError(f"lengths must be one per row, each in 0..{T}")
    used = tokens[np.arange(T) < lengths[:, None]]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {used.min()}..{used.max()}")
    digits = tokens + 1  # (R, T)
    blocks = [np.full((R, 0), EMPTY, dtype=np.int64)]
    key = np.zeros((R, T), dtype=np.int64)
    for k in range(1, min(n, T) + 1):
        m = T - k + 1
        key = key[:, :m] * base + digits[:, k - 1:k - 1 + m]  # (R, m): key[:, i] is tokens[i:i+k]
        blocks.append(np.where(np.arange(m) + k <= lengths[:, None], key, EMPTY))  # the k-gram ends in the caption
    return np.concatenate(blocks, axis=1)  # (R, W)


def ngram_order(keys: np.ndarray, vocab_size: int, n: int = N) -> np.ndarray:
    """keys (Q,) -> (Q,) int64 order index k-1 of each n-gram (a k-gram's key has k base-(V+1) digits)."""
    base = check_vocab_size(vocab_size, n)
    return np.searchsorted(np.array([base ** k for k in range(1, n)], dtype=np.int64), keys, side="right")


def _unique_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of an int array and how often each occurs.

    np.unique without return_inverse takes a hash-table path in numpy 2.x that is ~10x slower than
    sorting for millions of int64 keys.
    """
    s = np.sort(a)  # (E,)
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(first)
    return s[starts], np.diff(np.append(starts, len(s)))


def _runs(sorted_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted along axis 1 (EMPTY last) -> the distinct keys of each row.

    Returns (row, col) of each distinct key's first occurrence (row-major, so sorted by row then
    key), `valid` (R, W) where a key is, and `run` the index of each valid entry's distinct key.
    Sorting each short row is ~10x faster than one global sort of all the keys.
    """
    valid = sorted_rows != EMPTY  # (R, W)
    new = valid.copy()
    new[:, 1:] &= sorted_rows[:, 1:] != sorted_rows[:, :-1]
    row, col = np.nonzero(new)
    run = np.cumsum(new.ravel())[valid.ravel()] - 1  # (E,)
    return row, col, valid, run


def count_ngrams(tokens, lengths, vocab_size: int, n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (row, n-gram) pairs with their term frequency -> (row, key, tf), each (P,), sorted by row then key."""
    keys = np.sort(ngram_matrix(tokens, lengths, vocab_size, n), axis=1)  # (R, W)
    row, col, _, run = _runs(keys)
    return row, keys[row, col], np.bincount(run, minlength=len(row))


def with_end(labels, lengths, end_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Label rows (M, L) of words padded with 0 -> (M, L+1) words + <end>, lengths + 1.

    The reward counts <end> as a token (self-critical.pytorch does), so references carry it too.
    """
    labels, lengths = _np(labels).astype(np.int64), _np(lengths).astype(np.int64)
    out = np.zeros((labels.shape[0], labels.shape[1] + 1), dtype=np.int64)  # (M, L+1)
    out[:, :-1] = labels
    out[np.arange(len(out)), lengths] = end_id
    return out, lengths + 1


@dataclass(frozen=True)
class DocFreq:
    """Document frequencies of the reference n-grams: in how many images' references each occurs."""

    keys: np.ndarray  # (G,) int64 sorted n-gram keys (see ngram_matrix)
    df: np.ndarray  # (G,) int64 number of images whose references contain the n-gram
    ref_len: float  # log(number of images): CIDEr-D's log corpus size
    n_images: int
    vocab_size: int
    fingerprint: str = ""  # hash of the label rows it was built from ("" when built from arrays)

    def counts(self, keys: np.ndarray) -> np.ndarray:
        """keys (Q,) -> (Q,) int64 document frequency, 0 for n-grams no reference contains."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(self.keys):
            return np.zeros(len(keys), dtype=np.int64)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)  # (Q,)
        return np.where(self.keys[pos] == keys, self.df[pos], 0)

    def idf(self, keys: np.ndarray) -> np.ndarray:
        """keys (Q,) -> (Q,) float64 ref_len - log(max(1, df)); unseen n-grams count as df 1."""
        return self.ref_len - np.log(np.maximum(1.0, self.counts(keys).astype(np.float64)))

    def save(self, path: str | Path) -> None:
        """Write an uncompressed .npz of plain arrays (no pickle), atomically."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, format=np.int64(DF_FORMAT), keys=self.keys, df=self.df, ref_len=np.float64(self.ref_len),
                     n_images=np.int64(self.n_images), vocab_size=np.int64(self.vocab_size), n=np.int64(N),
                     fingerprint=np.str_(self.fingerprint))

    @classmethod
    def load(cls, path: str | Path) -> DocFreq:
        """Read a file written by save; ValueError if it is of another format."""
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != DF_FORMAT or int(z["n"]) != N:
                raise ValueError(f"{path} holds document frequencies of another format")
            return cls(keys=z["keys"].astype(np.int64), df=z["df"].astype(np.int64), ref_len=float(z["ref_len"]),
                       n_images=int(z["n_images"]), vocab_size=int(z["vocab_size"]), fingerprint=str(z["fingerprint"]))


@dataclass
class _References:
    """Reference captions grouped by image: ref r is slot slot[r] of image images[r]."""

    tokens: np.ndarray  # (R, T)
    lengths: np.ndarray  # (R,)
    images: np.ndarray  # (R,) image index of each reference
    order: np.ndarray  # (R,) the references sorted by image (stable)
    image_ids: np.ndarray  # (I,) the distinct images, ascending
    n_refs: np.ndarray  # (I,) references per image
    slot: np.ndarray  # (R,) rank of each reference within its image

    @classmethod
    def group(cls, tokens, lengths, images) -> _References:
        tokens, lengths = _np(tokens).astype(np.int64, copy=False), _np(lengths).astype(np.int64, copy=False)
        images = _np(images).astype(np.int64, copy=False)
        if len(images) and images.min() < 0:
            raise ValueError("image indices must be >= 0")
        order = np.argsort(images, kind="stable")
        image_ids, n_refs = _unique_counts(images)
        slot = np.empty(len(images), dtype=np.int64)
        slot[order] = np.arange(len(order)) - np.repeat(np.cumsum(n_refs) - n_refs, n_refs)
        return cls(tokens, lengths, images, order, image_ids, n_refs, slot)

    @property
    def max_refs(self) -> int:
        return max(int(self.n_refs.max(initial=0)), 1)

    def table(self, vocab_size: int):
        """Yield, per chunk of images, the distinct (image, n-gram) entries of their references:
        (image (Q,), key (Q,), tf (Q, S) the n-gram's count in each reference slot), sorted by image then key.

        Chunks bound the memory (a chunk's n-gram matrix is chunk * S * W int64s); within a chunk
        each image's references are sorted as one row.
        """
        S, first, chunk = self.max_refs, np.cumsum(self.n_refs) - self.n_refs, CHUNK_IMAGES  # first: in `order`
        tf_type = np.uint8 if self.tokens.shape[1] < 256 else np.uint16
        for c in range(0, len(self.image_ids), chunk):
            n_img = len(self.image_ids[c:c + chunk])
            rows = self.order[first[c]:first[c] + self.n_refs[c:c + chunk].sum()]  # the chunk's references
            keys = ngram_matrix(self.tokens[rows], self.lengths[rows], vocab_size)  # (r, W)
            W = keys.shape[1]
            grid = np.full((n_img, S, W), EMPTY, dtype=np.int64)
            grid[np.repeat(np.arange(n_img), self.n_refs[c:c + chunk]), self.slot[rows]] = keys
            grid = grid.reshape(n_img, S * W)  # one row per image: all its references' n-grams
            by_key = np.argsort(grid, axis=1)
            grid = np.take_along_axis(grid, by_key, axis=1)
            local, col, valid, run = _runs(grid)  # (Q,), (Q,), (n_img, S*W), (E,)
            slot = (by_key // W)[valid]  # (E,) the reference slot of each occurrence
            tf = np.bincount(run * S + slot, minlength=len(local) * S).reshape(len(local), S)
            yield self.image_ids[c:c + chunk][local], grid[local, col], tf.astype(tf_type)


def build_doc_freq(tokens, lengths, images, vocab_size: int, fingerprint: str = "") -> DocFreq:
    """Reference rows (R, T) with lengths (R,) and their image (R,) -> DocFreq over those images.

    An image counts once per n-gram however many of its references contain it (the df of
    pycocoevalcap's compute_doc_freq).
    """
    refs = _References.group(tokens, lengths, images)
    keys = [key for _, key, _ in refs.table(vocab_size)]  # distinct per image
    keys, df = _unique_counts(np.concatenate(keys) if keys else np.zeros(0, np.int64))
    n_images = len(refs.image_ids)
    return DocFreq(keys=keys, df=df.astype(np.int64), ref_len=float(np.log(float(n_images))), n_images=n_images,
                   vocab_size=int(vocab_size), fingerprint=fingerprint)


def _split_references(data, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The captions of `split`'s valid images as (tokens (R, L+1) with <end>, lengths (R,), image (R,))."""
    rows = data.caption_rows(split)
    tokens, lengths = with_end(data.labels[rows], data.lengths[rows], data.vocab.end_id)
    return tokens, lengths, _np(data.caption_image[rows]).astype(np.int64)


def labels_fingerprint(data, split: str = "train") -> str:
    """sha256 of the label rows (words, lengths, images) that the document frequencies are built from.

    Hashing the rows themselves, not the vocab/manifest fingerprints, also catches a re-prepared
    cache with another max_length and images newly marked invalid by extract.
    """
    rows = data.caption_rows(split)
    h = hashlib.sha256(f"cider-df v{DF_FORMAT} vocab={len(data.vocab)} end={data.vocab.end_id}".encode())
    for arr in (data.labels[rows], data.lengths[rows], data.caption_image[rows]):
        h.update(np.ascontiguousarray(_np(arr), dtype="<i8").tobytes())
    return h.hexdigest()


def load_or_build_df(cache_dir: str | Path, data) -> DocFreq:
    """Document frequencies of the training references, from `cache_dir/cider_df.npz` when it matches.

    data: a CaptionData (pipeline.decoder.data). The file is rebuilt when it is missing, unreadable,
    or was built from other training label rows.
    """
    path = Path(cache_dir) / DF_NAME
    fingerprint = labels_fingerprint(data)
    if path.exists():
        try:
            df = DocFreq.load(path)
            if df.fingerprint == fingerprint and df.vocab_size == len(data.vocab):
                return df
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a broken or foreign file is replaced below
    tokens, lengths, images = _split_references(data, "train")
    df = build_doc_freq(tokens, lengths, images, len(data.vocab), fingerprint)
    try:
        df.save(path)
    except OSError as e:  # a read-only or full cache: the file only saves rebuilding it next time
        print(f"note: could not write {path} ({e.strerror or e}); the document frequencies are kept in memory "
              f"for this run (rebuilt at each start until the cache is writable)", file=sys.stderr)
    return df


def _ranges(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Concatenated aranges start[i]..stop[i]-1, vectorised."""
    n = stop - start  # (I,)
    return np.arange(n.sum()) + np.repeat(start - (np.cumsum(n) - n), n)


class CiderD:
    """CIDEr-D of candidate id sequences against fixed per-image references, a batch at a time.

    The references' n-grams, tf-idf norms and lengths are computed once here. score() counts the
    candidates' n-grams, gathers the entries of the batch's images only, and matches the two with
    searchsorted on small sorted arrays.

    Storage: one entry per distinct (image, n-gram), its int64 key and its count in each reference
    slot: (8 + max refs per image) bytes an entry, about 0.2 GB for COCO's training split.
    """

    def __init__(self, doc_freq: DocFreq, ref_tokens, ref_lengths, ref_images, sigma: float = SIGMA):
        """ref_tokens (R, T) id sequences (with <end> if it is to count), ref_lengths (R,), and
        ref_images (R,) a non-negative image index per reference (e.g. the manifest row); score()'s
        `images` use the same indices."""
        self.df, self.sigma, self.vocab_size = doc_freq, float(sigma), doc_freq.vocab_size
        refs = _References.group(ref_tokens, ref_lengths, ref_images)
        n_img, S = int(refs.image_ids.max(initial=-1)) + 1, refs.max_refs
        self.n_refs = np.zeros(n_img, dtype=np.int64)  # (N,) references per image index
        self.n_refs[refs.image_ids] = refs.n_refs
        self.len_ref = np.zeros((n_img, S), dtype=np.int64)  # (N, S) bigram count, as pycocoevalcap
        self.len_ref[refs.images, refs.slot] = np.maximum(refs.lengths - 1, 0)
        norm2 = np.zeros(n_img * S * N)  # (N*S*n,) squared tf-idf norm of each reference, per order
        keys, tfs, entries = [], [], np.zeros(n_img + 1, dtype=np.int64)
        for img, key, tf in refs.table(self.vocab_size):
            uniq, u = np.unique(key, return_inverse=True)  # sorted look-ups into the df are fast, random ones not
            vec = tf * doc_freq.idf(uniq)[u][:, None]  # (Q, S) tf-idf in each reference slot
            cell = ((img * S)[:, None] + np.arange(S)) * N + ngram_order(key, self.vocab_size)[:, None]  # (Q, S)
            norm2 += np.bincount(cell.ravel(), weights=(vec ** 2).ravel(), minlength=len(norm2))
            entries += np.bincount(img + 1, minlength=n_img + 1)
            keys.append(key)
            tfs.append(tf)
        self.norm_ref = np.sqrt(norm2).reshape(n_img, S, N)  # (N, S, n)
        self.ptr = np.cumsum(entries)  # (N+1,) image i's entries are ptr[i]:ptr[i+1]
        self.pair_key = np.concatenate(keys) if keys else np.zeros(0, np.int64)  # (Q,) sorted within each image
        self.pair_tf = np.concatenate(tfs) if tfs else np.zeros((0, S), np.uint8)  # (Q, S)

    @classmethod
    def from_data(cls, doc_freq: DocFreq, data, split: str = "train", sigma: float = SIGMA) -> CiderD:
        """References = the label rows (+ <end>) of `split`'s valid images, indexed by manifest row."""
        tokens, lengths, images = _split_references(data, split)
        return cls(doc_freq, tokens, lengths, images, sigma)

    def _batch_references(self, image_ids: np.ndarray, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference entries of images image_ids (B',) whose n-gram is in uniq (U,) sorted ->
        (code (H,) = local image * U + index in uniq, sorted; tf (H, S))."""
        idx = _ranges(self.ptr[image_ids], self.ptr[image_ids + 1])  # (E,) entries of these images
        local = np.repeat(np.arange(len(image_ids)), self.ptr[image_ids + 1] - self.ptr[image_ids])  # (E,)
        key = self.pair_key[idx]
        pos = np.searchsorted(uniq, key).clip(max=max(len(uniq) - 1, 0))  # (E,)
        used = uniq[pos] == key if len(uniq) else np.zeros(len(key), bool)  # n-grams some candidate has
        return local[used] * len(uniq) + pos[used], self.pair_tf[idx[used]]

    def score(self, tokens, lengths, images) -> np.ndarray:
        """CIDEr-D of each candidate -> (C,) float64.

        tokens (C, T) ids (numpy or torch); only the first lengths[c] count, so pass the <end> inside
        the length when the caption emitted it. images (C,) the image index of each candidate.
        """
        images = _np(images).astype(np.int64)  # (C,)
        lengths = _np(lengths).astype(np.int64)  # (C,)
        C, S = len(images), self.pair_tf.shape[1]
        if C and (images.min() < 0 or images.max() >= len(self.n_refs) or (self.n_refs[images] == 0).any()):
            raise ValueError("some candidates' images have no references in this scorer")
        row, key, tf = count_ngrams(tokens, lengths, self.vocab_size)  # (P,) distinct per candidate
        uniq, u = np.unique(key, return_inverse=True)  # (U,), (P,)
        idf = self.df.idf(uniq)  # (U,)
        vec = tf * idf[u]  # (P,) candidate tf-idf
        cell = row * N + ngram_order(uniq, self.vocab_size)[u]  # (P,) index into (C, n)
        norm = np.sqrt(np.bincount(cell, weights=vec ** 2, minlength=C * N)).reshape(C, N)  # (C, n)

        # match each candidate n-gram with the same n-gram in its image's references
        image_ids, local = np.unique(images, return_inverse=True)  # (B',), (C,)
        ref_code, ref_tf = self._batch_references(image_ids, uniq)  # (H,), (H, S)
        code = local[row] * len(uniq) + u  # (P,)
        j = np.searchsorted(ref_code, code).clip(max=max(len(ref_code) - 1, 0))
        hit = ref_code[j] == code if len(ref_code) else np.zeros(len(code), bool)
        vec_ref = ref_tf[j[hit]] * idf[u[hit]][:, None]  # (H', S) reference tf-idf per slot
        clipped = np.minimum(vec[hit][:, None], vec_ref) * vec_ref  # (H', S)
        dot = np.bincount((cell[hit][:, None] * S + np.arange(S)).ravel(), weights=clipped.ravel(),
                          minlength=C * N * S).reshape(C, N, S).transpose(0, 2, 1)  # (C, S, n)

        den = norm[:, None, :] * self.norm_ref[images]  # (C, S, n)
        val = np.where(den > 0, dot / np.where(den > 0, den, 1.0), dot)  # (C, S, n)
        delta = (np.maximum(lengths - 1, 0)[:, None] - self.len_ref[images]).astype(np.float64)  # (C, S)
        val = val * np.exp(-delta ** 2 / (2 * self.sigma ** 2))[:, :, None]
        real = np.arange(S) < self.n_refs[images][:, None]  # (C, S) slots holding a reference
        return 10.0 * (val.mean(axis=2) * real).sum(axis=1) / self.n_refs[images]


def pycoco_cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   document_frequency: dict | None = None, ref_len: float | None = None) -> np.ndarray:
    """pycocoevalcap's CIDEr-D per candidate, optionally with fixed document frequencies and ref_len.

    The reference implementation that CiderD is tested and timed against. pycocoevalcap recomputes
    df and ref_len from the references it is given; passing the training corpus's (as SCST does)
    needs a subclass: its compute_doc_freq installs the given df, and its ref_len property returns
    the given value whatever compute_cider assigns. CiderScorer.compute_score asserts df <= number
    of candidates, which corpus frequencies break, so this calls compute_doc_freq and compute_cider.
    """
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    class FixedDfScorer(CiderScorer):
        @property
        def ref_len(self):
            return ref_len if ref_len is not None else self._ref_len

        @ref_len.setter
        def ref_len(self, value):
            self._ref_len = value

        def compute_doc_freq(self):
            if document_frequency is None:
                super().compute_doc_freq()
            else:  # pycocoevalcap reads missing n-grams as 0, so it needs a defaultdict
                self.document_frequency = defaultdict(float, document_frequency)

    scorer = FixedDfScorer(n=N, sigma=SIGMA)
    for cand, refs in zip(candidates, references):
        scorer += (cand, list(refs))
    scorer.compute_doc_freq()
    return np.array(scorer.compute_cider(), dtype=np.float64)


def ids_to_text(tokens, lengths) -> list[str]:
    """Id rows -> pycocoevalcap strings: the first lengths[r] ids as decimal words."""
    tokens, lengths = _np(tokens), _np(lengths)
    return [" ".join(map(str, t[:n].tolist())) for t, n in zip(tokens, lengths)]
