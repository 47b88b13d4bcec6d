"""GPU JPEG decoding's routing and fallback, run on the CPU (device="cpu": torchvision's CPU JPEG decoder
behind the same code): which files go to the batched decoder and which to PIL, failures recorded as the
PIL path records them, and agreement with the PIL path in pixels and in features."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.encoder.encoder import build_encoder, make_spec
from pipeline.encoder.gpu_decode import JpegFiles, collate_jpeg, decode_batch, gpu_batches, jpeg_info
from pipeline.encoder.images import ImageFiles, Preprocess, collate

CPU = torch.device("cpu")
PRE = Preprocess(resize=128, crop=112)


def photo(path, size=(320, 240), **save) -> str:
    """A smooth photo-like RGB image (gradients and a disc), so resampling differences stay realistic."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    g = 255 * xx / w
    b = np.where((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2, 220, 40 + 150 * yy / h)
    img = Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8), "RGB")
    img.save(path, **{"format": "JPEG", "quality": 92, **save})
    return str(path)


@pytest.fixture
def files(tmp_path):
    rotated = Image.open(photo(tmp_path / "plain.jpg"))
    exif = rotated.getexif()
    exif[0x0112] = 6
    out = {
        "plain": photo(tmp_path / "plain.jpg"),
        "big": photo(tmp_path / "big.jpg", size=(1024, 700)),  # PIL's draft() decodes it at 1/2 scale
        "gray": str(tmp_path / "gray.jpg"),
        "progressive": photo(tmp_path / "progressive.jpg", progressive=True),
        "png": photo(tmp_path / "image.png", format="PNG"),
        "cmyk": str(tmp_path / "cmyk.jpg"),
        "rotated": str(tmp_path / "rotated.jpg"),
        "corrupt": str(tmp_path / "corrupt.jpg"),
        "empty": str(tmp_path / "empty.jpg"),
    }
    Image.open(out["plain"]).convert("L").save(out["gray"], format="JPEG")
    Image.open(out["plain"]).convert("CMYK").save(out["cmyk"], format="JPEG")
    rotated.save(out["rotated"], format="JPEG", exif=exif.tobytes())
    data = open(out["plain"], "rb").read()
    open(out["corrupt"], "wb").write(data[:600] + b"\x00" * 2000)  # valid header, garbage entropy data
    open(out["empty"], "wb").close()
    return out


def test_routing(files):
    """Baseline RGB and grayscale JPEGs go to the batched decoder; the rest to PIL, with a reason."""
    route = {k: jpeg_info(open(p, "rb").read()) for k, p in files.items()}
    assert route["plain"][:3] == (320, 240, 3) and route["plain"][3] == ""
    assert route["big"][:2] == (1024, 700) and route["gray"][2:] == (1, "")
    assert "progressive" in route["progressive"][3]
    assert route["png"][3] == "not a JPEG" and route["empty"][3] == "not a JPEG"
    assert "CMYK" in route["cmyk"][3]
    assert "orientation 6" in route["rotated"][3]
    ds = JpegFiles(list(files.values()), PRE)
    kinds = {k: ds[i][1][0] for i, k in enumerate(files)}
    assert kinds == {"plain": "jpeg", "big": "jpeg", "gray": "jpeg", "progressive": "image", "png": "image",
                     "cmyk": "image", "rotated": "image", "corrupt": "jpeg", "empty": "image"}


def test_failures_recorded_like_the_pil_path(files):
    """A JPEG the decoder rejects falls back to PIL; unreadable files carry PIL's reason and zeros."""
    paths = list(files.values())
    rows, items, errors = collate_jpeg([JpegFiles(paths, PRE)[i] for i in range(len(paths))])
    out = decode_batch(items, paths, rows, errors, PRE, CPU)
    _, ref, ref_errors = collate([ImageFiles(paths, PRE)[i] for i in range(len(paths))])
    assert out.shape == (len(paths), 3, 112, 112) and out.dtype == torch.uint8
    assert [bool(e) for e in errors] == [bool(e) for e in ref_errors]
    assert errors[list(files).index("empty")] == ref_errors[list(files).index("empty")] != ""
    for j, e in enumerate(errors):
        if e:
            assert int(out[j].abs().sum()) == 0


def test_agrees_with_the_pil_path(files):
    """Mean absolute pixel difference <= 3 (of 255) per image, and resnet18 features with cosine > 0.99."""
    names = ["plain", "big", "gray", "progressive", "png", "cmyk", "rotated"]
    paths = [files[k] for k in names]
    got = torch.cat([imgs for _, imgs, _ in gpu_batches(paths, PRE, [list(range(len(paths)))], CPU, workers=0)])
    exact = replace(PRE, draft=False)  # the GPU decodes at full size: compare with PIL's full-size decode
    ref = torch.stack([exact(p)[0] for p in paths])
    mad = (got.float() - ref.float()).abs().mean(dim=(1, 2, 3))
    assert mad.max() <= 3.0, dict(zip(names, mad.tolist()))
    encoder = build_encoder(make_spec("resnet18", "none", 128, 112))
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(encoder(got), encoder(ref))
    assert cos.min() > 0.99, dict(zip(names, cos.tolist()))


def test_resize_crop_sizes_match_the_pil_path(tmp_path):
    """Odd sizes and images already at the crop size get the same output shape and offsets."""
    for size in ((113, 300), (112, 112), (500, 129)):
        p = photo(tmp_path / f"{size[0]}x{size[1]}.jpg", size=size)
        (img,) = [x for _, x, _ in gpu_batches([p], PRE, [[0]], CPU, workers=0)]
        ref = PRE(p)[0]
        assert img.shape == (1, 3, 112, 112)
        assert (img[0].float() - ref.float()).abs().mean() <= 3.0


def test_thin_and_oversized_jpegs_take_the_pil_path_and_its_refusal(tmp_path):
    """The GPU route asks Preprocess.check_size too (found in review: a 1x2000 baseline JPEG went to the
    GPU decoder unchecked), so a thin or oversized JPEG is a bad image with PIL's reason on both paths."""
    thin = str(tmp_path / "thin.jpg")
    Image.new("RGB", (2000, 1), (200, 10, 10)).save(thin, format="JPEG")
    small = replace(PRE, max_pixels=320 * 240 - 1)
    big = photo(tmp_path / "big.jpg")
    for pre, path, reason in ((PRE, thin, "absurd aspect ratio"), (small, big, "image too large")):
        i, (kind, _), error = JpegFiles([path], pre)[0]
        assert kind == "image" and reason in error and error == pre(path)[1]
