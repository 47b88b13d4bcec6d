"""Sampling, baselines and loss of self-critical sequence training (SCST).

SCST (Rennie et al. 2017) fine-tunes the decoder on the metric itself with REINFORCE: sample
captions from the model, score them (CIDEr-D, see cider.py), and raise the log-probability of
those that scored above a baseline while lowering the others. Two baselines:
- greedy (Rennie et al.): the reward of the image's greedy caption;
- leave-one-out ("new self-critical", Luo 2020): the mean reward of the image's other K-1 samples,
  which needs no extra decoding and is what self-critical.pytorch recommends.

Rows are image-major throughout: image b's K samples are rows b*K .. b*K+K-1.

Length semantics follow pipeline.decoder.decode: at most max_length tokens are generated; a caption
either ends with <end> (words + <end>, at most max_length tokens) or is cut at max_length words.
Unlike decode, banned ids are masked BEFORE the softmax: the samples are drawn from, and their
log-probs are taken under, the same renormalised distribution, which is what REINFORCE's gradient
needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.runtime import decide_compile, first_compiled_call
from pipeline.decoder.decode import StepModel, greedy_decode

# Sampled captions to do from which `scst.compile: auto` compiles the decoder's step (None: never), per decoder
# and device type: the break-even  captions x (1 / eager rate - 1 / compiled rate) = compile seconds.  Measured
# (2026-12-03, Flickr8k cache, recipe configs/flickr8k.yaml, scst's real step, 50 images x 5 samples, 2 threads,
# eager and compiled interleaved over 5 rounds of 8 steps):
# - attend, cpu: compiled 1.11-1.15x eager in all 5 (eager 122-134, compiled 135-155 sampled captions/s); compiling
#   takes ~25 s on a fresh machine (5 s with inductor's cache warm), so it pays from ~30k captions to sample
#   (Flickr8k's 3 epochs: 75k).
# - showtell, cpu: 0.85-1.22x, median 0.99: no gain, never.
# - cuda: never measured here, so never by default.
MIN_SAMPLES: dict[tuple[str, str], int | None] = {("attend", "cpu"): 30_000}


@dataclass
class Samples:
    tokens: Tensor  # (N, T) long; end_id at a caption's <end> and at every position after it
    logprobs: Tensor  # (N, T) float32 log-prob of each token under the sampling policy, with grad; 0 where ~mask
    mask: Tensor  # (N, T) bool: the caption's real positions, its words and its <end>
    lengths: Tensor  # (N,) long = mask.sum(1): tokens to score, <end> included when emitted


class CompiledStep:
    """`model` with its per-word step compiled (inductor, dynamic shapes, so the last, shorter batch and
    torchrun's slices reuse the graph): sampling calls the step max_length times a batch, init_state once.
    The first call compiles (its backward compiles at the first update); when compiling fails the step runs
    eagerly if `fallback`, else the error is one line."""

    def __init__(self, model: StepModel, fallback: bool, log):
        self.model, self.fallback, self.log = model, fallback, log
        self.compiled = torch.compile(model.step, dynamic=True)
        self.compile_seconds: float | None = None

    def init_state(self, features: Tensor) -> tuple:
        return self.model.init_state(features)

    def step(self, tokens: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        if self.compiled is None:
            return self.model.step(tokens, state)
        if self.compile_seconds is not None:
            return self.compiled(tokens, state)
        out, self.compile_seconds = first_compiled_call(lambda: self.compiled(tokens, state), self.fallback,
                                                        "the decoder's step", self.log)
        if self.compile_seconds is None:
            self.compiled = None
            return self.model.step(tokens, state)
        return out


def sampling_policy(model: StepModel, decoder: str, setting: str, device: torch.device, captions: int,
                    log) -> tuple[StepModel, str]:
    """(what sample_captions should call: `model`, or `model` with its step compiled where scst.compile
    `setting` decides so for `captions` still to sample with this `decoder` (showtell, attend); the decision
    in a few words, for the log)."""
    least = {dev: n for (name, dev), n in MIN_SAMPLES.items() if name == decoder}
    on, why = decide_compile(setting, device, captions, least, "sampled captions", f"the {decoder} decoder's step")
    return (CompiledStep(model, fallback=setting == "auto", log=log) if on else model), why


def _policy_logprobs(logits: Tensor, banned: Tensor) -> Tensor:
    """logits (N, V) -> log-probs (N, V) of the sampling policy: banned ids at -inf before the softmax."""
    logits = logits.float()
    if banned.numel():
        logits = logits.index_fill(1, banned, float("-inf"))  # out of place: autograd keeps the logits
    return torch.log_softmax(logits, dim=-1)


def _banned(banned_ids: Sequence[int], device) -> Tensor:
    return torch.as_tensor(list(banned_ids), dtype=torch.long, device=device)  # (nb,)


def sample_captions(model: StepModel, features: Tensor, k: int, max_length: int, start_id: int, end_id: int,
                    banned_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                    uniforms: Tensor | None = None) -> Samples:
    """Draw k captions per image by multinomial sampling, all B*k rows advancing together.

    features (B, D) -> Samples with N = B*k rows, image-major. The image is read once per image
    (init_state on B rows), then the state is repeated k times. T is the number of steps taken:
    max_length, or fewer when every caption has ended. Keeps the graph for the log-probs, so
    call it with grad enabled and the model in the mode it should train in.

    uniforms (N, max_length) in [0, 1), optional: draw row n's token t by inverting the cumulative
    distribution at uniforms[n, t] instead of torch.multinomial. A row's caption then depends only on
    its own numbers, not on which other rows share the batch, so torchrun ranks that each take a
    slice of a global batch sample what one process would.
    """
    if k < 1 or max_length < 1:
        raise ValueError(f"k and max_length must be >= 1, got {k} and {max_length}")
    N, dev = features.shape[0] * k, features.device
    banned = _banned(banned_ids, dev)
    state = tuple(s.repeat_interleave(k, dim=1) for s in model.init_state(features))  # each (..., N, ...)
    inp = torch.full((N,), start_id, dtype=torch.long, device=dev)  # (N,)
    finished = torch.zeros(N, dtype=torch.bool, device=dev)  # (N,)
    tokens, logprobs, mask = [], [], []
    for _ in range(max_length):
        logits, state = model.step(inp, state)  # (N, V)
        logp = _policy_logprobs(logits, banned)  # (N, V)
        probs = logp.detach().exp()  # (N, V)
        if uniforms is None:
            word = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
        else:  # inverse CDF: the first id whose cumulative probability exceeds u
            u = uniforms[:, len(tokens)].to(probs.device, probs.dtype).unsqueeze(1)  # (N, 1)
            word = (probs.cumsum(1) <= u).sum(1).clamp_max(probs.shape[1] - 1)  # (N,)
            word = torch.where(probs.gather(1, word.unsqueeze(1)).squeeze(1) > 0, word, probs.argmax(1))
        word = word.masked_fill(finished, end_id)  # finished rows repeat <end>
        lp = logp.gather(1, word.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)  # (N,)
        tokens.append(word)
        logprobs.append(lp)
        mask.append(~finished)
        finished = finished | (word == end_id)
        if bool(finished.all()):
            break
        inp = word
    mask = torch.stack(mask, 1)  # (N, T)
    return Samples(torch.stack(tokens, 1), torch.stack(logprobs, 1), mask, mask.sum(1))


def sequence_logprobs(model: StepModel, features: Tensor, tokens: Tensor, mask: Tensor, start_id: int,
                      banned_ids: Sequence[int] = ()) -> Tensor:
    """Teacher-forced per-token log-probs of given captions under the sampling policy.

    features (N, D), one row per caption; tokens (N, T), mask (N, T) as in Samples. Returns (N, T)
    with 0 where ~mask. Equals Samples.logprobs for the same model and tokens, so it re-scores a
    sample after the model changed.
    """
    banned = _banned(banned_ids, features.device)
    state = model.init_state(features)
    inp = torch.full((tokens.shape[0],), start_id, dtype=torch.long, device=features.device)  # (N,)
    out = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(inp, state)  # (N, V)
        lp = _policy_logprobs(logits, banned).gather(1, tokens[:, t:t + 1]).squeeze(1)  # (N,)
        out.append(lp.masked_fill(~mask[:, t], 0.0))
        inp = tokens[:, t]
    return torch.stack(out, 1)  # (N, T)


def greedy_captions(model: StepModel, features: Tensor, max_length: int, start_id: int, end_id: int,
                    banned_ids: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Greedy captions for the greedy baseline -> (tokens (B, T) long, lengths (B,)), like Samples.

    Runs pipeline.decoder.decode.greedy_decode with the model in eval mode (as self-critical.pytorch
    does for its baseline: no dropout noise in the reference caption), then restores the mode.
    tokens hold the words, then <end> if it was emitted (counted in lengths), padded with end_id.
    """
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        hyps = greedy_decode(model, features, max_length, start_id, end_id, banned_ids)
    finally:
        if was_training:
            model.train()
    tokens = torch.full((len(hyps), max_length), end_id, dtype=torch.long)  # (B, L)
    lengths = torch.tensor([h.length for h in hyps], dtype=torch.long)  # (B,) words (+1 if <end>)
    for b, h in enumerate(hyps):
        tokens[b, :len(h.tokens)] = torch.tensor(h.tokens, dtype=torch.long)
    return tokens.to(features.device), lengths.to(features.device)


def leave_one_out_baseline(rewards: Tensor, k: int) -> Tensor:
    """rewards (B*k,) image-major -> (B*k,): each sample's baseline is the mean of its image's other k-1.

    The baseline does not depend on the sample it is subtracted from, so the gradient stays
    unbiased, and the advantages of an image's samples sum to zero.
    """
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs k >= 2 samples per image, got {k}")
    r = rewards.reshape(-1, k)  # (B, k)
    return ((r.sum(1, keepdim=True) - r) / (k - 1)).reshape(-1)


def greedy_baseline(greedy_rewards: Tensor, k: int) -> Tensor:
    """Per-image greedy rewards (B,) -> (B*k,): the image's greedy reward for each of its k samples."""
    return greedy_rewards.repeat_interleave(k)


def scst_loss(logprobs: Tensor, mask: Tensor, rewards: Tensor, baseline: Tensor) -> Tensor:
    """REINFORCE with a baseline: -sum((reward - baseline) * log p(token)) / number of real tokens.

    logprobs (N, T), mask (N, T), rewards (N,), baseline (N,). Normalised by the token count
    mask.sum(), as self-critical.pytorch's new_self_critical loss does; the advantages are
    constants (no gradient flows into the rewards or the baseline).
    """
    adv = (rewards - baseline).detach().to(logprobs.dtype)  # (N,)
    m = mask.to(logprobs.dtype)  # (N, T)
    return -(adv.unsqueeze(1) * logprobs * m).sum() / m.sum().clamp_min(1.0)
