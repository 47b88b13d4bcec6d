"""Image decoding and preprocessing for the frozen encoder.

Decoding runs in DataLoader worker processes, so it must never raise: a bad image (unreadable,
truncated, zero bytes, not an image, absurdly large) comes back as a zero tensor plus a reason,
and the caller records it instead of stopping a run over 100k images.

Preprocessing stops at uint8 (3, crop, crop): normalization happens on the device, inside the
encoder, which keeps worker->main transfers 4x smaller than float32 and lets the GPU do the math.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.encoder.archs import family_of
from pipeline.encoder.family import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; larger files are refused as "absurdly large"
# Longest side / shortest side beyond which an image is refused. Resizing the shorter side to `resize`
# scales the longer one by the same factor: a 1x20000 strip (164 bytes as a PNG) would become
# 256x5120000 pixels, gigabytes. Real photos, panoramas included, stay far below this.
MAX_ASPECT_RATIO = 25

# What a folder of images holds, for `caption DIR` and globs: every suffix this machine's Pillow decodes among
# the picture formats (not the PDF/EPS/MPEG/HDF5 names Pillow also registers: a cache folder holds .h5 files).
# Extract reads whatever the manifest names through the same `Preprocess.load`, so both accept the same files.
_PICTURE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".webp", ".tif",
                     ".tiff", ".avif", ".avifs", ".heic", ".heif", ".qoi", ".tga", ".ppm", ".pgm", ".pbm", ".pnm",
                     ".jp2", ".j2k", ".jpx", ".jpf", ".ico", ".pcx", ".sgi", ".ras", ".psd", ".mpo")
Image.init()
IMAGE_EXTENSIONS = frozenset(s for s in _PICTURE_SUFFIXES if s in Image.registered_extensions())

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def not_regular(mode: int) -> str:
    """"" for a regular file's st_mode, else why it is no image file: "not a regular file (a FIFO)"."""
    if stat.S_ISREG(mode):
        return ""
    kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
    return f"not a regular file ({kind})"


def open_regular(path: str):
    """`path` opened for binary reading, or ValueError when it is no regular file (FIFO, socket, device, folder).

    A FIFO would block open() until a writer comes, forever in a DataLoader worker; a device could be read
    without end. So the kind is checked by stat before any open, and again on the descriptor (opened
    non-blocking, so a file swapped for a FIFO in between cannot block either)."""
    why = not_regular(os.stat(path).st_mode)
    if why:
        raise ValueError(why)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        why = not_regular(os.fstat(fd).st_mode)
        if why:
            raise ValueError(why)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_aspect(w: int, h: int) -> None:
    """Refuse (ValueError, recorded as a bad image) a w x h image too thin to resize sanely."""
    if max(w, h) > MAX_ASPECT_RATIO * max(min(w, h), 1):
        raise ValueError(f"absurd aspect ratio ({w}x{h} pixels, more than {MAX_ASPECT_RATIO}:1)")


