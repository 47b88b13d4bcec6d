"""Write a COCO-shaped synthetic cache (manifest, vocab, labels.h5, features.h5) for decoder benchmarks.

    python bench/synthetic_cache.py OUT_DIR [--images 123287] [--captions-per-image 5] [--vocab 10000]

Random features and captions with COCO's sizes (Karpathy split: 113k train images, ~566k train
captions, lengths 8-20), written through the project's own file formats so `pipeline bench train
--cache-dir OUT_DIR` and `pipeline train` read it like a real cache. Nothing here is learnable.
"""

from __future__ import annotations

import argparse
import json
import os

import h5py
import numpy as np

from pipeline.core.fileio import sha256_json
from pipeline.core.manifest import ImageRecord, Manifest
from pipeline.extract.encoder import make_spec
from pipeline.extract.extract import cache_settings
from pipeline.extract.images import Preprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=123287)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=2048)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, per = a.images, a.captions_per_image
    split = np.where(np.arange(n) < n - 10000, 0, np.where(np.arange(n) < n - 5000, 1, 2)).astype(np.uint8)
    names = ["train", "val", "test"]
    words = [f"w{i}" for i in range(a.vocab - 4)]
    recs = [ImageRecord(id=i, dir=0, file=f"img{i}.jpg", split=names[split[i]], captions=[]) for i in range(n)]
    m = Manifest("synthetic", ["/nonexistent"], recs)
    os.makedirs(a.out, exist_ok=True)
    m.save(f"{a.out}/manifest.json")
    tokens = ["<pad>", "<start>", "<end>", "<unk>"] + words
    with open(f"{a.out}/vocab.json", "w") as f:
        json.dump({"tokens": tokens, "threshold": 5, "counts": {}}, f)
    lengths = rng.integers(8, 21, n * per).astype(np.int32)
    labels = rng.integers(4, a.vocab, (n * per, 20)).astype(np.int32)
    labels[np.arange(20)[None, :] >= lengths[:, None]] = 0
    with h5py.File(f"{a.out}/labels.h5", "w") as f:
        f["labels"], f["lengths"] = labels, lengths
        f["caption_image"] = np.repeat(np.arange(n), per).astype(np.int32)
        f["image_ids"], f["image_split"] = np.arange(n, dtype=np.int64), split
        f.attrs.update({"splits": names, "max_length": 20, "vocab_size": len(tokens),
                        "vocab_fingerprint": sha256_json(tokens), "manifest_fingerprint": m.fingerprint})
    arch = "resnet152" if a.dim == 2048 else "resnet18"
    spec = make_spec(arch, "none")
    settings = cache_settings(spec, Preprocess(), "float16", m)
    with h5py.File(f"{a.out}/features.h5", "w") as f:
        f["features"] = rng.standard_normal((n, a.dim), dtype=np.float32).astype(np.float16)
        f["valid"] = np.ones(n, bool)
        f["errors"] = np.array([""] * n, dtype=object)
        f["image_ids"] = np.arange(n, dtype=np.int64)
        f["paths"] = np.array([r.file for r in recs], dtype=object)
        attrs = {**spec.as_dict(), "preprocess": json.dumps(Preprocess().describe()), "dtype": "float16",
                 "manifest_fingerprint": m.fingerprint, "n_images": n, "settings": json.dumps(settings, sort_keys=True),
                 "settings_fingerprint": sha256_json(settings)}
        for k, v in attrs.items():
            f.attrs[k] = v
    print(f"synthetic cache -> {a.out}: {n} images, {n * per} captions, vocab {len(tokens)}")


if __name__ == "__main__":
    main()
