"""The encoder families and the archs each builds: a new family (one module, like resnet.py) joins here."""

from __future__ import annotations

from pipeline.core.errors import PipelineError
from pipeline.encoder import efficientnet_lite, resnet
from pipeline.encoder.family import Family

FAMILIES: tuple[Family, ...] = (resnet, efficientnet_lite)
ARCHS = tuple(arch for family in FAMILIES for arch in family.FEATURE_DIMS)


def family_of(arch: str) -> Family:
    """The family that builds `arch`; PipelineError for an arch no family builds."""
    for family in FAMILIES:
        if arch in family.FEATURE_DIMS:
            return family
    raise PipelineError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
