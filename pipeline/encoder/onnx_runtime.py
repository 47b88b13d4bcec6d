"""ONNX Runtime for the frozen encoder on the CPU (`extract.runtime`): whether it pays for a run, and the encoder run by it.

The folded encoder (normalisation, pooling and grid included) is exported to ONNX in memory and run by ONNX
Runtime's CPU provider, which ran it 1.15-1.25x faster than eager PyTorch here (`pipeline bench extract`
times both). Exporting and building the session cost a few seconds, once per process, so `auto` uses it when
the images reach MIN_IMAGES[device type], the break-even of

    images x (1 / eager rate) x (1 - 1 / speed-up)  >  export seconds

at the figures measured. extract counts the cache's images, not the ones still to do: one cache is made by
one runtime throughout, so a resumed or partly redone run writes the bytes an uninterrupted one would (a
small redo in a big cache pays the few seconds). The first 8 images are also run eagerly and compared:
features that differ by more than float rounding (1e-4 of the largest) are not the same work, so `auto`
then runs eagerly (and says so) and an explicit `onnxruntime` ends in one line; so does a graph that does
not export (a grid pooled from a map of another size, e.g. 14x14 regions of a 7x7 map: the exporter cannot
always see the map's size; a G x G map is its own grid and exports). Nothing about the runtime is in the
cache's record: the features agree with eager ones to ~1e-6, below float16 storage's rounding,
so a cache extracted either way is the same cache.
"""

from __future__ import annotations

import io
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.encoder.encoder import Encoder, set_layout

RUNTIMES = ("auto", "torch", "onnxruntime")
INSTALL = "pip install onnxruntime onnx"
MAX_REL_DIFF = 1e-4  # of the largest feature: float rounding is ~1e-6
CHECK_IMAGES = 8  # of the first batch, also run eagerly: the features compared

# Images (extract: the cache's) from which `auto` runs ONNX Runtime (None: never), per device type, with the figures that set them
# (`extract` of 1,500 Flickr8k photos, batch 64, 2 threads, 2 decode workers, 2026-12-06):
# - cpu: steady 103.7 images/s vs 81.8 in PyTorch for lite0 (whole run 91.2 vs 73.3), 47.2 vs 40.8 for resnet18;
#   the first call (export on one image, session, first run, 8 images checked eagerly) took 2.5-4.1 s: break-even
#   at 1,000-1,600 images, so 2,000 leaves room for the machine's drift. The 1,500-image demo stays in PyTorch.
#   Its threads spin between batches (ONNX Runtime's default): 103.7 vs 100.0 images/s without, decode workers beside.
# - cuda: not used (the CUDA path is PyTorch's, with autocast and channels_last).
MIN_IMAGES: dict[str, int | None] = {"cpu": 2000, "cuda": None}


