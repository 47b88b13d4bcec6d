"""Batched caption decoding (greedy and beam search) for a step-wise recurrent decoder.

All images of a batch (and, in beam search, all K beams of every image) advance together, one
time step per model call; the only Python loop is over time steps.

Semantics shared by both decoders:
- Decoding feeds `start_id` right after `init_state`. A hypothesis is complete when it emits
  `end_id`, or when it holds `max_length` words (then it is complete without an <end> term). So
  every hypothesis has length n = #generated tokens incl. <end> in 1..max_length.
- `logprob` is the model's own sum of log-softmax over the chosen tokens, <end> included when it
  was emitted. `banned_ids` are masked to -inf AFTER log_softmax: they can never be chosen, but
  they keep their share of the softmax mass, so the scores are true model log-probabilities and
  agree with scoring the same sequence step by step (e.g. by an exhaustive search).
- `score` = logprob / lp(n) with the GNMT length penalty lp(n) = ((5 + n) / 6) ** length_penalty;
  length_penalty = 0 gives score == logprob.

Beam search keeps K slots per image. Each step takes the top K of the K*V extensions of the live
slots (<end> extensions included); those ending in <end> (or reaching max_length words) are
scored and compared with the image's best complete hypothesis, the rest stay live. A slot that
finished is dead: it is never extended again (masked with -inf, never added to, so no NaNs),
and the next step refills the K slots from the live slots' children. With K = 1 this is exactly
greedy decoding; with K >= the number of possible sequences nothing is ever pruned, so it is
exact. An image stops early once no live beam can strictly beat its best complete hypothesis
(log-probs only fall as a sequence grows, so logprob_now / max lp(n) bounds every descendant's
score); this never changes the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from pipeline.core.manifest import SPLITS
from pipeline.core.runtime import DEVICE_HELP
from pipeline.core.settings import Settings, setting


@dataclass
class DecodeConfig(Settings):
    """How captions are decoded: shared by evaluate (params.yaml section `evaluate`) and caption."""

    SECTION: ClassVar[str] = "evaluate"

    beam_size: int = setting(3, "Beam width (1 = greedy).", min=1)
    max_length: int = setting(20, "Most words per caption.", min=1)
    length_penalty: float = setting(0.0, "GNMT length penalty alpha (0: rank by total log-probability).")
    device: str = setting("auto", DEVICE_HELP)


TOKENIZERS = ("auto", "ptb", "simple")  # pipeline.decoder.metrics.score_captions implements them


@dataclass
class EvaluateConfig(DecodeConfig):
    """evaluate's settings (params.yaml section `evaluate`). Here beside DecodeConfig, not in the evaluate
    stage, because caption reads the same section (its decoding half) and no stage imports another."""

    SECTION: ClassVar[str] = "evaluate"

    split: str = setting("test", "Which split of the cache to score.", choices=SPLITS)
    tokenizer: str = setting("auto", "auto: pycocoevalcap's PTB tokenizer when Java is present, else a "
                             "pure-Python one.", choices=TOKENIZERS)
    max_images: int = setting(0, "Score only the first N images of the split (0: all).", min=0)


class StepModel(Protocol):
    def init_state(self, features: Tensor) -> tuple[Tensor, ...]:
        """features (B, D) (or (B, 1 + R, D) with regions) -> recurrent state: tensors with the batch on dim 1,
        e.g. (h, c) each (layers, B, H)."""

    def step(self, tokens: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        """tokens (B,) -> (logits (B, V), new state)."""


@dataclass
class Hypothesis:
    tokens: list[int]  # generated words, without <start> and <end>
    logprob: float  # sum of the model's log-probs of the chosen tokens, <end> included if emitted
    score: float  # logprob / ((5 + length) / 6) ** length_penalty; == logprob when the penalty is 0
    ended: bool  # True if <end> was emitted, False if cut at max_length words

    @property
    def length(self) -> int:
        """Generated tokens including <end>: the n in the length penalty."""
        return len(self.tokens) + int(self.ended)


def _penalty_table(max_length: int, length_penalty: float, device) -> Tensor:
    """(max_length + 1,) float32: lp(n) for n = 0..max_length, one table so every score uses the same floats."""
    n = torch.arange(max_length + 1, device=device, dtype=torch.float64)
    return ((5.0 + n) / 6.0).pow(length_penalty).float()


def _step_logprobs(model: StepModel, tokens: Tensor, state: tuple, banned: Tensor) -> tuple[Tensor, tuple]:
    """One model step -> (float32 log-probs (N, V) with banned ids at -inf, new state)."""
    logits, state = model.step(tokens, state)  # logits (N, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V), true model log-probs
    if banned.numel():
        logp[:, banned] = float("-inf")  # masked after the softmax: never chosen, scores unchanged
    return logp, state


def _hypotheses(words: Tensor, n_words: Tensor, logprob: Tensor, score: Tensor, ended: Tensor) -> list[Hypothesis]:
    """Per-image tensors -> Hypothesis list, with one device->host copy per tensor."""
    words, n_words, logprob, score, ended = (x.tolist() for x in (words, n_words, logprob, score, ended))
    return [Hypothesis(w[:n], lp, s, e) for w, n, lp, s, e in zip(words, n_words, logprob, score, ended)]


def _check(max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")


@torch.inference_mode()
def greedy_decode(model: StepModel, features: Tensor, max_length: int, start_id: int, end_id: int,
                  banned_ids: Sequence[int] = (), length_penalty: float = 0.0) -> list[Hypothesis]:
    """Arg-max decoding of B images at once; features (B, D) -> B hypotheses in order.

    length_penalty only sets the reported `score` (so it matches beam_search with beam_size=1); it
    never changes the tokens. Finished rows are still fed to the model (keeping the batch fixed is
    simpler than compacting it), but whatever comes back for them is ignored.
    """
    _check(max_length)
    B, dev = features.shape[0], features.device
    banned = torch.as_tensor(list(banned_ids), dtype=torch.long, device=dev)  # (nb,)
    state = model.init_state(features)
    inp = torch.full((B,), start_id, dtype=torch.long, device=dev)  # (B,)
    words = torch.full((B, max_length), end_id, dtype=torch.long, device=dev)  # (B, L)
    logprob = torch.zeros(B, dtype=torch.float32, device=dev)  # (B,)
    n_words = torch.zeros(B, dtype=torch.long, device=dev)  # (B,)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
    for t in range(max_length):
        logp, state = _step_logprobs(model, inp, state, banned)  # (B, V)
        lp, word = logp.max(dim=-1)  # (B,), (B,)
        logprob += lp.masked_fill(finished, 0.0)  # finished rows add nothing (masked_fill, not *: NaN-safe)
        words[:, t] = word
        is_end = word == end_id  # (B,)
        n_words += (~finished & ~is_end).long()
        finished |= is_end
        if bool(finished.all()):
            break
        inp = word
    ended = finished  # a row not finished here was cut at max_length words
    lengths = n_words + ended.long()  # (B,) generated tokens incl. <end>
    score = logprob / _penalty_table(max_length, length_penalty, dev)[lengths]  # (B,)
    return _hypotheses(words, n_words, logprob, score, ended)


@dataclass
class _Best:
    """Beam search's best complete hypothesis of each image so far, as (B, ...) tensors."""

    words: Tensor  # (B, L) its words, padded with end_id
    n_words: Tensor  # (B,) words, <end> excluded
    logprob: Tensor  # (B,)
    score: Tensor  # (B,) -inf while the image has none
    ended: Tensor  # (B,) whether it emitted <end>

    @classmethod
    def none_yet(cls, B: int, L: int, end_id: int, dev) -> _Best:
        ninf = float("-inf")
        return cls(words=torch.full((B, L), end_id, dtype=torch.long, device=dev),
                   n_words=torch.zeros(B, dtype=torch.long, device=dev),
                   logprob=torch.full((B,), ninf, dtype=torch.float32, device=dev),
                   score=torch.full((B,), ninf, dtype=torch.float32, device=dev),
                   ended=torch.zeros(B, dtype=torch.bool, device=dev))

    def offer(self, t: int, done_now: Tensor, top_lp: Tensor, words: Tensor, is_end: Tensor, pen_n: Tensor,
              rows: Tensor) -> None:
        """The slots `done_now` (B, K) completed at step t (length n = t+1, penalty pen_n): per image the best
        of them replaces the best so far when its score is strictly higher (earlier hypotheses win ties)."""
        score = (top_lp / pen_n).masked_fill(~done_now, float("-inf"))  # (B, K)
        k = score.argmax(dim=1)  # (B,) best completion per image (ties: higher raw log-prob)
        better = score[rows, k] > self.score  # (B,)
        self.score = torch.where(better, score[rows, k], self.score)
        self.logprob = torch.where(better, top_lp[rows, k], self.logprob)
        self.words = torch.where(better.unsqueeze(-1), words[rows, k], self.words)  # (B, L)
        self.ended = torch.where(better, is_end[rows, k], self.ended)
        self.n_words = torch.where(better, t + 1 - is_end[rows, k].long(), self.n_words)

    def hypotheses(self) -> list[Hypothesis]:
        return _hypotheses(self.words, self.n_words, self.logprob, self.score, self.ended)


