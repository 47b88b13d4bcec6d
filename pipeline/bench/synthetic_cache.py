"""Write a COCO-shaped synthetic cache (manifest, vocab, labels.h5, features.h5) for decoder benchmarks.

    python -m pipeline.bench.synthetic_cache OUT_DIR [--images 123287] [--captions-per-image 5] [--vocab 10000]
                                             [--grid 7]

Random features and captions with COCO's sizes (Karpathy split: 113k train images, 616k captions of
8-15 words from a 10k-word vocabulary, 2048-d float16 features), written through the project's own file
formats so `pipeline bench train --cache-dir OUT_DIR`, `pipeline train` and `python -m pipeline.bench.memory`
read it like a real cache. `--grid G` adds the G x G region grid that `extract.features: grid` writes
(N, G*G, D float16, one chunk per image: 25 GB at COCO size with G = 7, D = 2048; its values repeat a
random block, which no benchmark can tell). The manifest carries the raw caption strings (as a real one does: they are most
of its size), and labels.h5 holds exactly those captions' word ids. Nothing here is learnable.
"""

from __future__ import annotations

import argparse
import json
import os

import h5py
import numpy as np

from pipeline.core.cache import GRID_NAME
from pipeline.core.fileio import sha256_json
from pipeline.core.manifest import ImageRecord, Manifest
from pipeline.encoder.encoder import make_spec
from pipeline.encoder.images import Preprocess
from pipeline.extract.extract import cache_settings


def _words(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct lowercase pseudo-words of 2-10 letters (English-like lengths)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: dict[str, None] = {}
    while len(out) < count:
        out.setdefault("".join(rng.choice(letters, int(rng.integers(2, 11)))))
    return list(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=123287)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--grid", type=int, default=0, help="G: also write a G x G region grid (0: none)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, per = a.images, a.captions_per_image
    held = min(5000, n // 20)  # val and test images each: Karpathy's 5,000 at COCO size, 5% of a smaller cache
    split = np.where(np.arange(n) < n - 2 * held, 0, np.where(np.arange(n) < n - held, 1, 2)).astype(np.uint8)
    names = ["train", "val", "test"]
    words = _words(rng, a.vocab - 4)
    lengths = rng.integers(8, 16, n * per).astype(np.int32)
    labels = rng.integers(4, a.vocab, (n * per, 20)).astype(np.int32)
    labels[np.arange(20)[None, :] >= lengths[:, None]] = 0
    captions = [" ".join(words[w - 4] for w in row[:k]).capitalize() + "." for row, k in zip(labels.tolist(), lengths)]
    recs = [ImageRecord(id=i, dir=0, file=f"COCO_train2014_{i:012d}.jpg", split=names[split[i]],
                        captions=captions[i * per:(i + 1) * per]) for i in range(n)]
    m = Manifest("synthetic", ["/nonexistent"], recs)
    os.makedirs(a.out, exist_ok=True)
    m.save(f"{a.out}/manifest.json")
    tokens = ["<pad>", "<start>", "<end>", "<unk>"] + words
    with open(f"{a.out}/vocab.json", "w") as f:
        json.dump({"tokens": tokens, "threshold": 5, "counts": {}}, f)
    with h5py.File(f"{a.out}/labels.h5", "w") as f:
        f["labels"], f["lengths"] = labels, lengths
        f["caption_image"] = np.repeat(np.arange(n), per).astype(np.int32)
        f["image_ids"], f["image_split"] = np.arange(n, dtype=np.int64), split
        f.attrs.update({"splits": names, "max_length": 20, "vocab_size": len(tokens),
                        "vocab_fingerprint": sha256_json(tokens), "manifest_fingerprint": m.fingerprint})
    arch = "resnet152" if a.dim == 2048 else "resnet18"
    spec = make_spec(arch, "none", grid_size=a.grid)
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
        if a.grid:
            _write_grid(f, rng, n, a.grid ** 2, a.dim)
    print(f"synthetic cache -> {a.out}: {n} images, {n * per} captions, vocab {len(tokens)}"
          + (f", {a.grid}x{a.grid} grid" if a.grid else ""))


def _write_grid(f: h5py.File, rng: np.random.Generator, n: int, regions: int, dim: int, block: int = 512) -> None:
    """The grid dataset as extract writes it (checksummed chunk per image), from one random block of rows."""
    ds = f.create_dataset(GRID_NAME, shape=(n, regions, dim), dtype=np.float16, chunks=(1, regions, dim),
                          fletcher32=True)
    rows = rng.standard_normal((block, regions, dim), dtype=np.float32).astype(np.float16)
    for s in range(0, n, block):
        e = min(s + block, n)
        ds[s:e] = np.roll(rows, s // block, axis=0)[: e - s]


if __name__ == "__main__":
    main()
