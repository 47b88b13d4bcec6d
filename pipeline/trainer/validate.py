"""Validation of a decoder on the cache's val split, the same for train and scst."""

from __future__ import annotations

import math

import torch

from pipeline.decoder.data import CaptionData
from pipeline.decoder.decode import decode_rows
from pipeline.trainer.batch import Batch, caption_loss


@torch.no_grad()
def validate(model, data: CaptionData, device: torch.device, val_images: torch.Tensor,
             references: dict, batch_size: int, max_length: int) -> dict:
    """Loss/perplexity over every val caption (in batches of 4 x `batch_size`), and CIDEr/BLEU-4 of the
    greedy captions (at most `max_length` words) of `val_images` against `references`."""
    model.eval()
    total, tokens = 0.0, 0
    for rows in torch.split(data.caption_rows("val"), batch_size * 4):
        batch = Batch.of(data, rows, device)
        total += float(caption_loss(model, batch)) * batch.tokens
        tokens += batch.tokens
    out = {}
    if tokens:
        out["val_loss"] = total / tokens
        out["val_perplexity"] = math.exp(min(out["val_loss"], 50.0))
    if len(val_images):
        v = data.vocab
        hyps = decode_rows(model, data, val_images, device, beam_size=1, max_length=max_length,
                           start_id=v.start_id, end_id=v.end_id, banned_ids=(v.pad_id, v.start_id, v.unk_id))
        from pipeline.decoder.metrics import fast_scores  # pycocoevalcap: loaded only when validation scores

        candidates = {int(r): v.decode(h.tokens) for r, h in zip(val_images, hyps)}
        out.update(fast_scores(references, candidates))
    return out