def _start_beams(model: StepModel, features: Tensor, K: int, start_id: int) -> tuple[tuple, Tensor, Tensor]:
    """K slots per image in its initial state, only slot 0 live (so the K slots don't start as K copies)
    -> (state with B*K rows, row b*K + k being slot k of image b; first input (B*K,); beam_lp (B, K))."""
    B, dev = features.shape[0], features.device
    state = model.init_state(features)  # each (..., B, ...)
    state = tuple(s.index_select(1, torch.arange(B, device=dev).repeat_interleave(K)) for s in state)
    inp = torch.full((B * K,), start_id, dtype=torch.long, device=dev)  # (B*K,)
    beam_lp = torch.full((B, K), float("-inf"), dtype=torch.float32, device=dev)  # (B, K) log-prob of live beams
    beam_lp[:, 0] = 0.0
    return state, inp, beam_lp


def _top_extensions(beam_lp: Tensor, alive: Tensor, logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The top K of the K*V extensions of each image's live slots -> (log-prob, parent slot, word), each
    (B, K), sorted best first; a dead slot's extensions are -inf even where logp is NaN."""
    B, K = beam_lp.shape
    V = logp.shape[-1]
    cand = beam_lp.unsqueeze(-1) + logp.view(B, K, V)  # (B, K, V)
    cand = cand.masked_fill(~alive.unsqueeze(-1), float("-inf"))
    top_lp, top_idx = cand.view(B, K * V).topk(K, dim=1)  # (B, K)
    return top_lp, top_idx // V, top_idx % V


def _live_beams(top_lp: Tensor, unfinished: Tensor, best_score: Tensor, pen_rest: Tensor) -> tuple[Tensor, Tensor]:
    """The slots that go on -> (alive (B, K), beam_lp (B, K), -inf where dead). Finished slots die; so does
    every slot of an image none of whose descendants can strictly beat its best: they have log-prob <= beam_lp
    (<= 0) and a length whose penalty is in pen_rest, so max beam_lp / max pen_rest bounds their score."""
    ninf = float("-inf")
    beam_lp = top_lp.masked_fill(~unfinished, ninf)  # (B, K)
    bound = beam_lp.max(dim=1).values / pen_rest.max()  # (B,) best score any descendant can reach
    alive = unfinished & (bound > best_score).unsqueeze(-1)  # (B, K)
    return alive, beam_lp.masked_fill(~alive, ninf)


@torch.inference_mode()
def beam_search(model: StepModel, features: Tensor, beam_size: int, max_length: int, start_id: int,
                end_id: int, length_penalty: float = 0.0, banned_ids: Sequence[int] = ()) -> list[Hypothesis]:
    """Beam search over B images at once (B*K model rows); features (B, D) -> best hypothesis per image.

    See the module docstring for the exact semantics. Row b*K + k of the model state is beam k of
    image b; it is reordered with index_select on dim 1 after every step.
    """
    _check(max_length)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    B, K, L, dev = features.shape[0], beam_size, max_length, features.device
    banned = torch.as_tensor(list(banned_ids), dtype=torch.long, device=dev)  # (nb,)
    pen = _penalty_table(L, length_penalty, dev)  # (L+1,)
    rows = torch.arange(B, device=dev)  # (B,)
    state, inp, beam_lp = _start_beams(model, features, K, start_id)
    alive = beam_lp.isfinite()  # (B, K)
    words = torch.zeros(B, K, L, dtype=torch.long, device=dev)  # (B, K, L) tokens of each beam
    best = _Best.none_yet(B, L, end_id, dev)

    for t in range(L):
        logp, state = _step_logprobs(model, inp, state, banned)  # (B*K, V)
        top_lp, parent, word = _top_extensions(beam_lp, alive, logp)  # each (B, K)
        words = words.gather(1, parent.unsqueeze(-1).expand(B, K, L))  # (B, K, L) histories follow parents
        words[:, :, t] = word
        finite = top_lp.isfinite()  # (B, K) -inf picks (dead or banned) are no hypotheses
        is_end = word == end_id  # (B, K)
        # complete hypotheses this step: <end> emitted, or max_length words reached; length n = t+1
        best.offer(t, finite & (is_end | (t == L - 1)), top_lp, words, is_end, pen[t + 1], rows)
        if t == L - 1:
            break
        alive, beam_lp = _live_beams(top_lp, finite & ~is_end, best.score, pen[t + 2:])
        if not bool(alive.any()):
            break
        flat = (rows.unsqueeze(-1) * K + parent).view(-1)  # (B*K,) source row of each new slot
        state = tuple(s.index_select(1, flat) for s in state)  # each (..., B*K, ...)
        inp = word.view(-1)  # (B*K,) dead slots feed junk; their outputs are masked next step
    return best.hypotheses()


def decode_rows(model: StepModel, data, rows: Tensor, device, batch_size: int = 256, **kw) -> list[Hypothesis]:
    """`decode` of the cached images `rows` of `data` (a CaptionData), their features read batch_size images at
    a time (a grid is never read whole): the same hypotheses as decoding every row at once."""
    out: list[Hypothesis] = []
    for chunk in rows.split(batch_size):
        out += decode(model, data.image_inputs(chunk, device), batch_size=batch_size, **kw)
    return out


@torch.inference_mode()
def decode(model: StepModel, features: Tensor, beam_size: int = 1, max_length: int = 20, start_id: int = 1,
           end_id: int = 2, length_penalty: float = 0.0, banned_ids: Sequence[int] = (),
           batch_size: int = 256) -> list[Hypothesis]:
    """Caption features (N, D) in chunks of batch_size; greedy if beam_size == 1 else beam search.

    Runs on the features' device (the model must already be there); returns N hypotheses in order.
    Chunking bounds memory (B*K state rows per chunk) without changing any result.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[Hypothesis] = []
    for chunk in features.split(batch_size):  # each (<=batch_size, D)
        if beam_size == 1:
            out += greedy_decode(model, chunk, max_length, start_id, end_id, banned_ids, length_penalty)
        else:
            out += beam_search(model, chunk, beam_size, max_length, start_id, end_id, length_penalty, banned_ids)
    return out
