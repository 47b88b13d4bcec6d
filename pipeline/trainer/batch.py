"""One teacher-forced batch of cached captions, built in one place for training, validation and bench."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.decoder.data import CaptionData
from pipeline.decoder.model import packed_targets, teacher_forcing


@dataclass
class Batch:
    """Caption rows as device tensors, sorted longest first (packing needs descending lengths)."""

    features: torch.Tensor  # (B, D) float32, the image feature of each caption ((B, 1 + R, D) with the grid)
    inputs: torch.Tensor  # (B, T) long: <start> w1..wn, 0-padded
    targets: torch.Tensor  # (sum(lengths),) long: w1..wn <end> of every caption, in packed order
    lengths: torch.Tensor  # (B,) long on the CPU (pack_padded_sequence wants CPU lengths): n + 1

    @classmethod
    def of(cls, data: CaptionData, rows: torch.Tensor, device: torch.device,
           features: torch.Tensor | None = None) -> Batch:
        """Caption `rows` (B,) of `data`; `features` (B, D) in rows' order replaces the cached ones (bench's
        notebook way computes them from the images)."""
        v = data.vocab
        inputs, targets, lengths, order = teacher_forcing(data.labels[rows], data.lengths[rows], v.start_id, v.end_id)
        if features is None:
            features = data.image_inputs(data.caption_image[rows][order], device)  # (B, D) or (B, 1 + R, D)
        else:
            features = features[order].to(device, non_blocking=True).float()
        return cls(features, inputs.to(device, non_blocking=True),
                   packed_targets(targets, lengths).to(device, non_blocking=True), lengths)

    @property
    def tokens(self) -> int:
        """Predicted tokens (the loss's averaging weight)."""
        return len(self.targets)


def caption_loss(net, batch: Batch, amp_dtype: torch.dtype | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy of `batch` under `net` (a decoder of make_decoder, or DDP around one), against
    targets label-smoothed by `smoothing` (0: the plain cross-entropy validation reports)."""
    device = batch.features.device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return net(batch.features, batch.inputs, batch.lengths, batch.targets, smoothing)  # through forward, for DDP
