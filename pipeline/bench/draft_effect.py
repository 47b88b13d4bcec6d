"""How much JPEG draft decoding changes extract's input pixels (the README's figure; not a test).

    python -m pipeline.bench.draft_effect [FOLDER_OF_JPEGS] [--resize 232 --crop 224] [--limit 200]

For every JPEG: the uint8 crop with draft on (libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still
covers the resize) against draft off (a full decode, pixel-identical to torchvision's Resize+CenterCrop).
Prints the mean absolute pixel difference (0-255 scale), its spread over the images, and both timings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipeline.encoder.images import Preprocess

DEFAULT = Path(__file__).resolve().parents[3] / "shared/data/flickr8k/fullsize"  # ../shared beside the repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--resize", type=int, default=232)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--limit", type=int, default=200)
    a = ap.parse_args()
    paths = sorted(Path(a.folder).glob("*.jpg"))[: a.limit]
    if not paths:
        raise SystemExit(f"no .jpg files in {a.folder}")
    on, off = Preprocess(a.resize, a.crop, draft=True), Preprocess(a.resize, a.crop, draft=False)
    diffs, drafted, t_on, t_off = [], 0, 0.0, 0.0  # diffs: of the drafted images (the others are identical)
    for p in paths:
        t0 = time.perf_counter()
        img = on.load(str(p))
        x = on.to_tensor(img).numpy().astype(np.int16)  # (3, crop, crop)
        t1 = time.perf_counter()
        y = off(str(p))[0].numpy().astype(np.int16)
        t2 = time.perf_counter()
        t_on, t_off = t_on + t1 - t0, t_off + t2 - t1
        if "source_size" in img.info:
            drafted += 1
            diffs.append(float(np.abs(x - y).mean()))
    d = np.array(diffs or [0.0])
    print(f"{len(paths)} JPEGs from {a.folder}, resize {a.resize} crop {a.crop}: {drafted} decoded in draft mode; "
          f"over those, mean |draft - full| = {d.mean():.2f} grey levels (median {np.median(d):.2f}, max {d.max():.2f}); "
          f"{1000 * t_on / len(paths):.1f} ms/image with draft, {1000 * t_off / len(paths):.1f} ms without")


if __name__ == "__main__":
    main()
