"""Exactness tests for pipeline.decode on a tiny seeded LSTM (CPU, milliseconds)."""

import math

import pytest
import torch
from torch import nn

from pipeline.decoder.decode import Hypothesis, beam_search, decode, greedy_decode

PAD, START, END = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLSTM(nn.Module):
    """Implements the StepModel protocol with state (h, c, t): h, c (layers, B, H), t (1, B, 1).

    t is a clock that starts at an image-dependent value and raises the <end> logit as it ticks,
    so that with random weights captions end at varied lengths, as a trained model's do.
    """

    def __init__(self, vocab: int, feat: int = 5, hidden: int = 8, layers: int = 2, seed: int = 0,
                 scale: float = 3.0, end_ramp: float = 0.7, end_bias: float = -1.5):
        super().__init__()
        torch.manual_seed(seed)
        self.project = nn.Linear(feat, hidden)
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.project.weight.mul_(3.0)  # images matter
            self.out.weight.mul_(scale)  # peakier, more varied distributions than the default init
            self.out.bias[END] += end_bias
        self.clock = nn.Linear(feat, 1)
        self.end_ramp = end_ramp
        self.eval()

    def init_state(self, features):
        _, (h, c) = self.lstm(self.project(features).unsqueeze(1))  # input (B, 1, H)
        return h, c, 4 * torch.tanh(self.clock(features)).unsqueeze(0)  # t (1, B, 1)

    def step(self, tokens, state):
        h, c, t = state
        y, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), (h, c))  # y (B, 1, H)
        logits = self.out(y[:, 0])  # (B, V)
        logits = logits + self.end_ramp * t[0] * (torch.arange(logits.shape[1]) == END)  # (B, V)
        return logits, (h, c, t + 1)


