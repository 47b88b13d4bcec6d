"""The frozen encoder runs with each BatchNorm folded into its convolution: the same features within float16
storage rounding, the same record, so caches made before folding stay valid."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.encoder import resnet
from pipeline.encoder.encoder import Encoder, build_encoder, fold_batchnorm, make_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folded_resnet_features_equal_the_plain_network_within_float16(arch):
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in build_encoder(make_spec(arch, "none", 72, 64)).modules())
    plain = Encoder(resnet.backbone(arch, None), resnet.MEAN, resnet.STD)
    for m in plain.modules():  # running statistics that are not trivial: a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            g = torch.Generator().manual_seed(m.num_features)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    folded = Encoder(fold_batchnorm(copy.deepcopy(plain.backbone)), resnet.MEAN, resnet.STD)
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = folded(x).numpy(), plain(x).numpy()
    assert np.abs(a - b).max() <= np.abs(b).max() * 2**-11  # float16 keeps 11 bits: the cache cannot tell them apart


def test_the_record_does_not_change_with_folding():
    spec = make_spec("resnet18", "none", 72, 64)
    assert "fold" not in str(spec.as_dict()) and spec.identity() == make_spec("resnet18", "none", 72, 64).identity()