def installed() -> bool:
    """Whether onnxruntime and onnx (which torch's exporter needs) both import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check(setting: str, device: torch.device, compiled: bool) -> None:
    """Refuse, in one line, an explicit `onnxruntime` that cannot run: not on the CPU, with torch.compile
    (`compiled`: compile true, or chosen), or without the packages. Before any work, then again as it starts."""
    if setting != "onnxruntime":
        return
    if device.type != "cpu":
        raise PipelineError(f"runtime onnxruntime runs the encoder on the CPU only, not on {device.type}: set "
                            f"runtime auto or torch (--runtime torch)")
    if compiled:
        raise PipelineError("runtime onnxruntime and compile true exclude each other: set compile false or "
                            "auto (--compile auto), or runtime torch")
    if not installed():
        raise PipelineError(f"runtime onnxruntime needs ONNX Runtime: {INSTALL}, or set runtime torch")


def decide(setting: str, device: torch.device, images: int, compiled: bool) -> tuple[bool, str]:
    """(run by ONNX Runtime or not, why in a few words) for a run of `images` on `device` (extract: the cache's); `setting`:
    auto, torch or onnxruntime (extract.runtime); `compiled`: torch.compile was chosen (the two exclude each
    other). An explicit onnxruntime that cannot run ends in one line (`check`)."""
    if setting == "torch":
        return False, "runtime: torch"
    if setting == "onnxruntime":
        check(setting, device, compiled)
        return True, "runtime: onnxruntime"
    at_least = MIN_IMAGES.get(device.type)
    if at_least is None:
        return False, "runtime auto -> torch: ONNX Runtime is used on the CPU only"
    if compiled:
        return False, "runtime auto -> torch: the encoder is compiled"
    if images < at_least:
        return False, f"runtime auto -> torch: {images} images, below the {at_least} that repay exporting to ONNX Runtime"
    if not installed():
        return False, f"runtime auto -> torch: ONNX Runtime is not installed ({INSTALL}: ~1.2x faster encoding here)"
    return True, f"runtime auto -> onnxruntime: {images} images, at least the {at_least} that repay exporting"


class OnnxEncoder(nn.Module):
    """`encoder` run by ONNX Runtime's CPU provider at `threads` (default: torch's) intra-op threads. The first
    call exports it (NCHW graph, dynamic batch) and checks the session's features against eager ones on the
    first CHECK_IMAGES images of that batch; `export_seconds` then says how long that took, `diff` how far the features were apart. Where
    exporting fails or the features differ, the encoder runs eagerly if `fallback` (`eager` is then True),
    else the error is one line."""

    def __init__(self, encoder: Encoder, threads: int | None = None, fallback: bool = False, log=None):
        super().__init__()
        self.encoder, self.threads, self.fallback = encoder, threads, fallback
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.session = None
        self.export_seconds: float | None = None
        self.diff: float | None = None
        self.eager = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) uint8 -> (B, D) or (B, 1 + G*G, D)
        if self.eager:
            return self.encoder(images)
        if self.session is None:
            return self._first(images)
        return self._run(images)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": np.ascontiguousarray(images.numpy())})[0])

    def _first(self, images: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        try:
            self.session = _session(self.encoder, images, self.threads or torch.get_num_threads())
            out = self._run(images)
        except Exception as e:  # noqa: BLE001 - the exporter and the runtime raise many kinds; all mean "not here"
            return self._eager(images, f"exporting the encoder to ONNX Runtime failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})")
        want = self.encoder(images[:CHECK_IMAGES])  # (b, ...) eager: the check
        self.diff = (out[:CHECK_IMAGES] - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        if self.diff > MAX_REL_DIFF:
            return self._eager(images, f"ONNX Runtime's features differ from eager ones by {self.diff:.1e} of the largest")
        self.export_seconds = time.perf_counter() - started
        self.log(f"exported the encoder to ONNX Runtime in {self.export_seconds:.1f} s (features within "
                 f"{self.diff:.0e} of eager)")
        return out

    def _eager(self, images: torch.Tensor, why: str) -> torch.Tensor:
        self.session = None
        if not self.fallback:
            raise PipelineError(f"{why}; set runtime torch (--runtime torch) to run the encoder in PyTorch")
        self.log(f"{why}: running the encoder in PyTorch")
        self.eager = True
        return self.encoder(images)


def _session(encoder: Encoder, sample: torch.Tensor, threads: int):
    """An ONNX Runtime CPU session of `encoder` exported on one image of `sample` (batch dynamic: tracing runs the
    network once, 4x faster on one image than on 64), the graph in memory."""
    import onnxruntime as ort

    layout = encoder.channels_last
    set_layout(encoder, channels_last=False)  # an NCHW graph: ONNX Runtime picks its own layouts
    try:
        graph = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (sample[:1].clone(),), graph, dynamo=False, input_names=["images"],
                              output_names=["features"], dynamic_axes={"images": {0: "batch"}}, opset_version=17)
    finally:
        set_layout(encoder, channels_last=layout)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(graph.getvalue(), opts, providers=["CPUExecutionProvider"])


def maybe_onnx(encoder: nn.Module, setting: str, device: torch.device, images: int, compiled: bool,
               log=None) -> tuple[nn.Module, bool, str]:
    """(`encoder`, run by ONNX Runtime when `decide` says so (`auto` falls back to PyTorch where exporting fails
    or the features differ), whether it is, the decision's note for the caller to log)."""
    on, why = decide(setting, device, images, compiled)
    if on:
        encoder = OnnxEncoder(encoder, fallback=setting == "auto", log=log)
    return encoder, on, why
