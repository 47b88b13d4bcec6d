"""Tokenizer and vocabulary shared by prepare, train and caption.

The vocabulary is saved as plain JSON (never pickle: a cache directory may come from someone else, and
unpickling runs code). Its `fingerprint` goes into `labels.h5` and into checkpoints, so a decoder is
never paired with a vocabulary whose ids mean other words.

    {"tokens": ["<pad>", "<start>", "<end>", "<unk>", "a", ...], "threshold": 5, "counts": {"a": 123, ...}}
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from nltk.tokenize import TreebankWordTokenizer

from pipeline.core.cache import VOCAB_NAME, cache_member
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import read_json, sha256_json, write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Treebank tokenization is pure regex: it needs no nltk data download (punkt would).
_TREEBANK = TreebankWordTokenizer()
# Treebank detaches a period only at the very end of its input: split after sentence-final punctuation
# first, so periods ending earlier sentences are detached too.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _is_punct(token: str) -> bool:
    return all(c in string.punctuation or unicodedata.category(c)[0] in "PS" for c in token)


def tokenize(text: str) -> list[str]:
    """Lowercase words of `text`, punctuation- and symbol-only tokens dropped.

    The one tokenizer of the project: the vocabulary, the validation references and the pure-Python
    scorer (`pipeline.decoder.metrics`, when Java's PTB tokenizer is not used) all split text with it,
    so a word means the same everywhere. Trailing periods are stripped from word tokens, so "st." and
    "st" count as one word.
    """
    out = []
    for sentence in _SENTENCE_END.split(" ".join(text.lower().split())):
        for tok in _TREEBANK.tokenize(sentence):
            if _is_punct(tok):
                continue
            tok = tok.rstrip(".")
            if tok:
                out.append(tok)
    return out


class Vocabulary:
    """Word <-> id mapping: the four special tokens first, then words by descending count, ties alphabetical."""

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __init__(self, tokens: Sequence[str], threshold: int = 1, counts: dict[str, int] | None = None):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS:
            raise ValueError(f"the first tokens must be {list(SPECIALS)}, got {tokens[:4]}")
        if not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("every token must be a non-empty string")
        if len(set(tokens)) != len(tokens):
            raise ValueError("duplicate tokens")
        self.tokens: list[str] = tokens
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.threshold = int(threshold)
        self.counts: dict[str, int] = dict(counts or {})

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, threshold={self.threshold})"

    @property
    def fingerprint(self) -> str:
        """sha256 of the token list: equal fingerprints mean equal ids for every word."""
        return sha256_json(self.tokens)

    def encode(self, text_or_tokens: str | Iterable[str]) -> list[int]:
        """Word ids of a caption (a string is tokenized first); no <start>/<end>, unknown words -> <unk>."""
        toks = tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        return [self.stoi.get(t, self.unk_id) for t in toks]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of `ids` joined by spaces, up to the first <end>; <pad> and <start> are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside this vocabulary of {len(self.tokens)} tokens")
            words.append(self.tokens[i])
        return " ".join(words)

    @classmethod
    def build(cls, tokenized_captions: Iterable[Sequence[str]], threshold: int = 5) -> Vocabulary:
        """Keep the words seen at least `threshold` times; rarer words will encode as <unk>."""
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise PipelineError(f"vocabulary threshold must be an integer >= 1, got {threshold!r}")
        counter: Counter[str] = Counter()
        for toks in tokenized_captions:
            counter.update(toks)
        words = sorted((w for w, c in counter.items() if c >= threshold and w not in SPECIALS),
                       key=lambda w: (-counter[w], w))
        return cls(list(SPECIALS) + words, threshold=threshold, counts={w: counter[w] for w in words})

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {"tokens": self.tokens, "threshold": self.threshold, "counts": self.counts})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Load `path` (a vocab.json file or a cache directory holding one)."""
        path = cache_member(path, VOCAB_NAME, "vocabulary")
        try:
            obj = read_json(path)
            if not isinstance(obj, dict) or not isinstance(obj.get("tokens"), list):
                raise ValueError('expected a JSON object with a "tokens" list')
            counts = obj.get("counts") or {}
            if not isinstance(counts, dict):
                raise ValueError('"counts" must be an object')
            return cls(obj["tokens"], threshold=int(obj.get("threshold", 1)),
                       counts={str(k): int(v) for k, v in counts.items()})
        except (ValueError, TypeError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise PipelineError(f"{path} is not a valid vocabulary ({e}): rerun `pipeline prepare`") from None
