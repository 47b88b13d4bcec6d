"""Which images a checkpoint was trained on, so evaluate can refuse to score them as if unseen.

A checkpoint records its training images as the sorted image ids of the cache's train split (valid
images only: those are the ones trained on), with a sha256 of that list and the id space they live
in. Ids are dataset ids (COCO ids for COCO and Karpathy, running indices for Flickr8k), so they are
only compared within one id space: a COCO-trained decoder scored on Flickr8k shares no images with it.
"""

from __future__ import annotations

import torch

from pipeline.core.fileio import sha256_json
from pipeline.decoder.data import CaptionData

RECORD_KEY = "train_images"
ID_SPACES = {"coco": "coco", "karpathy": "coco", "flickr8k": "flickr8k"}


def id_space(dataset: str) -> str:
    return ID_SPACES.get(dataset, dataset)


def image_ids(data: CaptionData, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows),) int64 manifest image ids of these feature rows, sorted."""
    images = data.manifest.images
    return torch.tensor(sorted(images[int(r)].id for r in rows), dtype=torch.int64)


def training_images_record(data: CaptionData) -> dict:
    """What a checkpoint stores about its training images: id space, count, sha256 and the ids (int64)."""
    ids = image_ids(data, data.image_rows("train"))  # (N_train,) sorted
    return {"id_space": id_space(data.manifest.dataset), "count": len(ids),
            "sha256": sha256_json(ids.tolist()), "ids": ids}


def overlap(ckpt: dict, data: CaptionData, rows: torch.Tensor) -> int | None:
    """How many of the images at `rows` the checkpoint was trained on; None when it does not record them."""
    record = ckpt.get(RECORD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("ids"), torch.Tensor):
        return None
    if record.get("id_space") != id_space(data.manifest.dataset):
        return 0
    scored = image_ids(data, rows)
    return int(torch.isin(scored, record["ids"].to(torch.int64)).sum())
