"""The attention decoder (`train.decoder: attend`): Show, Attend and Tell's soft attention over the grid.

Xu et al. 2015, deterministic ("soft") attention, as sgrvinod's tutorial builds it, but from the cache's
G x G region features instead of recomputing the CNN. Why this variant and not top-down (Anderson et al.):
one LSTM, so a step costs little more than Show-and-Tell's and beam search, sampling and SCST keep one
state layout; the top-down model's second LSTM is for region proposals we do not have.

At step t, with the previous hidden state h (B, H) asking:
    alpha = softmax_r(w . tanh(K_r + W h))           (B, R): where it looks, sums to 1 over the R regions
    z     = sigmoid(W_b h) * sum_r alpha_r V_r       (B, E): the gated context (the "beta" gate of Xu et al.)
    h, c  = LSTMCell([embed(word); z], (h, c))
    logits = W_o dropout(h)
V (R, B, E) are the standardized regions projected once per image, K (R, B, A) their attention keys. The
pooled feature sets the initial state (h0, c0 = tanh(W pooled)), as the mean annotation does in Xu et al.

Image input: (B, 1 + R, D), row 0 the pooled feature and rows 1.. the regions (what the encoder gives with a
grid, and CaptionData.image_inputs for cached ones). The recurrent state is (h, c, V, K), each with the
batch on dim 1, so pipeline.decoder.decode's beam search and SCST's sampling reorder and repeat it as they
do Show-and-Tell's (h, c).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.errors import PipelineError
from pipeline.decoder.model import ModelConfig, readout, set_stats

GRID_STATS_IMAGES = 2048  # images whose regions fit the grid's standardization: enough for 2048 * R vectors


class AttendDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_layers != 1 or cfg.batchnorm or cfg.regions < 1:
            raise PipelineError(f"train.decoder attend has one LSTM layer, no BatchNorm and reads a grid: set "
                                f"num_layers 1 and batchnorm false (got {cfg.num_layers}, {cfg.batchnorm}), and "
                                f"extract with features: grid")
        self.cfg = cfg
        d, e, h, a = cfg.feature_dim, cfg.embed_size, cfg.hidden_size, cfg.attention_size
        self.init_h, self.init_c = nn.Linear(d, h), nn.Linear(d, h)
        self.values = nn.Linear(d, e)
        self.keys = nn.Linear(e, a)
        self.query = nn.Linear(h, a)
        self.score = nn.Linear(a, 1)
        self.gate = nn.Linear(h, e)
        self.embed = nn.Embedding(cfg.vocab_size, e, padding_idx=0)
        self.cell = nn.LSTMCell(2 * e, h)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(h, cfg.vocab_size)
        # standardization of the pooled feature and of the regions (per channel), fitted on training images
        for name, dim in (("feature_mean", d), ("feature_std", d), ("grid_mean", d), ("grid_std", d)):
            self.register_buffer(name, torch.zeros(dim) if name.endswith("mean") else torch.ones(dim))

    @torch.no_grad()
    def fit_feature_stats(self, features: torch.Tensor, rows: torch.Tensor | None = None, grid=None) -> None:
        """Pooled features (N, D) and `grid` (N, R, D, a tensor or data.GridReader) of the training `rows` ->
        the standardization buffers; the grid's from at most GRID_STATS_IMAGES images spread over `rows`."""
        rows = torch.arange(len(features)) if rows is None else rows
        set_stats(self.feature_mean, self.feature_std, features, rows)
        if grid is not None and len(rows):
            step = max(1, len(rows) // GRID_STATS_IMAGES)
            set_stats(self.grid_mean, self.grid_std, grid, rows[::step][:GRID_STATS_IMAGES])

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """features (B, 1 + R, D) -> (h (1, B, H), c (1, B, H), V (R, B, E), K (R, B, A))."""
        pooled = (features[:, 0].float() - self.feature_mean) / self.feature_std  # (B, D)
        grid = (features[:, 1:].float() - self.grid_mean) / self.grid_std  # (B, R, D)
        if self.cfg.blind:
            pooled, grid = torch.zeros_like(pooled), torch.zeros_like(grid)  # the mean features, standardized
        h, c = torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled))  # (B, H)
        values = self.values(grid).transpose(0, 1)  # (R, B, E)
        return h.unsqueeze(0), c.unsqueeze(0), values, self.keys(values)  # K (R, B, A)

    def attend(self, h: torch.Tensor, values: torch.Tensor, keys: torch.Tensor,
               recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, H), V (R, B, E), K (R, B, A) -> (gated context (B, E), alpha (R, B)).

        `recompute` (teacher-forced training): the scores' tanh (R, B, A) is not kept for the backward pass but
        computed again there (torch.utils.checkpoint): at COCO's batch 128 and A 512 it is 13 MB a word (the
        peak per rank 2,274 -> ~2,100 MB), and recomputing it costs little beside the step's output layer."""
        q = self.query(h)  # (B, A)
        e = checkpoint(self._scores, keys, q, use_reentrant=False) if recompute else self._scores(keys, q)  # (R, B)
        alpha = torch.softmax(e, dim=0)  # (R, B)
        context = (alpha.unsqueeze(-1) * values).sum(0)  # (B, E)
        return torch.sigmoid(self.gate(h)) * context, alpha

    def _scores(self, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.score(torch.tanh(keys + q)).squeeze(-1)  # (R, B, A) -> (R, B)

    def _advance(self, words: torch.Tensor, h, c, values, keys, recompute: bool = False):
        """Embedded words (B, E) and the state (h, c (B, H)) -> (h, c, alpha (R, B))."""
        z, alpha = self.attend(h, values, keys, recompute)
        h, c = self.cell(torch.cat([words, z], 1), (h, c))
        return h, c, alpha

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One decoding step: tokens (B,) -> logits (B, V), new state."""
        h, c, values, keys = state
        h, c, _ = self._advance(self.embed(tokens), h[0], c[0], values, keys)
        return self.out(self.drop(h)), (h.unsqueeze(0), c.unsqueeze(0), values, keys)

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor,
                targets: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
        """Teacher-forced logits of the real positions (or with `targets` their loss), as CaptionDecoder.forward:
        features (B, 1 + R, D); inputs (B, T); lengths (B,) sorted descending -> (sum(lengths), V) in
        pack_padded_sequence order.

        Step t runs only the captions still going (a prefix, lengths being sorted), so padding is never
        computed and carries no gradient."""
        h, c, values, keys = self.init_state(features)
        h, c = h[0], c[0]  # (B, H)
        words = self.embed(inputs)  # (B, T, E)
        recompute = torch.is_grad_enabled()
        outputs = []
        for t in range(int(lengths[0])):
            b = int((lengths > t).sum())  # captions with a word to predict at t
            h, c, _ = self._advance(words[:b, t], h[:b], c[:b], values[:, :b], keys[:, :b], recompute)
            outputs.append(h)
        return readout(self.out, self.drop(torch.cat(outputs)), targets, smoothing)  # from (sum(lengths), H)

    @torch.no_grad()
    def attention(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Where it looked while reading `inputs` (B, T) (<start> w1.., as decoded): alpha (B, T, R); row t is
        the map behind the word predicted at step t."""
        h, c, values, keys = self.init_state(features)
        h, c = h[0], c[0]
        words = self.embed(inputs)  # (B, T, E)
        maps = []
        for t in range(inputs.shape[1]):
            h, c, alpha = self._advance(words[:, t], h, c, values, keys)
            maps.append(alpha.t())  # (B, R)
        return torch.stack(maps, 1)  # (B, T, R)
