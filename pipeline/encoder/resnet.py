"""The ResNet family: torchvision's resnet18 ... resnet152 (the names of family.Family).

The classifier head (avgpool, fc) is dropped: the backbone gives the last block's map (512 channels for
resnet18/34, 2048 for resnet50/101/152), which the encoder pools. Published weights are torchvision's ImageNet ones,
normalised with the ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.encoder.family import IMAGENET_MEAN, IMAGENET_STD

NAME = "resnet"
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


def named_weights(arch: str, weights: str) -> str | None:
    enum = torchvision_weights(arch, weights)
    return None if enum is None else f"imagenet:{enum}"


def torchvision_weights(arch: str, weights: str):
    """torchvision's weights enum that `weights` names ('imagenet' and 'DEFAULT': the arch's default, or
    'IMAGENET1K_V1', 'IMAGENET1K_V2', any case), or None when it names none of them. Nothing is downloaded."""
    name = weights.upper()
    if name != "IMAGENET" and name != "DEFAULT" and not name.startswith("IMAGENET1K"):
        return None
    import torchvision  # here, not at the top: importing it costs ~2 s that train and evaluate never need

    enum = torchvision.models.get_model_weights(arch)
    if name in ("IMAGENET", "DEFAULT"):
        return enum.DEFAULT
    if name not in enum.__members__:
        names = [n for n in enum.__members__ if n != "DEFAULT"]
        raise PipelineError(f"--weights {weights!r}: {arch} has torchvision weights {', '.join(names)} "
                            f"(or 'imagenet' / 'DEFAULT' for {enum.DEFAULT.name})")
    return enum[name]


def recipe(arch: str, weights: str) -> tuple[int, int, str]:
    """torchvision's own evaluation transforms of the weights (`weights.transforms()`, e.g. 232/224 bilinear
    for resnet50-152's IMAGENET1K_V2), else the classic ImageNet 256/224 bilinear (random init, a local
    state-dict file)."""
    enum = torchvision_weights(arch, weights)
    if enum is None:
        return 256, 224, "bilinear"
    t = enum.transforms()
    return int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value


def backbone(arch: str, named: str | None) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, arch)
    if named is None:
        return _headless(builder(weights=None))
    enum = getattr(torchvision.models.get_model_weights(arch), named.split(".")[-1])
    try:
        return _headless(builder(weights=enum))
    except Exception as e:  # noqa: BLE001 - network/cache failures surface as one clear message
        raise PipelineError(f"could not load torchvision's {enum} weights ({type(e).__name__}: {e}). They are "
                            f"downloaded once into torchvision's cache: check the network, or pass "
                            f"--weights PATH to a local state-dict file, or --weights none") from None


def load_state(arch: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    import torchvision

    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model = getattr(torchvision.models, arch)(weights=None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]  # the classifier is never run
        problem = f"{len(missing)} missing keys, e.g. {missing[:2]}, {len(unexpected)} unexpected, e.g. {unexpected[:2]}"
    except RuntimeError:  # shapes differ: torch's message is many lines long
        missing, unexpected = ["(tensor shapes differ)"], []
        problem = "its tensors have other shapes"
    if missing or unexpected:
        fits = arch_of_state(state)
        hint = f"it holds {fits} weights: pass --arch {fits}" if fits else \
            f"pass the weights of a torchvision {arch}, saved with torch.save(model.state_dict(), path)"
        raise PipelineError(f"{path} does not fit {arch} ({problem}): {hint}")
    return _headless(model)


def arch_of_state(state: dict) -> str | None:
    """The torchvision ResNet whose tensors (names and shapes, fc aside) are exactly those of `state`, if any."""
    import torchvision

    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    for arch in FEATURE_DIMS:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            model = getattr(torchvision.models, arch)(weights=None)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}
        if want == shapes:
            return arch
    return None


class FeatureMap(nn.Module):
    """A torchvision ResNet up to its last block: normalised images (B, 3, S, S) -> map (B, D, S/32, S/32)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def _headless(model: nn.Module) -> nn.Module:
    return FeatureMap(model)  # avgpool and fc (1000 class scores) are never run
