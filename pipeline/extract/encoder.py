"""The frozen ImageNet ResNet that turns images into pooled feature vectors.

The classifier head is dropped; a feature is the global-average-pooled output of the last block
(512 values for resnet18/34, 2048 for resnet50/101/152). Normalization lives inside the module so
callers feed uint8 batches straight from the DataLoader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.core.cache import EncoderSpec
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import sha256_file
from pipeline.extract.images import IMAGENET_MEAN, IMAGENET_STD

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
RANDOM_INIT_SEED = 0


class Encoder(nn.Module):
    """uint8 images (B, 3, S, S) -> features (B, D) float32. Frozen, always in eval mode.

    `channels_last` (see `set_layout`) says which memory layout the convolutions run in; the weights
    must be in the same layout (`load_encoder` does both). channels_last is the default on every device:
    on CUDA it feeds the tensor cores, and on the CPU oneDNN's NHWC convolutions were faster too
    (resnet18, batch 64, 224 crops, 2 cores, heap allocations: 56.0 images/s vs 46.6 in NCHW;
    `pipeline bench extract` times both). Features differ between layouts only at float rounding (~1e-6).
    """

    channels_last: bool = True

    def __init__(self, backbone: nn.Module):
        super().__init__()
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # frozen: BatchNorm must keep its running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # (B, 3, S, S)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).float()  # (B, D)


def set_layout(encoder: Encoder, channels_last: bool) -> Encoder:
    """Run `encoder` in channels_last (NHWC) or NCHW: its weights and its inputs both change layout."""
    encoder.channels_last = channels_last
    return encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def resolve_weights(arch: str, weights: str) -> tuple[str, str, str]:
    """The user's --weights value -> (description, sha256, path) without loading anything."""
    if weights == "none":
        return f"none:seed={RANDOM_INIT_SEED}", "", ""
    enum = torchvision_weights(arch, weights)
    if enum is not None:
        return f"imagenet:{enum}", "", ""
    path = Path(weights)
    if not path.is_file():
        raise PipelineError(f"--weights {weights!r}: no such file. Use 'imagenet' (or IMAGENET1K_V1, IMAGENET1K_V2, "
                            f"DEFAULT), 'none', or a path to a "
                            f"{arch} state-dict file")
    return f"file:{path.name}", sha256_file(path), str(path.resolve())


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


def weights_recipe(arch: str, weights: str) -> tuple[int, int, str]:
    """(resize, crop, interpolation) of the evaluation transforms the weights were made for: torchvision's
    own (`weights.transforms()`, e.g. 232/224 bilinear for resnet50-152's IMAGENET1K_V2), else the classic
    ImageNet 256/224 bilinear (random init, a local state-dict file)."""
    enum = torchvision_weights(arch, weights)
    if enum is None:
        return 256, 224, "bilinear"
    t = enum.transforms()
    return int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value


def make_spec(arch: str, weights: str, resize: int | None = None, crop: int | None = None,
              interpolation: str | None = None, draft: bool = True) -> EncoderSpec:
    """The EncoderSpec of these settings: resize, crop and interpolation left None follow the weights' recipe."""
    if arch not in FEATURE_DIMS:
        raise PipelineError(f"unknown --arch {arch!r}: choose one of {', '.join(FEATURE_DIMS)}")
    desc, sha, path = resolve_weights(arch, weights)
    r, c, i = weights_recipe(arch, weights)
    resize, crop, interpolation = resize or r, crop or c, interpolation or i
    if crop <= 0 or resize < crop:
        raise PipelineError(f"bad preprocessing sizes resize={resize}, crop={crop}: need resize >= crop > 0")
    return EncoderSpec(arch, desc, sha, path, resize, crop, FEATURE_DIMS[arch], interpolation, draft)


def build_encoder(spec: EncoderSpec, weights_file: str | os.PathLike | None = None) -> Encoder:
    """Build the frozen encoder that `spec` describes (the weights file is checked against its sha256)."""
    import torchvision

    builder = getattr(torchvision.models, spec.arch)
    kind = spec.weights.split(":", 1)[0]
    if kind == "none":
        seed = int(spec.weights.split("seed=", 1)[1])
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            return Encoder(builder(weights=None))
    if kind == "imagenet":
        enum_name = spec.weights.split(":", 1)[1].split(".")[-1]
        enum = getattr(torchvision.models.get_model_weights(spec.arch), enum_name)
        try:
            return Encoder(builder(weights=enum))
        except Exception as e:  # noqa: BLE001 - network/cache failures surface as one clear message
            raise PipelineError(f"could not load torchvision's {enum} weights ({type(e).__name__}: {e}). They are "
                                f"downloaded once into torchvision's cache: check the network, or pass "
                                f"--weights PATH to a local state-dict file, or --weights none") from None
    path = Path(weights_file or spec.weights_path)
    if not path.is_file():
        raise PipelineError(f"the encoder weights file {spec.weights.split(':', 1)[1]} (sha256 {spec.weights_sha256[:12]}…) "
                            f"is not at {path}: pass its path with --encoder-weights")
    if sha256_file(path) != spec.weights_sha256:
        raise PipelineError(f"{path} is not the weights file the features were made with (sha256 differs)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot read {path} as a state dict ({type(e).__name__}): save it with "
                            f"torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PipelineError(f"{path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    model = builder(weights=None)
    model.fc = nn.Identity()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        problem = f"{len(missing)} missing keys, e.g. {missing[:2]}, {len(unexpected)} unexpected, e.g. {unexpected[:2]}"
    except RuntimeError:  # shapes differ: torch's message is many lines long
        missing, unexpected = ["(tensor shapes differ)"], []
        problem = "its tensors have other shapes"
    if missing or unexpected:
        fits = arch_of_state(state)
        hint = f"it holds {fits} weights: pass --arch {fits}" if fits else \
            f"pass the weights of a torchvision {spec.arch}, saved with torch.save(model.state_dict(), path)"
        raise PipelineError(f"{path} does not fit {spec.arch} ({problem}): {hint}")
    return Encoder(model)


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
