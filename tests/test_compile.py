"""torch.compile of the frozen encoder: when `auto` compiles, that plain, folded and compiled encoders give
the same features, and that a cache extracted compiled is the same cache (record, up to date, features)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_cache, relative_diff
from conftest import run_extract as extract

from pipeline.core.errors import PipelineError
from pipeline.encoder import compiled
from pipeline.encoder.compiled import Compiled, decide, maybe_compile
from pipeline.encoder.encoder import build_encoder, make_spec, set_layout
from pipeline.extract.config import ExtractConfig

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_compiles_only_runs_that_repay_it():
    assert decide("auto", CPU, 10**9)[0] is False  # compiled, neither family was reliably faster on the CPU
    least = compiled.MIN_IMAGES["cuda"]
    assert decide("auto", CUDA, least - 1)[0] is False
    on, why = decide("auto", CUDA, least)
    assert on and str(least) in why
    assert decide("auto", CUDA, 123_287)[0] is False  # COCO does not repay it
    assert decide("true", CPU, 1)[0] is True and decide("false", CUDA, 10**9)[0] is False
    encoder = torch.nn.Identity()
    assert maybe_compile(encoder, "auto", CPU, 123_287, 64)[:2] == (encoder, False)


def test_yaml_bools_name_the_choices():
    cfg = ExtractConfig(compile=True)  # params.yaml's `compile: true` arrives as a bool
    cfg.check()
    assert cfg.compile == "true"
    with pytest.raises(PipelineError, match="compile"):
        ExtractConfig(compile="sometimes").check()


def test_plain_folded_and_compiled_features_agree(one_thread):
    spec = make_spec("resnet18", "none", 72, 64, grid_size=2)
    plain = set_layout(build_encoder(spec, fold=False), channels_last=True)
    folded = set_layout(build_encoder(spec), channels_last=True)
    fast = Compiled(set_layout(build_encoder(spec), channels_last=True), batch_size=4)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = plain(images)  # (5, 1 + 4, 512): pooled and the 2x2 grid
        got_folded = folded(images)
        got = torch.cat([fast(images[:4]), fast(images[4:])])  # the last batch is padded to the compiled size
    assert fast.compile_seconds is not None and got.shape == want.shape == (5, 5, 512)
    assert relative_diff(got_folded, want) < 1e-5 and relative_diff(got, want) < 1e-5


def test_failed_compile_falls_back_or_says_what_to_do(monkeypatch):
    def broken(module, **kwargs):
        def run(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    encoder, notes = torch.nn.Linear(3, 2), []
    x = torch.randn(2, 3)
    soft = Compiled(encoder, batch_size=2, fallback=True, log=notes.append)
    assert torch.equal(soft(x), encoder(x)) and soft.eager and "eagerly" in notes[0]
    with pytest.raises(PipelineError, match="compile false") as e:
        Compiled(encoder, batch_size=2)(x)
    assert "\n" not in str(e.value)


def test_compiled_extract_is_the_same_cache(prepared_cache):
    eager = extract(prepared_cache, out=prepared_cache / "eager.h5", **SMALL, compile="false")
    fast = extract(prepared_cache, out=prepared_cache / "compiled.h5", **SMALL, compile="true")
    assert eager.computed == fast.computed > 0
    assert_same_cache(prepared_cache / "eager.h5", prepared_cache / "compiled.h5")
    again = extract(prepared_cache, out=prepared_cache / "eager.h5", **SMALL, compile="true")
    assert again.up_to_date  # switching the setting never forces a rebuild
