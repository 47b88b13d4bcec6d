"""Preprocessing follows the weights' recipe and matches torchvision's reference transform pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.core.cache import EncoderSpec
from pipeline.core.errors import PipelineError
from pipeline.encoder.encoder import make_spec
from pipeline.encoder.images import Preprocess
from pipeline.extract.config import ExtractConfig

ODD_SIZES = [(640, 427), (427, 640), (301, 299), (1001, 257), (257, 1001), (233, 233), (500, 333), (97, 800)]


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth random colours plus fine noise: every resampling difference shows in the pixels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noise = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def reference(path, resize: int, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """torchvision's own evaluation transform of the PIL image: (3, crop, crop) uint8."""
    mode = v2.InterpolationMode(interpolation)
    t = v2.Compose([v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(crop), v2.PILToTensor()])
    with Image.open(path) as img:
        return t(img.convert("RGB"))


@pytest.mark.parametrize("resize,crop,interpolation", [(256, 224, "bilinear"), (232, 224, "bilinear"),
                                                       (128, 112, "bilinear"), (72, 64, "bicubic")])
def test_pixel_identical_to_torchvision(tmp_path, resize, crop, interpolation):
    pre = Preprocess(resize=resize, crop=crop, interpolation=interpolation)
    for k, size in enumerate(ODD_SIZES):
        png = tmp_path / f"p{k}.png"
        picture(size, k).save(png)
        jpg = tmp_path / f"j{k}.jpg"
        picture(size, k).save(jpg, quality=90)
        for path, p in ((png, pre), (jpg, Preprocess(resize=resize, crop=crop, interpolation=interpolation,
                                                    draft=False))):
            ours, err = p(str(path))
            assert err == ""
            assert torch.equal(ours, reference(path, resize, crop, interpolation)), (path.name, size)


def test_640x427_geometry_matches_torchvision(tmp_path):
    """The issue's example: 640x427 at 256 is 383 wide (floor), not 384; the crop offset is rounded."""
    picture((640, 427), 0).save(tmp_path / "a.png")
    pre = Preprocess(resize=256, crop=224)
    img = pre.load(str(tmp_path / "a.png"))
    resized = v2.Resize(256, antialias=True)(img)
    assert resized.size == (383, 256)
    assert torch.equal(pre.to_tensor(img), v2.PILToTensor()(v2.CenterCrop(224)(resized)))


def test_draft_keeps_geometry_and_can_be_switched_off(tmp_path):
    picture((1601, 1067), 3).save(tmp_path / "big.jpg", quality=95)
    drafted_pre, full_pre = Preprocess(resize=232, crop=224), Preprocess(resize=232, crop=224, draft=False)
    drafted_img = drafted_pre.load(str(tmp_path / "big.jpg"))
    assert drafted_img.size[0] < 1601 and drafted_img.info["source_size"] == (1601, 1067)
    full = full_pre(str(tmp_path / "big.jpg"))[0]
    assert torch.equal(full, reference(tmp_path / "big.jpg", 232, 224))  # draft off: torchvision's pixels
    drafted = drafted_pre(str(tmp_path / "big.jpg"))[0]
    diff = (drafted.float() - full.float()).abs().mean()
    assert 0 < diff < 6.0  # same part of the picture, slightly different pixels


def test_draft_with_exif_rotation_keeps_upright_geometry(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    picture((1600, 1000), 4).save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = Preprocess(resize=200, crop=180).load(str(tmp_path / "r.jpg"))
    assert img.size[1] > img.size[0] and img.info["source_size"] == (1000, 1600)
    full = Preprocess(resize=200, crop=180, draft=False)(str(tmp_path / "r.jpg"))[0]
    drafted = Preprocess(resize=200, crop=180)(str(tmp_path / "r.jpg"))[0]
    assert (drafted.float() - full.float()).abs().mean() < 6.0


def test_recipe_comes_from_the_weights():
    v2_spec = make_spec("resnet152", "imagenet")  # torchvision's DEFAULT = IMAGENET1K_V2
    assert v2_spec.weights.endswith("IMAGENET1K_V2") and (v2_spec.resize, v2_spec.crop) == (232, 224)
    assert v2_spec.interpolation == "bilinear" and v2_spec.draft
    v1 = make_spec("resnet50", "IMAGENET1K_V1")
    assert v1.weights.endswith("IMAGENET1K_V1") and (v1.resize, v1.crop) == (256, 224)
    assert make_spec("resnet101", "DEFAULT") == make_spec("resnet101", "imagenet")
    assert (make_spec("resnet18", "imagenet").resize, make_spec("resnet18", "none").resize) == (256, 256)
    over = make_spec("resnet50", "imagenet", resize=128, crop=112, interpolation="bicubic", draft=False)
    assert (over.resize, over.crop, over.interpolation, over.draft) == (128, 112, "bicubic", False)
    with pytest.raises(PipelineError, match="resnet18 has torchvision weights IMAGENET1K_V1 "):
        make_spec("resnet18", "IMAGENET1K_V2")
    cfg = ExtractConfig()
    assert cfg.resize is None and cfg.crop is None and cfg.interpolation is None


def test_old_encoder_records_still_load():
    old = {"arch": "resnet18", "weights": "none:seed=0", "weights_sha256": "", "weights_path": "", "resize": 256,
           "crop": 224, "feature_dim": 512}
    spec = EncoderSpec.from_dict(old)
    assert spec.interpolation == "bilinear" and spec.draft is True
    pre = Preprocess.of(spec)
    assert (pre.resize, pre.crop, pre.interpolation, pre.draft) == (256, 224, "bilinear", True)
    assert EncoderSpec.from_dict({**old, "draft": np.bool_(False)}).draft is False
