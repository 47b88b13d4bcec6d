"""The frozen encoder: uint8 images -> pooled feature vectors (and region grids), rebuilt from its record (EncoderSpec).

What differs between networks (the archs, their published weights and recipe, the backbone, the
normalisation) is the arch's family's (family.py; archs.py lists them). What is here is shared by every
family: resolving --weights to a record, rebuilding the record (a weights file checked against its
sha256), normalising on the device, and encoding batches. Normalisation lives inside the module, so
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
from pipeline.core.runtime import autocast, tune
from pipeline.encoder.archs import family_of

RANDOM_INIT_SEED = 0


class Encoder(nn.Module):
    """uint8 images (B, 3, S, S) -> features float32: pooled (B, D), or with `grid_size` G > 0 (B, 1 + G*G, D),
    row 0 the pooled feature and rows 1.. the map average-pooled to G x G regions, row-major (what the
    attention decoder reads; pipeline.decoder.data.image_inputs gives cached features the same form).
    Frozen, always in eval mode.

    `backbone` maps normalised images to the last map (B, D, h, w); `mean` and `std` (per channel, pixels in [0, 1]) are its
    family's normalisation. `channels_last` (see `set_layout`) says which memory layout the convolutions
    run in; the weights must be in the same layout (`load_encoder` does both). channels_last is the default
    on every device: on CUDA it feeds the tensor cores, and on the CPU oneDNN's NHWC convolutions were
    faster too (resnet18, batch 64, 224 crops, 2 cores, heap allocations: 56.0 images/s vs 46.6 in NCHW;
    `pipeline bench extract` times both). Features differ between layouts only at float rounding (~1e-6).
    """

    channels_last: bool = True

    def __init__(self, backbone: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float],
                 grid_size: int = 0):
        super().__init__()
        self.backbone = backbone
        self.grid_size = grid_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # frozen: BatchNorm must keep its running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # (B, 3, S, S)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.backbone(x).float()  # (B, D, h, w)
        pooled = fmap.mean((2, 3))  # (B, D)
        if not self.grid_size:
            return pooled
        if fmap.shape[-2:] != (self.grid_size, self.grid_size):  # a G x G map is its own grid, exactly (and
            fmap = nn.functional.adaptive_avg_pool2d(fmap, self.grid_size)  # exports to ONNX where pooling may not)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, G*G, D)
        return torch.cat([pooled.unsqueeze(1), grid], 1)  # (B, 1 + G*G, D)


def set_layout(encoder: Encoder, channels_last: bool) -> Encoder:
    """Run `encoder` in channels_last (NHWC) or NCHW: its weights and its inputs both change layout."""
    encoder.channels_last = channels_last
    return encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def resolve_weights(arch: str, weights: str) -> tuple[str, str, str]:
    """The user's --weights value -> (description, sha256, path) without loading anything."""
    if weights == "none":
        return f"none:seed={RANDOM_INIT_SEED}", "", ""
    named = family_of(arch).named_weights(arch, weights)
    if named is not None:
        return named, "", ""
    path = Path(weights)
    if not path.is_file():
        raise PipelineError(f"--weights {weights!r}: no such file. Use 'imagenet' (or IMAGENET1K_V1, IMAGENET1K_V2, "
                            f"DEFAULT), 'none', or a path to a "
                            f"{arch} state-dict file")
    return f"file:{path.name}", sha256_file(path), str(path.resolve())


def make_spec(arch: str, weights: str, resize: int | None = None, crop: int | None = None,
              interpolation: str | None = None, draft: bool = True, grid_size: int = 0) -> EncoderSpec:
    """The EncoderSpec of these settings: resize, crop and interpolation left None follow the weights' recipe."""
    family = family_of(arch)
    desc, sha, path = resolve_weights(arch, weights)
    r, c, i = family.recipe(arch, weights)
    resize, crop, interpolation = resize or r, crop or c, interpolation or i
    if crop <= 0 or resize < crop:
        raise PipelineError(f"bad preprocessing sizes resize={resize}, crop={crop}: need resize >= crop > 0")
    return EncoderSpec(arch, desc, sha, path, resize, crop, family.FEATURE_DIMS[arch], interpolation, draft,
                       family.NAME, grid_size)


