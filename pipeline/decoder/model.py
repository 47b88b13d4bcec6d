"""The Show-and-Tell decoder: projection of the cached image feature + word embedding + LSTM + output layer.

Wiring (Vinyals et al. 2015): the projected image feature is the LSTM's first input, only to set its
state; then `<start>` and the caption words follow, and each output predicts the next word:

    inputs:  [img]  <start>  w1  w2 ... wn
    targets:   -      w1     w2  w3 ... <end>
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.core.settings import Settings, setting


@dataclass
class ModelSettings(Settings):
    """The decoder's shape: the model half of train's settings (params.yaml section `train`)."""

    SECTION: ClassVar[str] = "train"

    embed_size: int = setting(256, "Size of the word embeddings and of the projected image feature.", min=1)
    hidden_size: int = setting(512, "LSTM hidden units.", min=1)
    num_layers: int = setting(1, "LSTM layers.", min=1)
    dropout: float = setting(0.0, "Dropout on the LSTM outputs and between LSTM layers.", min=0, max=1, max_open=True)
    batchnorm: bool = setting(False, "BatchNorm after the image projection (the Mastering PyTorch variant).")
    # Image-blind baseline: every image feature is replaced by the training-set mean feature, so the
    # decoder learns the best caption it can without looking. Its score is the floor that a real
    # model's must clear by far, or the captions do not depend on the picture.
    blind: bool = setting(False, "Image-blind baseline: replace every image feature by the mean feature.")
    decoder: str = setting("showtell", "showtell: the pooled feature sets the LSTM's state (Vinyals et al.); attend: "
                           "also soft attention over the grid's regions at every word (Xu et al.; needs "
                           "`extract.features: grid`).", choices=("showtell", "attend"))
    attention_size: int = setting(512, "attend: size of the attention layer's hidden space.", min=1)


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint records to rebuild the decoder: the cache's sizes plus ModelSettings."""

    feature_dim: int
    vocab_size: int
    embed_size: int
    hidden_size: int
    num_layers: int
    dropout: float
    batchnorm: bool
    blind: bool
    decoder: str = "showtell"  # checkpoints from before attention hold Show-and-Tell decoders
    attention_size: int = 512
    grid_size: int = 0  # G of the G x G regions the attend decoder reads (0: pooled features only)

    @classmethod
    def of(cls, settings: ModelSettings, feature_dim: int, vocab_size: int, grid_size: int = 0) -> ModelConfig:
        """The model part of `settings` (a TrainConfig, say) for a cache of these sizes."""
        model = {f.name: getattr(settings, f.name) for f in fields(ModelSettings)}
        return cls(feature_dim, vocab_size, **model, grid_size=grid_size if model["decoder"] == "attend" else 0)

    @property
    def regions(self) -> int:
        return self.grid_size ** 2

    def as_dict(self) -> dict:
        return asdict(self)


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.project = nn.Linear(cfg.feature_dim, cfg.embed_size)
        self.bn = nn.BatchNorm1d(cfg.embed_size, momentum=0.01) if cfg.batchnorm else nn.Identity()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        # Per-dimension standardization of the cached features, fitted on the training images. Pooled
        # ResNet features can be huge and nearly collinear (seeded random weights especially); kept as
        # buffers so every checkpoint carries the statistics it was trained with.
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feature_std", torch.ones(cfg.feature_dim))

    @torch.no_grad()
    def fit_feature_stats(self, features: torch.Tensor, rows: torch.Tensor | None = None, grid=None) -> None:
        """features (N, D) (or its `rows`: the training images) -> mean/std buffers. (`grid`: read by the
        attention decoder only.)"""
        set_stats(self.feature_mean, self.feature_std, features, rows)

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, D) -> LSTM state (h, c), each (layers, B, H), after reading the image."""
        x = (features.float() - self.feature_mean) / self.feature_std  # (B, D)
        if self.cfg.blind:
            x = torch.zeros_like(x)  # the mean feature, standardized
        x = self.normalize(self.project(x.to(self.project.weight.dtype)))  # (B, E)
        _, state = self.lstm(x.unsqueeze(1))  # input (B, 1, E)
        return state

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The BatchNorm (or identity) after the projection, x (B, E) -> (B, E).

        A training batch of one caption (the last batch of an epoch can be) has no batch variance, and
        BatchNorm1d refuses it: such a batch is normalized with the running statistics instead (which it
        leaves as they are). SyncBatchNorm is left alone: its statistics span every rank's rows."""
        bn = self.bn
        if self.training and x.size(0) == 1 and type(bn) is nn.BatchNorm1d:
            return nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                            training=False, eps=bn.eps)
        return bn(x)

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One decoding step: tokens (B,) -> logits (B, V), new state."""
        y, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # y (B, 1, H)
        return self.out(self.drop(y[:, 0])), state

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor,
                targets: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
        """Teacher-forced logits for the real (unpadded) positions only, or with `targets` their loss.

        features (B, D); inputs (B, T) = <start> w1..wn padded; lengths (B,) = n+1, sorted descending.
        Returns (sum(lengths), V) in `pack_padded_sequence` order, so padding never reaches the loss; with
        targets (sum(lengths),) in that order, their mean cross-entropy (see `readout`).
        """
        state = self.init_state(features)
        x = self.embed(inputs)  # (B, T, E)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=True)
        y, _ = self.lstm(packed, state)  # y.data (sum(lengths), H)
        return readout(self.out, self.drop(y.data), targets, smoothing)


LOGIT_BLOCK_BYTES = 16 << 20  # under glibc's 32 MB mmap threshold (pipeline.core.runtime.heap_allocations)


def readout(out: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor | None = None,
            smoothing: float = 0.0) -> torch.Tensor:
    """hidden (N, H) -> logits out(hidden) (N, V); with targets (N,), their mean cross-entropy instead
    (label-smoothed by `smoothing`), computed a block of rows at a time.

    Why blocks: a COCO batch's logits (~1,700 tokens x 10k words, float32: ~70 MB) and their log-softmax and
    gradients are each one block above glibc's mmap threshold, which the C library maps afresh and the kernel
    page-faults in at every step (bench train: 0.85x the step with them on the heap). Blocks of at most
    LOGIT_BLOCK_BYTES stay on the heap and are reused. Same loss and gradients up to float rounding."""
    if targets is None:
        return out(hidden)
    rows = max(1, LOGIT_BLOCK_BYTES // (4 * out.out_features))
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        logits = out(h).float()  # (rows, V), in float32 also under autocast
        with torch.autocast(hidden.device.type, enabled=False):
            total = total + F.cross_entropy(logits, t, reduction="sum", label_smoothing=smoothing)
    return total / len(targets)


@torch.no_grad()
def set_stats(mean_buf: torch.Tensor, std_buf: torch.Tensor, features, rows: torch.Tensor | None = None,
              vectors: int = 1024) -> None:
    """Per-dimension mean/std of features (N, D) (or of its `rows`) into the two (D,) buffers, std floored to
    stay finite. `features[rows]` may be (b, ..., D) (the attention decoder's grid, N x R x D, a tensor or
    data.GridReader): every vector of it counts.

    One pass in float64 over blocks of about `vectors` D-vectors (rows x R for the grid), each block's mean and
    squared deviations merged into the running ones (Chan et al.'s pairwise update: as exact as two passes, but
    the rows are read once, which matters for a grid read from the file): a COCO cache's 113k x 2048 training
    features would otherwise be copied whole into every rank, once as float16 and once as float64 (2.3 GB); a
    block of 1024 x 2048 float64 is 16 MB in flight (and so are its deviations). Blocks of 256 grid rows were
    12.5k vectors, 205 MB each: the attention decoder's peak per rank at COCO size."""
    rows = torch.arange(len(features)) if rows is None else rows
    d = mean_buf.shape[0]
    block = max(1, vectors // math.prod(features.shape[1:-1]))  # rows a block
    mean, m2, n = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0
    for b in torch.split(rows, block):
        x = features[b].reshape(-1, d).double()  # (b * ..., D)
        if not len(x):
            continue
        k, block_mean = x.shape[0], x.mean(0)
        delta, total = block_mean - mean, n + x.shape[0]
        mean = mean + delta * (k / total)
        m2 = m2 + ((x - block_mean) ** 2).sum(0) + delta ** 2 * (n * k / total)
        n = total
    std = (m2 / (n - 1)).sqrt() if n > 1 else torch.ones_like(mean)
    mean_buf.copy_(mean.float())
    std_buf.copy_(std.clamp_min(1e-6 * float(std.max()) + 1e-12).float())


def packed_targets(targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """targets (B, T) -> (sum(lengths),) in the same order as CaptionDecoder.forward's logits."""
    return pack_padded_sequence(targets, lengths.cpu(), batch_first=True, enforce_sorted=True).data


def teacher_forcing(words: torch.Tensor, n: torch.Tensor, start_id: int, end_id: int):
    """Label rows -> (inputs, targets, lengths) sorted by length, longest first, and the sort order.

    words (B, L) word ids padded with 0; n (B,) word counts. Inputs are <start> w1..wn, targets
    w1..wn <end>, both (B, max(n)+1).
    """
    n, order = n.long().sort(descending=True)  # the cache holds compact ints (int16/int32): int64 per batch
    t = int(n[0]) + 1
    words = words[order, : t - 1].long()  # (B, T-1)
    b = words.shape[0]
    start = torch.full((b, 1), start_id, dtype=words.dtype, device=words.device)
    inputs = torch.cat([start, words], 1)  # (B, T)
    targets = torch.cat([words, torch.zeros_like(start)], 1)  # (B, T)
    targets[torch.arange(b, device=words.device), n] = end_id
    return inputs, targets, n + 1, order
