"""ONNX Runtime for the frozen encoder (extract.runtime): when `auto` uses it, that its features are eager PyTorch's,
that it falls back or refuses in one line, and that a cache extracted through it is the same cache."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_cache, relative_diff
from conftest import run_extract as extract

from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.encoder import onnx_runtime
from pipeline.encoder.encoder import build_encoder, make_spec, set_layout
from pipeline.encoder.onnx_runtime import OnnxEncoder, check, decide, maybe_onnx

SMALL = dict(arch="resnet18", weights="none", resize=72, crop=64, batch_size=4, workers=0)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
IMAGES = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_auto_uses_it_on_the_cpu_for_runs_that_repay_the_export():
    least = onnx_runtime.MIN_IMAGES["cpu"]
    assert decide("auto", CPU, least - 1, compiled=False)[0] is False
    on, why = decide("auto", CPU, least, compiled=False)
    assert on and str(least) in why and "onnxruntime" in why
    assert decide("auto", CUDA, 10**9, compiled=False)[0] is False  # the CUDA path stays PyTorch's
    assert decide("auto", CPU, 10**9, compiled=True)[0] is False  # compile true wins over auto
    assert decide("torch", CPU, 10**9, compiled=False) == (False, "runtime: torch")
    assert decide("onnxruntime", CPU, 1, compiled=False)[0] is True
    encoder = torch.nn.Identity()
    assert maybe_onnx(encoder, "auto", CPU, least - 1, False)[:2] == (encoder, False)
    wrapped, on, _ = maybe_onnx(encoder, "auto", CPU, least, False)
    assert on and isinstance(wrapped, OnnxEncoder) and wrapped.fallback  # auto falls back; explicit does not


@pytest.mark.parametrize("device, compiled, said", [(CUDA, False, "CPU only"), (CPU, True, "compile")])
def test_an_explicit_onnxruntime_that_cannot_run_is_one_line(device, compiled, said):
    with pytest.raises(PipelineError, match=said) as e:
        check("onnxruntime", device, compiled)
    assert "\n" not in str(e.value) and "runtime" in str(e.value)
    check("auto", device, compiled)  # auto never refuses: it picks torch


def test_without_the_packages_auto_says_what_to_install_and_explicit_refuses(monkeypatch):
    monkeypatch.setattr(onnx_runtime, "installed", lambda: False)
    on, why = decide("auto", CPU, 10**6, compiled=False)
    assert not on and "pip install onnxruntime onnx" in why
    with pytest.raises(PipelineError, match="pip install onnxruntime onnx"):
        decide("onnxruntime", CPU, 1, compiled=False)


@pytest.mark.parametrize("arch, grid", [("resnet18", 2), ("efficientnet_lite0", 0), ("efficientnet_lite0", 2)])
def test_its_features_are_eager_pytorchs_at_any_batch_size(one_thread, arch, grid):
    spec = make_spec(arch, "none", 72, 64, grid_size=grid)
    eager = set_layout(build_encoder(spec), channels_last=True)
    notes = []
    fast = OnnxEncoder(eager, log=notes.append)
    with torch.inference_mode():
        want = eager(IMAGES)
        got = torch.cat([fast(IMAGES[:4]), fast(IMAGES[4:])])  # the graph's batch is dynamic
    d = 512 if arch == "resnet18" else 1280
    assert got.shape == want.shape == ((5, 1 + grid * grid, d) if grid else (5, d))  # a 2x2 map: grid 2 exports
    assert relative_diff(got, want) < 1e-5 and fast.diff < 1e-5 and not fast.eager
    assert fast.export_seconds is not None and "exported the encoder" in notes[0]
    assert eager.channels_last  # the export ran in NCHW and put the layout back


def test_a_failed_export_or_other_features_fall_back_or_say_what_to_do(monkeypatch, one_thread):
    encoder = set_layout(build_encoder(make_spec("resnet18", "none", 72, 64)), channels_last=True)
    with torch.inference_mode():
        want = encoder(IMAGES)

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nmore lines")

    monkeypatch.setattr(torch.onnx, "export", broken)
    notes = []
    soft = OnnxEncoder(encoder, fallback=True, log=notes.append)
    with torch.inference_mode():
        assert torch.equal(soft(IMAGES), want) and torch.equal(soft(IMAGES), want)
    assert soft.eager and len(notes) == 1 and "PyTorch" in notes[0] and "foo" in notes[0]
    with pytest.raises(PipelineError, match="runtime torch") as e, torch.inference_mode():
        OnnxEncoder(encoder)(IMAGES)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(OnnxEncoder, "_run", lambda self, images: torch.zeros(len(images), 512))
    wrong = OnnxEncoder(encoder, fallback=True, log=notes.append)
    with torch.inference_mode():
        assert torch.equal(wrong(IMAGES), want)  # the eager features, never the runtime's wrong ones
    assert wrong.eager and "differ from eager" in notes[-1]


def test_an_onnxruntime_extract_is_the_same_cache(prepared_cache):
    eager = extract(prepared_cache, out=prepared_cache / "eager.h5", **SMALL, runtime="torch")
    fast = extract(prepared_cache, out=prepared_cache / "onnx.h5", **SMALL, runtime="onnxruntime", features="grid",
                   grid_size=2)
    plain = extract(prepared_cache, out=prepared_cache / "plain.h5", **SMALL, runtime="torch", features="grid",
                    grid_size=2)
    assert eager.runtime == plain.runtime == "torch" and fast.runtime == "onnxruntime" and "via onnxruntime" in fast.line()
    auto = extract(prepared_cache, out=prepared_cache / "auto.h5", **SMALL)  # a few images: not worth exporting
    assert auto.runtime == "torch"
    assert_same_cache(prepared_cache / "plain.h5", prepared_cache / "onnx.h5", ("features", "grid"))
    again = extract(prepared_cache, out=prepared_cache / "eager.h5", **SMALL, runtime="onnxruntime")
    assert again.up_to_date  # switching the setting never forces a rebuild


def test_cli_refuses_onnxruntime_with_compile_in_one_line(prepared_cache):
    r = CliRunner().invoke(main, ["extract", "--cache-dir", str(prepared_cache), "--arch", "resnet18", "--weights",
                                  "none", "--resize", "72", "--crop", "64", "--workers", "0", "--quiet",
                                  "--runtime", "onnxruntime", "--compile", "true"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output
    assert "compile" in r.output and not (prepared_cache / "features.h5").exists()
