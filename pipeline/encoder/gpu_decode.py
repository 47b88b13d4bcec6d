"""JPEG decoding on the GPU for `extract` on CUDA, with the PIL path as the fallback.

At COCO scale on a GPU, PIL decoding on the CPU (several ms of one core per 640x480 JPEG) is the
bottleneck, not the network. Here DataLoader workers only read the file bytes and look at the JPEG
header; the main process decodes a whole batch with nvJPEG (`torchvision.io.decode_jpeg(list, device=...)`),
resizes the shorter side to `resize` (bilinear, antialiased) and center-crops `crop` on the device.

Routed to the CPU decoder (`Preprocess`, the PIL path, whose bad-image recording is unchanged): anything
that is not a baseline/extended-sequential JPEG with 1 or 3 components, i.e. PNG and other formats,
progressive JPEGs, CMYK/YCCK (4 components), files with an EXIF orientation other than 1 (PIL turns
them upright), images over `max_pixels`, and any file the batched decode fails on.

Agreement with the PIL path (tests/test_gpu_decode.py, checked with device="cpu", which runs the same
code on torchvision's CPU decoder): mean absolute pixel difference at most 3 (of 255) per image (PIL
decodes large JPEGs at a reduced DCT scale and resizes in 8-bit; here the full decode is resized in
float), and pooled resnet18 features (weights none) with cosine similarity above 0.99.
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

from pipeline.encoder.images import Preprocess, open_regular, start_loader

_SOF_BASELINE = (0xC0, 0xC1)  # baseline, extended sequential Huffman: what nvJPEG decodes
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # progressive, lossless, arithmetic


def jpeg_info(data: bytes) -> tuple[int, int, int, str]:
    """(width, height, components, "") of a JPEG the GPU decodes, or (0, 0, 0, why not) for the CPU path."""
    if data[:2] != b"\xff\xd8":
        return 0, 0, 0, "not a JPEG"
    i, orientation = 2, 1
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return 0, 0, 0, "bad JPEG marker"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        size = struct.unpack(">H", data[i + 2:i + 4])[0]
        seg = data[i + 4:i + 2 + size]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(seg[6:])
        elif marker in _SOF_OTHER:
            return 0, 0, 0, "progressive or non-baseline JPEG"
        elif marker in _SOF_BASELINE:
            if len(seg) < 6:
                return 0, 0, 0, "truncated JPEG header"
            h, w, comps = struct.unpack(">HHB", seg[1:6])
            if comps not in (1, 3):
                return 0, 0, 0, f"{comps}-component JPEG (CMYK/YCCK)"
            if orientation != 1:
                return 0, 0, 0, f"EXIF orientation {orientation}"
            return w, h, comps, ""
        elif marker == 0xDA:
            break
        i += 2 + size
    return 0, 0, 0, "no frame header"


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of IFD0 of an EXIF TIFF block; 1 when absent or unreadable."""
    try:
        end = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(end + "I", tiff[4:8])
        (n,) = struct.unpack(end + "H", tiff[ifd:ifd + 2])
        for k in range(n):
            tag, _, _, value = struct.unpack(end + "HHIH", tiff[ifd + 2 + 12 * k: ifd + 2 + 12 * k + 10])
            if tag == 0x0112:
                return value
    except (KeyError, struct.error):
        pass
    return 1


class JpegFiles(torch.utils.data.Dataset):
    """Paths -> (row, ("jpeg", file bytes uint8 (n,)) or ("image", uint8 (3, crop, crop)), error).

    Workers read the bytes of a JPEG the GPU can decode; anything else is decoded here, on the CPU,
    exactly as `ImageFiles` does (so failures carry the same reasons)."""

    def __init__(self, paths: list[str], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with open_regular(self.paths[i]) as f:  # never a FIFO or device: those would block or never end
                data = f.read()
            w, h, _, why = jpeg_info(data)
            if not why and w > 0 and h > 0:
                self.preprocess.check_size(w, h)
                return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), ""
        except (OSError, ValueError):
            pass  # the CPU path records why (it refuses a FIFO or device by its kind, as open_regular does)
        image, error = self.preprocess(self.paths[i])
        return i, ("image", image), error


def collate_jpeg(batch):
    rows = torch.tensor([b[0] for b in batch], dtype=torch.long)  # (B,)
    return rows, [b[1] for b in batch], [b[2] for b in batch]


def resize_crop(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> uint8 (3, crop, crop): the shorter side to `resize` (bilinear,
    antialiased), then the center crop, with the same sizes and offsets as Preprocess.to_tensor."""
    h, w = image.shape[-2:]
    nw, nh, left, top = preprocess.geometry(w, h)
    x = image
    if (nw, nh) != (w, h):
        x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x[:, top:top + preprocess.crop, left:left + preprocess.crop]


def decode_batch(items: list, paths: list[str], rows: torch.Tensor, errors: list[str], preprocess: Preprocess,
                 device: torch.device) -> torch.Tensor:
    """A collated batch -> uint8 (B, 3, crop, crop) on `device`; `errors` is updated in place.

    JPEG bytes are decoded together on `device` (nvJPEG on CUDA, libjpeg with device="cpu"); when the
    batched call fails, each is tried alone, and one that still fails goes through the PIL path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = torch.empty(len(items), 3, preprocess.crop, preprocess.crop, dtype=torch.uint8, device=device)
    jpeg = [j for j, (kind, _) in enumerate(items) if kind == "jpeg"]
    for j, (kind, t) in enumerate(items):
        if kind == "image":
            out[j] = t.to(device, non_blocking=True)
    decoded: dict[int, torch.Tensor | None] = {}
    if jpeg:
        data = [items[j][1] for j in jpeg]
        try:
            decoded = dict(zip(jpeg, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:
            for j, d in zip(jpeg, data):
                try:
                    decoded[j] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    decoded[j] = None
    for j, image in decoded.items():
        if image is None:  # the GPU decoder refused it: PIL decides, and records why if it fails too
            cpu, errors[j] = preprocess(paths[int(rows[j])])
            out[j] = cpu.to(device)
        else:
            out[j] = resize_crop(image, preprocess)
    return out


def gpu_batches(paths: list[str], preprocess: Preprocess, batches: list[list[int]], device: torch.device,
                workers: int):
    """An iterator of (rows (B,) int64, uint8 (B, 3, crop, crop) on `device`, errors) like ImageFiles' loader;
    its workers start reading at once (see images.image_batches)."""
    loader = start_loader(JpegFiles(paths, preprocess), batches, workers, collate_jpeg)

    def decoded():
        for rows, items, errors in loader:
            yield rows, decode_batch(items, paths, rows, errors, preprocess, device), errors

    return decoded()