class Poisoned(nn.Module):
    """Wraps a model and returns NaN logits and NaN state for every row fed <end>.

    A decoder that ever extends a finished row (or sums/compares its outputs) turns NaN or
    changes its answer.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def init_state(self, features):
        return self.inner.init_state(features)

    def step(self, tokens, state):
        logits, state = self.inner.step(tokens, state)
        bad = tokens == END  # (B,)
        logits = logits.masked_fill(bad.unsqueeze(-1), float("nan"))
        state = tuple(s.masked_fill(bad.view(1, -1, 1), float("nan")) for s in state)
        return logits, state


def feats(n, d=5, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def lp_pen(n, alpha):
    return ((5 + n) / 6) ** alpha


def all_sequences(model, feature, max_length, banned=()):
    """Every complete sequence of one image, scored step by step: list of (tokens, ended, logprob).

    Walks the prefix tree depth first, one model call per prefix; complete = ends in <end>, or
    max_length words without <end>. Log-probs are the model's own (banned ids only not chosen).
    """
    out = []

    def walk(prefix, lp, tokens, state):
        logits, state = model.step(torch.tensor([tokens]), state)
        logp = torch.log_softmax(logits.double(), -1)[0]  # (V,)
        for w in range(logp.shape[0]):
            if w in banned:
                continue
            total = lp + logp[w].item()
            if w == END:
                out.append((prefix, True, total))
            elif len(prefix) + 1 == max_length:
                out.append((prefix + [w], False, total))
            else:
                walk(prefix + [w], total, w, state)

    with torch.no_grad():
        walk([], 0.0, START, model.init_state(feature.unsqueeze(0)))
    return out


def check_hyp(h, alpha=0.0):
    assert isinstance(h, Hypothesis)
    assert h.length == len(h.tokens) + int(h.ended)
    assert math.isfinite(h.logprob) and h.logprob <= 0
    assert h.score == pytest.approx(h.logprob / lp_pen(h.length, alpha), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_beam1_equals_greedy(alpha):
    model, f = TinyLSTM(vocab=12, seed=3), feats(9)
    g = greedy_decode(model, f, max_length=8, start_id=START, end_id=END, banned_ids=(PAD, START), length_penalty=alpha)
    b = beam_search(model, f, beam_size=1, max_length=8, start_id=START, end_id=END, length_penalty=alpha,
                    banned_ids=(PAD, START))
    assert [h.tokens for h in b] == [h.tokens for h in g]
    assert [h.logprob for h in b] == [h.logprob for h in g]  # bit-identical: same ops in the same order
    assert [h.score for h in b] == [h.score for h in g]
    assert [h.ended for h in b] == [h.ended for h in g]
    assert len({len(h.tokens) for h in g}) > 1  # rows finish at different steps
    for h in g:
        check_hyp(h, alpha)


@pytest.mark.parametrize("banned", [(PAD, START), ()])
@pytest.mark.parametrize("alpha", [0.0, 0.7, -0.5])
def test_wide_beam_equals_exhaustive(alpha, banned):
    V, L = 6, 3
    model, f = TinyLSTM(vocab=V, seed=5, scale=1.5), feats(6, seed=2)
    n_words = V - 1 - len(banned)
    K = sum(n_words ** k for k in range(L)) + n_words ** L  # number of complete sequences
    hyps = beam_search(model, f, beam_size=K, max_length=L, start_id=START, end_id=END, length_penalty=alpha,
                       banned_ids=banned)
    greedy = greedy_decode(model, f, L, START, END, banned)
    greedy_suboptimal = 0
    for i, h in enumerate(hyps):
        seqs = all_sequences(model, f[i], L, banned)
        assert len(seqs) == K
        tokens, ended, lp = max(seqs, key=lambda s: s[2] / lp_pen(len(s[0]) + s[1], alpha))
        assert (h.tokens, h.ended) == (tokens, ended)
        assert h.logprob == pytest.approx(lp, abs=1e-5)
        check_hyp(h, alpha)
        assert not set(h.tokens) & set(banned)
        greedy_suboptimal += greedy[i].tokens != tokens
    assert greedy_suboptimal > 0  # the search has something to find beyond greedy


@pytest.mark.parametrize("beam", [1, 3])
def test_batching_does_not_change_results(beam):
    model, f = TinyLSTM(vocab=10, seed=7), feats(7, seed=3)
    kw = dict(beam_size=beam, max_length=10, start_id=START, end_id=END, length_penalty=0.6, banned_ids=(PAD,))
    together = decode(model, f, **kw)
    alone = [decode(model, f[i:i + 1], **kw)[0] for i in range(len(f))]
    chunked = decode(model, f, batch_size=3, **kw)
    for a, b, c in zip(together, alone, chunked):
        assert a.tokens == b.tokens == c.tokens and a.ended == b.ended == c.ended
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) == pytest.approx(c.logprob, abs=1e-5)
    # an image's result does not depend on which other images share its batch
    shuffled = decode(model, f.flip(0), **kw)[::-1]
    assert [h.tokens for h in shuffled] == [h.tokens for h in together]


@pytest.mark.parametrize("beam", [1, 3, 12])
def test_finished_rows_are_never_extended(beam):
    # a strong length reward keeps beams running after their siblings emit <end>
    model, f = TinyLSTM(vocab=8, seed=3, scale=1.0, end_bias=-3.0), feats(6, seed=4)
    kw = dict(beam_size=beam, max_length=7, start_id=START, end_id=END, length_penalty=2.0, banned_ids=(PAD, START))
    clean = decode(model, f, **kw)
    poisoned = decode(Poisoned(model), f, **kw)
    assert any(h.ended and len(h.tokens) < 7 for h in clean)  # some rows really finish early
    for a, b in zip(clean, poisoned):
        assert a.tokens == b.tokens and a.ended == b.ended
        assert a.logprob == pytest.approx(b.logprob, abs=1e-6)
        assert math.isfinite(b.logprob) and math.isfinite(b.score)


@pytest.mark.parametrize("beam", [1, 3])
def test_max_length_cut_scores_without_end(beam):
    model, f = TinyLSTM(vocab=7, seed=2), feats(4, seed=5)
    L = 3
    hyps = decode(model, f, beam_size=beam, max_length=L, start_id=START, end_id=END, banned_ids=(PAD, START, END))
    for i, h in enumerate(hyps):
        assert not h.ended and len(h.tokens) == L and h.length == L
        seqs = {tuple(t): lp for t, _, lp in all_sequences(model, f[i], L, (PAD, START, END))}
        assert h.logprob == pytest.approx(seqs[tuple(h.tokens)], abs=1e-5)  # no <end> term
        assert h.logprob == pytest.approx(max(seqs.values()), abs=1e-5) or beam == 1


def test_decode_dispatch_and_edges():
    model, f = TinyLSTM(vocab=9, seed=4), feats(5, seed=6)
    g = greedy_decode(model, f, 6, START, END)
    b = beam_search(model, f, 3, 6, START, END, length_penalty=0.5)
    assert decode(model, f, beam_size=1, max_length=6, batch_size=2) == g
    assert [h.tokens for h in decode(model, f, beam_size=3, max_length=6, length_penalty=0.5, batch_size=2)] == \
        [h.tokens for h in b]
    assert decode(model, f[:0]) == []
    one = decode(model, f, beam_size=4, max_length=1)  # a single step: one word, or <end> alone
    assert all(len(h.tokens) + h.ended == 1 for h in one)
    with pytest.raises(ValueError):
        decode(model, f, max_length=0)
    with pytest.raises(ValueError):
        decode(model, f, beam_size=0)
