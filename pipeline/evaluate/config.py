"""evaluate's settings (params.yaml section `evaluate`): defined in pipeline.decoder.decode, beside the decoding
settings, because caption reads the same section and no stage package imports another."""

from pipeline.decoder.decode import EvaluateConfig

__all__ = ["EvaluateConfig"]