@dataclass(frozen=True)
class Preprocess:
    """ImageNet evaluation preprocessing: resize the shorter side, then center-crop a square.

    `mean` and `std` (per channel, of pixels scaled to [0, 1]) are the normalisation the encoder applies on the
    device (see encoder.Encoder): recorded here, by `describe`, because they decide the features as much."""

    resize: int = 256
    crop: int = 224
    max_pixels: int = DEFAULT_MAX_PIXELS
    interpolation: str = "bilinear"  # a PIL resampling filter's name; `to_tensor` resizes with exactly this one
    draft: bool = True  # let libjpeg decode big JPEGs at a reduced scale (see `load`)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def of(cls, spec) -> Preprocess:
        """The preprocessing an EncoderSpec records (the normalisation is its arch's family's)."""
        family = family_of(spec.arch)
        return cls(resize=spec.resize, crop=spec.crop, interpolation=spec.interpolation, draft=spec.draft,
                   mean=family.MEAN, std=family.STD)

    def describe(self) -> dict:
        """What the cache records about its preprocessing: this object's own fields, so it cannot drift.
        `geometry` names the resize/crop arithmetic (torchvision's), which decides the pixels as much."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "max_pixels": self.max_pixels,
                "draft": self.draft, "geometry": "torchvision"}

    def check_size(self, w: int, h: int) -> None:
        """Refuse (ValueError, recorded as a bad image) a w x h picture too large or too thin to resize sanely:
        every decode path (PIL here, the GPU's in gpu_decode) asks before it decodes."""
        if w * h > self.max_pixels:
            raise ValueError(f"image too large ({w}x{h} pixels, limit {self.max_pixels})")
        check_aspect(w, h)

    def load(self, path: str) -> Image.Image:
        """Decode `path` to an RGB PIL image, upright (EXIF), at the smallest size that still covers `resize`."""
        with warnings.catch_warnings(), open_regular(path) as fp:
            # PIL warns (rather than raises) between max_pixels and 2x max_pixels: treat both as refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                raise ValueError(f"image too large ({e})") from None
            except Image.UnidentifiedImageError:  # PIL names the descriptor it was given: name the file
                raise Image.UnidentifiedImageError(f"cannot identify image file {path!r}") from None
            w, h = img.size
            self.check_size(w, h)
            source = img.size
            if self.draft and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers `resize`:
                # the shorter side stays >= resize, so the crop shows the same part of the picture (the
                # pixels differ a little from a full decode: see README, "draft").
                img.draft("RGB", (self.resize, self.resize))
            img.load()
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width/height
            img = to_rgb(ImageOps.exif_transpose(img))
            if img.size != (source[1] if turned else source[0], source[0] if turned else source[1]):
                # drafted: `to_tensor` takes the resize and crop geometry from the full-size picture
                img.info["source_size"] = (source[1], source[0]) if turned else source
            return img

    def geometry(self, w: int, h: int) -> tuple[int, int, int, int]:
        """A w x h picture's resized size and crop offset (nw, nh, left, top), as torchvision computes them:
        the long side floor(resize * long / short), the offsets round((size - crop) / 2). The PIL and the
        GPU paths both take it from here."""
        short, long = min(w, h), max(w, h)
        new_long = int(self.resize * long / short)  # as torchvision computes it (floor)
        nw, nh = (self.resize, new_long) if w <= h else (new_long, self.resize)
        return nw, nh, int(round((nw - self.crop) / 2.0)), int(round((nh - self.crop) / 2.0))

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor (3, crop, crop), pixel-identical to torchvision's
        Resize(resize, interpolation, antialias=True) + CenterCrop(crop) on the same PIL image: the long
        side is floor(resize * long / short), the crop offset round((size - crop) / 2).
        A drafted image (see `load`) is resized to the size its full-size source would get."""
        nw, nh, left, top = self.geometry(*img.info.get("source_size", img.size))
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), Image.Resampling[self.interpolation.upper()])
        img = img.crop((left, top, left + self.crop, top + self.crop))
        arr = np.asarray(img, dtype=np.uint8)  # (crop, crop, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, crop, crop)

    def __call__(self, path: str) -> tuple[torch.Tensor, str]:
        """Never raises: (uint8 (3, crop, crop), "") on success, (zeros, reason) on failure."""
        try:
            return self.to_tensor(self.load(path)), ""
        except Exception as e:  # noqa: BLE001 - any decode failure is recorded, not fatal
            reason = f"{type(e).__name__}: {e}".strip()
            return torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), reason[:300]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white, 16-bit/float scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """Paths -> (row index, uint8 image, error reason). Safe in any number of worker processes."""

    def __init__(self, paths: list[str], preprocess: Preprocess):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        image, error = self.preprocess(self.paths[i])
        return i, image, error


def start_loader(dataset: torch.utils.data.Dataset, batches: list[list[int]], workers: int, collate_fn,
                 pin_memory: bool = False):
    """An iterator over `dataset` in `batches`, decoded by `workers` DataLoader processes that start at once
    and keep 4 batches each in flight. Shared by the PIL and the GPU decode paths."""
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                                            pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None))


def collate(batch: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    rows = torch.tensor([b[0] for b in batch], dtype=torch.long)  # (B,)
    images = torch.stack([b[1] for b in batch])  # (B, 3, S, S) uint8
    return rows, images, [b[2] for b in batch]


def image_batches(paths: list[str], preprocess: Preprocess, batches: list[list[int]], device: torch.device,
                  workers: int, gpu_decode: bool = False):
    """An iterator of (rows (B,) int64, uint8 images (B, 3, S, S), errors [str]), decoded batch by batch in
    `workers` DataLoader processes; with `gpu_decode` on CUDA the workers only read JPEG bytes and the GPU
    decodes them (see gpu_decode). The workers start at once: made before the encoder is built, they decode
    the first batches while the main process imports torchvision and builds the network (~1.5 s)."""
    if gpu_decode and device.type == "cuda":
        from pipeline.encoder.gpu_decode import gpu_batches

        return gpu_batches(paths, preprocess, batches, device, workers)
    return start_loader(ImageFiles(paths, preprocess), batches, workers, collate, pin_memory=device.type == "cuda")