def build_encoder(spec: EncoderSpec, weights_file: str | os.PathLike | None = None, fold: bool = True,
                  grid_size: int | None = None) -> Encoder:
    """Build the frozen encoder that `spec` describes (the weights file is checked against its sha256), its
    BatchNorm folded (`fold=False` keeps it: what `bench extract` compares the folded network with), giving
    G x G grids for `grid_size` G (default: the spec's; 0: pooled features only)."""
    family = family_of(spec.arch)
    kind, _, named = spec.weights.partition(":")
    if kind == "none":
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(int(named.split("seed=", 1)[1]))
            backbone = family.backbone(spec.arch, None)
    elif kind == "imagenet":
        backbone = family.backbone(spec.arch, named)
    else:
        path = _weights_file(spec, weights_file)
        backbone = family.load_state(spec.arch, _read_state(path), path)
    grid = spec.grid_size if grid_size is None else grid_size
    return Encoder(fold_batchnorm(backbone) if fold else backbone, family.MEAN, family.STD, grid)


def fold_batchnorm(backbone: nn.Module) -> nn.Module:
    """Each BatchNorm folded into the convolution before it (torch.fx's conv-bn fuser), as the frozen encoder
    allows: the same features up to float rounding (~1e-6), one layer less to run per convolution. A backbone
    without BatchNorm layers (EfficientNet-Lite folds its own) is returned as it is."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return backbone
    from torch.fx.experimental.optimization import fuse

    return fuse(backbone.eval(), inplace=True)  # the backbone was just built for this encoder: no copy needed


def _weights_file(spec: EncoderSpec, weights_file: str | os.PathLike | None) -> Path:
    """Where the weights file `spec` records is (`weights_file`, else where it was), checked by its sha256."""
    path = Path(weights_file or spec.weights_path)
    if not path.is_file():
        raise PipelineError(f"the encoder weights file {spec.weights.split(':', 1)[1]} (sha256 {spec.weights_sha256[:12]}…) "
                            f"is not at {path}: pass its path with --encoder-weights")
    if sha256_file(path) != spec.weights_sha256:
        raise PipelineError(f"{path} is not the weights file the features were made with (sha256 differs)")
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` (also one saved as {"state_dict": ...} or from DataParallel: "module." names)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot read {path} as a state dict ({type(e).__name__}): save it with "
                            f"torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PipelineError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_encoder(spec: EncoderSpec, device: torch.device, weights_file=None, grid_size: int | None = None) -> Encoder:
    """`spec`'s encoder on `device`, in channels_last (why: Encoder's doc), with the kernels tuned for fixed shapes."""
    tune(device, fixed_shapes=True)  # every batch is (B, 3, crop, crop)
    return set_layout(build_encoder(spec, weights_file, grid_size=grid_size).to(device), channels_last=True)


def encode_images(encoder: nn.Module, images, device: torch.device, amp: str = "auto"):
    """Run `encoder` over `images` (from images.image_batches), batch by batch. Shared by `extract` and `caption`.

    Yields (rows (B,) int64 numpy, features (B, D) or (B, 1 + G*G, D) float32 numpy, errors [str]); rows that
    failed to decode carry zeros and their reason."""
    with torch.inference_mode(), autocast(device, amp):
        for rows, batch, errs in images:
            batch = batch.to(device, non_blocking=True)  # (B, 3, S, S) uint8
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            feats = encoder(batch).cpu().numpy()  # (B, D) or (B, 1 + G*G, D) float32
            for j, err in enumerate(errs):
                if err:
                    feats[j] = 0
            yield rows.numpy(), feats, errs
