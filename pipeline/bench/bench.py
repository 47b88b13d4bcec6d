"""Speed benchmarks: each times a stage against its compute limit and prints figures and ratios (the
targets they are held to are `pipeline bench` options, never unit tests).

bench extract: bare encoder forward on already-decoded tensors (the compute limit) vs the full
               `extract` (decode, preprocess, forward, write) on the same images and settings. The
               limit is the fastest of eager (BatchNorm kept or folded), compiled and ONNX Runtime.
bench train:   bare decoder forward+backward+step on in-memory tensors of the same shapes (the limit)
               vs a `train` epoch from the cache, and vs the seed notebooks' way (the frozen ResNet run
               on decoded images at every step), with the speed-up of training from the cache.
bench scst:    an SCST step vs a cross-entropy step on the same cache, the reward's share of the step, and
               the same step in every way that could be faster (threads, allocator, oneDNN/cuDNN, compiled).

`bench blind` (an ablation: ablations.py) and `bench quality` (quality.py) measure caption quality, not
speed; memory.py, cider_speed.py and draft_effect.py are standalone scripts (`python -m pipeline.bench.X`).
"""
from __future__ import annotations

import copy
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.caption.caption import expand_inputs
from pipeline.core import distributed, paths
from pipeline.core.manifest import ImageRecord, Manifest
from pipeline.core.runtime import autocast, choose_device, cpu_count, default_workers, heap_allocations, tune
from pipeline.decoder.decoders import make_decoder
from pipeline.decoder.model import ModelConfig
from pipeline.encoder.compiled import Compiled
from pipeline.encoder.encoder import build_encoder, encode_images, load_encoder, make_spec, set_layout
from pipeline.encoder.images import Preprocess, image_batches
from pipeline.encoder.onnx_runtime import INSTALL, OnnxEncoder, installed
from pipeline.extract.config import ExtractConfig
from pipeline.extract.extract import extract
from pipeline.train.config import TrainConfig


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child (workers), in MB."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


ALLOCATORS = {"heap": True, "malloc default": False}  # see runtime.heap_allocations


def _cpu_ways(dev: torch.device) -> list[tuple[int, str]]:
    """(threads, allocator) pairs worth timing: on the CPU 1, the default and all-core thread counts, each with
    glibc's default allocations and with heap allocations; on CUDA the default threads and glibc's default
    (runtime.tune changes the allocator on the CPU only)."""
    threads0 = torch.get_num_threads()
    if dev.type != "cpu":
        return [(threads0, "malloc default")]
    return [(t, a) for t in sorted({1, threads0, cpu_count()}) for a in ALLOCATORS]


def _way_name(dev: torch.device, threads: int, allocator: str, layout: str | None = None) -> str:
    """"channels_last, 2 threads, heap" on the CPU; on CUDA only the layout (threads and allocator do not apply)."""
    parts = [layout] if layout else []
    if dev.type == "cpu":
        parts += [f"{threads} thread{'s' if threads > 1 else ''}", allocator]
    return ", ".join(parts) or "default"


def _rate(module, decoded: torch.Tensor, batches: list[list[int]], dev: torch.device, amp: str) -> float:
    """Images/s of `module` over `batches` of the decoded uint8 images, after a warm-up batch (oneDNN/cuDNN pick
    their kernels on the first call)."""
    with torch.inference_mode(), autocast(dev, amp):
        module(decoded[: len(batches[0])].to(dev))
        _sync(dev)
        t0 = time.perf_counter()
        for b in batches:
            module(decoded[b[0]: b[-1] + 1].to(dev, non_blocking=True)).cpu()
        _sync(dev)
        return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def bare_forward_variants(encoder, decoded: torch.Tensor, batches: list[list[int]], dev: torch.device, amp: str,
                          trial_batches: int = 2, log=print) -> dict[str, float]:
    """Images/s of the bare encoder forward on decoded uint8 images (N, 3, S, S), in every way that could be
    the fastest on this machine: NCHW and channels_last, and on the CPU with 1, the default and all-core
    thread counts, each with glibc's default allocations and with heap allocations. Every variant is timed on
    the first `trial_batches` batches after a warm-up batch (a forward's cost does not depend on the pixels),
    then the fastest again on all of them: the last entry, named "... (all images)", is the limit. The
    encoder is left in channels_last, the threads and the allocator as `extract` uses them."""
    threads0 = torch.get_num_threads()

    def timed(threads: int, allocator: str, layout: str, some: list[list[int]]) -> float:
        set_layout(encoder, channels_last=layout == "channels_last")
        torch.set_num_threads(threads)
        heap_allocations(ALLOCATORS[allocator])
        return _rate(encoder, decoded, some, dev, amp)

    out, ways = {}, [(*w, layout) for layout in ("nchw", "channels_last") for w in _cpu_ways(dev)]
    try:
        for way in ways:
            name = _way_name(dev, *way)
            out[name] = speed = timed(*way, batches[:trial_batches])
            log(f"  bare forward {name + ':':<40}{speed:8.1f} images/s  (first {trial_batches} batches)")
        best = max(ways, key=lambda w: out[_way_name(dev, *w)])
        full = f"{_way_name(dev, *best)} (all images)"
        out[full] = timed(*best, batches)
        log(f"  bare forward {full + ':':<40}{out[full]:8.1f} images/s")
    finally:
        torch.set_num_threads(threads0)
        set_layout(encoder, channels_last=True)
        tune(dev, fixed_shapes=True)  # as `extract` runs
    return out


def compiled_forward(spec, decoded: torch.Tensor, batches: list[list[int]], dev: torch.device, amp: str,
                     log=print) -> tuple[dict[str, float], float | None]:
    """The folded encoder compiled as `extract --compile true` runs it (inductor, weights frozen, one batch size;
    channels_last, the default threads, heap allocations): ({name: images/s}, compile seconds), or ({}, None)
    where compiling fails here."""
    heap_allocations(True)
    encoder = Compiled(load_encoder(spec, dev), len(batches[0]), fallback=True, log=log)
    with torch.inference_mode(), autocast(dev, amp):
        encoder(decoded[: len(batches[0])].to(dev))  # compiles
    if encoder.eager:
        return {}, None
    name = f"{_way_name(dev, torch.get_num_threads(), 'heap', 'channels_last')} (all images)"
    out = {name: _rate(encoder, decoded, batches, dev, amp)}
    log(f"  compiled forward {name + ':':<36}{out[name]:8.1f} images/s  (compiling took "
        f"{encoder.compile_seconds:.1f} s)")
    return out, encoder.compile_seconds


def onnxruntime_forward(encoder, decoded: torch.Tensor, batches: list[list[int]], dev: torch.device,
                        log=print) -> tuple[dict[str, float], float | None]:
    """The same folded encoder (normalisation and pooling included) exported to ONNX and run by ONNX Runtime's
    CPU provider at the default thread count, as `extract --runtime onnxruntime` runs it: another runtime's way
    to do the same work, so a candidate for the limit. ({name: images/s}, export seconds), or ({}, None) on
    CUDA, where onnxruntime or onnx is not installed, where the export fails or the features differ."""
    if dev.type != "cpu":
        return {}, None
    if not installed():
        log(f"  ONNX Runtime: not installed ({INSTALL}): not timed")
        return {}, None
    onnx = OnnxEncoder(encoder, fallback=True, log=lambda msg: log(f"  {msg}"))
    with torch.inference_mode():
        onnx(decoded[: len(batches[0])])  # exports, checks against eager
    if onnx.eager:
        return {}, None
    name = f"onnxruntime, BatchNorm folded, {torch.get_num_threads()} threads (all images)"
    out = {name: _rate(onnx, decoded, batches, dev, "none")}
    log(f"  {name + ':':<54}{out[name]:8.1f} images/s  (differs from eager by {onnx.diff:.1e} of the largest feature)")
    return out, onnx.export_seconds


def reference_forward(arch: str, decoded: torch.Tensor, batches: list[list[int]], dev: torch.device,
                      log=print) -> float | None:
    """Images/s of an EfficientNet-Lite's pooled features through the reference package (efficientnet-lite-pytorch),
    as it ships (NCHW, eager, BatchNorm kept), on the same images: what our own network code is compared with.
    None for other archs, or when the package is not installed."""
    if not arch.startswith("efficientnet_lite"):
        return None
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        log("  reference package: not installed (pip install efficientnet-lite-pytorch): not timed")
        return None
    from pipeline.encoder.efficientnet_lite import weights_file

    net = EfficientNet.from_pretrained(arch.replace("_", "-"), weights_path=str(weights_file(arch))).eval().to(dev)

    def pooled(images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) uint8 -> (B, 1280)
        return net.extract_features((images.float() - 127) / 128).mean((2, 3))

    rate = _rate(pooled, decoded, batches, dev, "none")
    log(f"  reference package forward (efficientnet-lite-pytorch, NCHW, eager):  {rate:8.1f} images/s")
    return rate


def _pooled_run(tmp: str, cfg: ExtractConfig, workers: int, dev: torch.device, grid, log) -> float:
    """Steady images/s of the same extraction without the grid (`grid`: the grid run's summary), printed
    beside it: what keeping the grid costs."""
    pooled = extract(tmp, replace(cfg, features="pooled", workers=workers, device=str(dev)), out=Path(tmp) / "pooled.h5",
                     progress=False)
    rate, with_grid = pooled.steady_images_per_second or pooled.images_per_second, grid.steady_images_per_second
    log(f"  extract with the {cfg.grid_size}x{cfg.grid_size} grid: {with_grid:8.1f} images/s steady; pooled only "
        f"{rate:8.1f}: the grid costs {100 * (1 - with_grid / rate):.1f}% of the speed")
    return rate


def bench_extract(images: list[str], cfg: ExtractConfig, limit: int = 1000, repeat: int = 1, log=print) -> dict:
    """Full `extract` vs the bare encoder forward on the same images, decoded in advance. `repeat` reads the
    image list that many times (after `limit`): a small folder still gives a long steady state."""
    paths = expand_inputs(images)[:limit] if limit else expand_inputs(images)
    paths = paths * repeat
    dev = choose_device(cfg.device)
    workers = default_workers(dev) if cfg.workers is None else cfg.workers
    arch, weights, batch_size, amp = cfg.arch, cfg.weights, cfg.batch_size, cfg.amp
    spec = make_spec(arch, weights, cfg.resize, cfg.crop, cfg.interpolation, cfg.draft)
    crop = spec.crop  # the weights' recipe unless cfg overrides it
    log(f"bench extract: {len(paths)} images, {arch} weights={weights}, batch {batch_size}, {workers} workers, "
        f"device {dev}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        dirs = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
        recs = [ImageRecord(id=i, dir=dirs.index(os.path.dirname(os.path.abspath(p))), file=os.path.basename(p),
                            split="train") for i, p in enumerate(paths)]
        Manifest("bench", dirs, recs).save(Path(tmp) / "manifest.json")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # 1. the full stage, exactly as `pipeline extract` runs it
        full = extract(tmp, replace(cfg, workers=workers, device=str(dev)), progress=False)
        rss_main, rss_child = _peak_rss_mb()
        pooled = _pooled_run(tmp, cfg, workers, dev, full, log) if cfg.features == "grid" else None
        gpu_mb = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
        # 2. the compute limit: the same encoder on the same images, already decoded and in memory, timed in
        # every layout and thread count that could be faster; the fastest is the limit
        batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        decoded = torch.empty(len(paths), 3, crop, crop, dtype=torch.uint8)
        for rows, imgs, _ in image_batches(paths, Preprocess.of(spec), batches, torch.device("cpu"), workers):
            decoded[rows] = imgs
        if dev.type == "cuda":
            decoded = decoded.pin_memory()
        variants = {}
        for name, fold in (("BatchNorm kept", False), ("BatchNorm folded", True)):  # extract runs folded
            log(f"  {name}:")
            found = bare_forward_variants(build_encoder(spec, fold=fold).to(dev), decoded, batches, dev, amp, log=log)
            variants.update({f"{name}, {k}": v for k, v in found.items()})
        compiled, compile_s = compiled_forward(spec, decoded, batches, dev, amp, log=log)
        variants.update({f"compiled, BatchNorm folded, {k}": v for k, v in compiled.items()})
        fast, export_s = onnxruntime_forward(build_encoder(spec).to(dev), decoded, batches, dev, log=log)
        variants.update(fast)
        reference = reference_forward(arch, decoded, batches, dev, log=log)
    eager = max(v for k, v in variants.items() if k.startswith("BatchNorm") and k.endswith("(all images)"))
    best = max((k for k in variants if k.endswith("(all images)")), key=variants.get)
    bare = variants[best]
    steady = full.steady_images_per_second
    if not steady:  # one batch in all: there is no steady state to time
        log("  (one batch only: the steady state is the whole run; use more images or a smaller --batch-size)")
        steady = full.images_per_second
    res = {"images": len(paths), "arch": arch, "device": str(dev), "batch_size": batch_size, "workers": workers,
           "bare_images_per_s": bare, "limit_variant": best, "bare_variants": variants,
           "extract_images_per_s": full.images_per_second, "extract_steady_images_per_s": steady,
           "ratio": steady / bare, "ratio_whole_run": full.images_per_second / bare, "failures": len(full.failures),
           "peak_rss_main_mb": rss_main, "peak_rss_worker_mb": rss_child, "peak_gpu_mb": gpu_mb,
           "pooled_steady_images_per_s": pooled, "compile_seconds": compile_s, "reference_images_per_s": reference,
           "compile_break_even_images": _break_even(eager, max(compiled.values(), default=0.0), compile_s),
           "onnx_export_seconds": export_s, "onnx_break_even_images": _break_even(eager, max(fast.values(), default=0.0), export_s)}
    log(f"  limit = best bare forward ({best}): {bare:8.1f} images/s")
    log(f"  full extract, steady state:       {steady:8.1f} images/s  (after its first batch)")
    log(f"  full extract, whole run:          {full.images_per_second:8.1f} images/s  ({full.seconds:.1f} s, "
        f"start-up included)")
    log(f"  ratio extract / bare, steady:     {res['ratio']:8.3f}  (whole run: {res['ratio_whole_run']:.3f})")
    if compile_s is not None:
        be = res["compile_break_even_images"]
        log(f"  compiled vs best eager:           {max(compiled.values()) / eager:8.3f}x; compiling ({compile_s:.1f} s) pays "
            + (f"after {be:,.0f} images" if be else "never (not faster)"))
    if export_s is not None:
        be = res["onnx_break_even_images"]
        log(f"  ONNX Runtime vs best eager:       {max(fast.values()) / eager:8.3f}x; exporting ({export_s:.1f} s) pays "
            + (f"after {be:,.0f} images" if be else "never (not faster)") + f"; extract --runtime {cfg.runtime} ran "
            + ("it" if full.runtime == "onnxruntime" else "PyTorch"))
    if reference:
        log(f"  extract / reference package:      {steady / reference:8.1f}x  (steady state)")
    log(f"  peak memory: main process {rss_main:.0f} MB, largest worker {rss_child:.0f} MB"
        + (f", GPU {gpu_mb:.0f} MB" if dev.type == "cuda" else ""))
    return res


def _break_even(eager: float, compiled: float, compile_s: float | None) -> float | None:
    """Images after which compiling has paid for itself: compile_s / (1 / eager - 1 / compiled); None when it never does."""
    if compile_s is None or compiled <= eager:
        return None
    return compile_s / (1 / eager - 1 / compiled)


def bench_train(cache_dir: str = paths.CACHE_DIR, cfg: TrainConfig | None = None, notebook_batches: int = 10,
                max_batches: int = 0, log=print) -> dict:
    """Bare decoder steps vs a `train` epoch from the cache vs the ResNet-every-step notebook way."""
    from pipeline.decoder.data import load_cache
    from pipeline.train.train import epoch_batches

    cfg = cfg or TrainConfig()
    data = load_cache(cache_dir, grid=cfg.decoder == "attend")
    dev = choose_device(cfg.device)
    batches = epoch_batches(data, data.training_rows(cache_dir), cfg, 0, distributed.Context())
    if max_batches:
        batches = batches[:max_batches]
    n_caps = sum(len(b) for b in batches)
    log(f"bench train: {n_caps} captions in {len(batches)} batches of {cfg.batch_size}, vocab {len(data.vocab)}, "
        f"embed {cfg.embed_size}, hidden {cfg.hidden_size}, device {dev}, {torch.get_num_threads()} threads")
    bare_variants = _bare_train_variants(data, batches, cfg, dev, log)
    best = max(bare_variants, key=bare_variants.get)
    bare = bare_variants[best]
    # best of two, as the limit is the best of its variants: one timing alone drifts +-15% on a shared machine
    full_s = min(_time_train_epoch(data, batches[:3], batches, cfg, dev) for _ in range(2))
    full = n_caps / full_s
    nb = batches[:notebook_batches]
    nb_caps = sum(len(b) for b in nb)
    notebook = nb_caps / _time_notebook_way(data, nb, cfg, dev)
    res = {"captions": n_caps, "batches": len(batches), "device": str(dev), "arch": data.encoder.arch,
           "bare_captions_per_s": bare, "limit_variant": best, "bare_variants": bare_variants,
           "train_captions_per_s": full, "ratio": full / bare, "epoch_seconds": full_s,
           "notebook_captions_per_s": notebook, "speedup_vs_notebook": full / notebook,
           "notebook_epoch_seconds_estimate": n_caps / notebook}
    log(f"  limit = best bare step ({best}): {bare:10.0f} captions/s")
    log(f"  train epoch from the cache:       {full:10.0f} captions/s  ({full_s:.1f} s per epoch)")
    log(f"  ratio train / bare:               {res['ratio']:10.3f}")
    log(f"  notebook way ({data.encoder.arch} every step, {nb_caps} captions timed): {notebook:10.1f} captions/s "
        f"(~{n_caps / notebook:.0f} s per epoch)")
    log(f"  speed-up of the cache:            {res['speedup_vs_notebook']:10.1f}x")
    if data.grid is not None:
        res["attend_vs_showtell_step"] = _attend_vs_showtell(data, batches, cfg, dev, log)
    if dev.type == "cuda":
        log(f"  peak GPU memory: {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MB")
    return res


def _fresh_trainer(data, cfg: TrainConfig, dev: torch.device):
    """A Trainer of a decoder seeded the same way every time, as `train` builds it."""
    from pipeline.train.train import Trainer

    torch.manual_seed(0)
    model = make_decoder(ModelConfig.of(cfg, data.encoder.feature_dim, len(data.vocab), data.encoder.grid_size))
    model.fit_feature_stats(data.features, data.image_rows("train"), data.grid)
    return Trainer(model, cfg, dev)


def _attend_vs_showtell(data, batches: list[torch.Tensor], cfg: TrainConfig, dev: torch.device, log) -> float:
    """Seconds of train's step of the attention decoder over the Show-and-Tell one's, on the same batches
    (each read from the cache, the grid's rows from the file, as train does)."""
    from pipeline.train.train import run_epoch

    seconds = {}
    for decoder in ("showtell", "attend"):
        trainer = _fresh_trainer(data, replace(cfg, decoder=decoder), dev)
        view = data if decoder == "attend" else replace(data, grid=None)  # Show-and-Tell reads pooled features
        run_epoch(trainer, view, batches[:2])  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        run_epoch(trainer, view, batches)
        _sync(dev)
        seconds[decoder] = time.perf_counter() - t0
    ratio = seconds["attend"] / seconds["showtell"]
    log(f"  train step, attend vs showtell:   {ratio:10.2f}x the time ({seconds['attend']:.1f} s vs "
        f"{seconds['showtell']:.1f} s for {sum(len(b) for b in batches)} captions; target <= 3)")
    return ratio


def _bare_train_variants(data, batches: list[torch.Tensor], cfg: TrainConfig, dev: torch.device, log) -> dict:
    """Captions/s of the bare step (forward, loss, backward, clip, Adam: none of train's bookkeeping) on the
    epoch's batches built in advance as device tensors, in every CPU thread count (1, the default, all
    cores) and allocator that could be the fastest, then at the default threads and allocator with oneDNN
    (CPU) or cuDNN (CUDA) turned off, compiled, and with the loss of one whole logits block instead of
    train's blocks of rows (model.readout), at each allocator: the best is the limit."""
    from pipeline.trainer.batch import Batch, caption_loss

    trainer = _fresh_trainer(data, cfg, dev)
    prepared = [Batch.of(data, b, dev) for b in batches]
    trainer.model.train()

    def bare_step(batch, loss_fn=caption_loss):
        trainer.scaler.scale(loss_fn(trainer.model, batch, trainer.amp_dtype)).backward()
        trainer.scaler.unscale_(trainer.opt)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.clip)
        trainer.scaler.step(trainer.opt)
        trainer.scaler.update()
        trainer.opt.zero_grad(set_to_none=True)

    def timed(name: str, loss_fn=caption_loss, note: str = "") -> None:
        t0 = time.perf_counter()
        for p in prepared[:3]:
            bare_step(p, loss_fn)  # warm-up (compiled: the compile too)
        _sync(dev)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in prepared:
            bare_step(p, loss_fn)
        _sync(dev)
        variants[name] = n_caps / (time.perf_counter() - t0)
        log(f"  bare decoder step, {name + ':':<26}{variants[name]:10.0f} captions/s"
            + (f"  ({note}: {warm:.1f} s)" if note else ""))

    def timed_compiled(default: str) -> None:  # inductor; caption lengths vary, so with dynamic shapes
        timed(f"compiled, {default}", torch.compile(caption_loss, dynamic=True), "compiling and 3 warm-up steps")

    def whole_logits_loss(net, batch, amp_dtype=None):  # the textbook loss, one (sum(lengths), V) logits block
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(batch.features, batch.inputs, batch.lengths)
        return torch.nn.functional.cross_entropy(logits.float(), batch.targets)

    n_caps, variants = sum(len(b) for b in batches), {}
    _time_each_way(dev, timed, timed_compiled, "bare decoder step", log)
    try:  # train's loss is in blocks: the whole block at the default threads, in each allocator worth timing
        for allocator in dict.fromkeys(a for _, a in _cpu_ways(dev)):
            heap_allocations(ALLOCATORS[allocator])
            timed(f"whole logits, {_way_name(dev, torch.get_num_threads(), allocator)}", whole_logits_loss)
    finally:
        tune(dev, fixed_shapes=False)
    return variants


def _time_each_way(dev: torch.device, time_way: Callable[[str], None], time_compiled: Callable[[str], None],
                   what: str, log) -> None:
    """Call time_way(name) in every CPU thread count x allocator, then at the default ones with oneDNN (CPU) or
    cuDNN (CUDA) off, then time_compiled(default way's name); leaves threads and allocator as train and scst
    run them. A compile that fails is logged as not timed."""
    threads0 = torch.get_num_threads()
    default = _way_name(dev, threads0, "malloc default")
    try:
        for threads, allocator in _cpu_ways(dev):
            torch.set_num_threads(threads)
            heap_allocations(ALLOCATORS[allocator])
            time_way(_way_name(dev, threads, allocator))
        torch.set_num_threads(threads0)
        heap_allocations(False)
        library = "cudnn" if dev.type == "cuda" else "mkldnn"  # the LSTM's and convolutions' kernels
        with getattr(torch.backends, library).flags(enabled=False):
            time_way(f"{'cuDNN' if dev.type == 'cuda' else 'oneDNN'} off, {default}")
        try:
            time_compiled(default)
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds; all mean "not here"
            log(f"  {what}, compiled: torch.compile failed ({type(e).__name__}): not timed")
    finally:
        torch.set_num_threads(threads0)
        tune(dev, fixed_shapes=False)  # as `train` and `scst` run


def _time_train_epoch(data, warm_up: list[torch.Tensor], timed: list[torch.Tensor], cfg: TrainConfig,
                      dev: torch.device) -> float:
    """Seconds of the real training epoch from the cache (train's run_epoch and step, validation excluded)
    over the `timed` batches, after a warm-up over `warm_up`."""
    from pipeline.train.train import run_epoch

    trainer = _fresh_trainer(data, cfg, dev)
    run_epoch(trainer, data, warm_up)
    _sync(dev)
    t0 = time.perf_counter()
    run_epoch(trainer, data, timed)
    _sync(dev)
    return time.perf_counter() - t0


def _time_notebook_way(data, batches: list[torch.Tensor], cfg: TrainConfig, dev: torch.device) -> float:
    """Seconds of the seed notebooks' way over `batches`: decode the images and run the frozen ResNet at
    every step, then train's real step on those features."""
    from pipeline.trainer.batch import Batch

    encoder = load_encoder(data.encoder, dev, grid_size=data.encoder.grid_size if data.grid is not None else 0)
    paths = [data.manifest.path_of(i) for i in range(len(data.manifest.images))]
    trainer = _fresh_trainer(data, cfg, dev)
    workers = default_workers(dev)
    t0 = time.perf_counter()
    for b in batches:
        images = image_batches(paths, Preprocess.of(data.encoder), [data.caption_image[b].tolist()], dev, workers)
        feats = torch.cat([torch.from_numpy(f) for _, f, _ in encode_images(encoder, images, dev)])  # (B, D)
        trainer.step(Batch.of(data, b, dev, features=feats))
    _sync(dev)
    return time.perf_counter() - t0


def bench_scst(cache_dir: str = paths.CACHE_DIR, cfg=None, tcfg: TrainConfig | None = None, steps: int = 10,
               log=print) -> dict:
    """An SCST step (sample K captions per image, CIDEr-D reward, REINFORCE update) against a
    cross-entropy step of train, on the same cache and decoder, in captions per second; and the share
    of the SCST step spent computing the reward (target: at most a quarter)."""
    from pipeline.decoder.data import load_cache
    from pipeline.scst.config import ScstConfig

    cfg, tcfg = cfg or ScstConfig(), tcfg or TrainConfig()
    data = load_cache(cache_dir, grid=tcfg.decoder == "attend")
    dev = choose_device(cfg.device)
    t0 = time.perf_counter()
    run, timer = _scst_run(data, cache_dir, cfg, tcfg, dev)
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    order = run.train_images[torch.randperm(len(run.train_images), generator=g)]
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)][: steps + 1]
    log(f"bench scst: {len(batches) - 1} steps of {cfg.batch_size} images x {cfg.samples} samples, vocab "
        f"{len(data.vocab)}, hidden {tcfg.hidden_size}, device {dev}; CIDEr-D tables built in {setup_s:.1f} s")
    timed = batches[1:] or batches  # a tiny cache with one batch: time it again rather than nothing
    run.log = lambda m: log(f"  {m}")
    log(f"  scst.compile {cfg.compile} for {cfg.epochs} epoch(s) of this cache: {run.choose_policy(0)}")
    scst_s, n = _time_scst_steps(run, batches[0], timed, g)
    scst_rate, share = n / scst_s, timer.seconds / scst_s
    log(f"  SCST step (sample, reward, update): {scst_rate:10.0f} sampled captions/s  (the project's path)")
    variants, compiled = _scst_variants(run, batches[0], timed, dev, log)
    best = max(variants, key=variants.get)
    break_even = _break_even(compiled.get("eager", 0.0), compiled.get("rate", 0.0), compiled.get("compile_seconds"))
    todo = run.captions_to_sample(0)  # what scst would sample on this cache
    xe_batches = _xe_batches(data, tcfg, steps)
    xe_timed = xe_batches[1:] or xe_batches
    xe_rate = sum(len(b) for b in xe_timed) / _time_train_epoch(data, xe_batches[:1], xe_timed, tcfg, dev)
    res = {"device": str(dev), "steps": len(timed), "images_per_step": cfg.batch_size, "samples": cfg.samples,
           "scst_captions_per_s": scst_rate, "xe_captions_per_s": xe_rate, "scst_vs_xe": scst_rate / xe_rate,
           "reward_share": share, "reward_ms_per_step": 1000 * timer.seconds / len(timed),
           "cider_setup_s": setup_s, "limit_captions_per_s": variants[best], "limit_variant": best,
           "variants": variants, "compile_seconds": compiled.get("compile_seconds"),
           "compile_break_even_captions": break_even, "captions_to_sample": todo}
    res["scst_vs_limit"] = scst_rate / res["limit_captions_per_s"]
    log(f"  limit = best SCST step ({best}): {variants[best]:6.0f} sampled captions/s; the project's path "
        f"{res['scst_vs_limit']:.2f} of it")
    if compiled:
        log(f"  compiled step vs eager:             {compiled['rate'] / compiled['eager']:10.2f}x; compiling "
            f"({compiled['compile_seconds']:.1f} s with a warm-up step) pays "
            + (f"after {break_even:.0f} sampled captions ({todo} on this cache)" if break_even else "never"))
    log(f"  cross-entropy step of train:        {xe_rate:10.0f} captions/s  (SCST / XE {res['scst_vs_xe']:.2f})")
    log(f"  reward (CIDEr-D) share of the step: {share:10.3f}  ({res['reward_ms_per_step']:.1f} ms a step)")
    return res


def _scst_variants(run, warm_up: torch.Tensor, timed: list[torch.Tensor], dev: torch.device, log) -> tuple[dict, dict]:
    """Sampled captions/s of scst's step in every way that could be faster than the project's: CPU thread
    counts and allocators, oneDNN (CPU) or cuDNN (CUDA) off, and the decoder's step compiled. Each starts
    from the same decoder and optimizer state and samples with the same numbers, so all do the same work.
    Also {"compile_seconds": compiling plus the warm-up step, "rate": its captions/s, "eager": the same way
    eager's} where it compiled."""
    model0 = copy.deepcopy(run.model.state_dict())
    opt0 = copy.deepcopy(run.opt.state_dict())
    policy, run.policy, variants, compiled = run.policy, None, {}, {}  # each way says itself how the step runs

    def timed_way(name: str, note: str = "") -> float:
        run.model.load_state_dict(model0)
        run.opt.load_state_dict(opt0)
        t0 = time.perf_counter()
        seconds, n = _time_scst_steps(run, warm_up, timed, torch.Generator().manual_seed(0))
        variants[name], extra = n / seconds, time.perf_counter() - t0 - seconds
        log(f"  SCST step, {name + ':':<32}{variants[name]:10.0f} sampled captions/s"
            + (f"  ({note}: {extra:.1f} s)" if note else ""))
        return extra

    def timed_compiled(default: str) -> None:
        run.model.step = torch.compile(run.model.step, dynamic=True)  # the per-word step sampling repeats
        try:
            name = f"compiled step, {default}"
            compiled["compile_seconds"] = timed_way(name, "compiling and a warm-up step")
            compiled.update(rate=variants[name], eager=variants[default])
        finally:
            del run.model.step

    try:
        _time_each_way(dev, timed_way, timed_compiled, "SCST step", log)
    finally:
        run.model.load_state_dict(model0)
        run.opt.load_state_dict(opt0)
        run.policy = policy
    return variants, compiled


class _TimedScorer:
    """A CIDEr-D scorer, timed: the reward's share of each step."""

    def __init__(self, scorer):
        self.scorer, self.seconds = scorer, 0.0

    def score(self, *args):
        t = time.perf_counter()
        try:
            return self.scorer.score(*args)
        finally:
            self.seconds += time.perf_counter() - t


def _scst_run(data, cache_dir: str, cfg, tcfg: TrainConfig, dev: torch.device):
    """An scst run of a fresh decoder (tcfg's shape) on the cache's training images, no validation and no
    outputs, with its scorer timed: (run, the timed scorer)."""
    from pipeline.scst.cider import CiderD, load_or_build_df
    from pipeline.scst.scst import ScstRun

    torch.manual_seed(0)
    model_cfg = ModelConfig.of(tcfg, data.encoder.feature_dim, len(data.vocab), data.encoder.grid_size)
    model = make_decoder(model_cfg)
    model.fit_feature_stats(data.features, data.image_rows("train"), data.grid)
    model.to(dev)
    timer = _TimedScorer(CiderD.from_data(load_or_build_df(cache_dir, data), data, "train"))
    train_images = torch.from_numpy(np.unique(data.caption_image[data.training_rows(cache_dir)].numpy())).long()
    run = ScstRun(cfg=cfg, data=data, model=model, opt=torch.optim.Adam(model.parameters(), lr=cfg.lr),
                  model_cfg=model_cfg, device=dev, scorer=timer, train_images=train_images, init="bench")
    return run, timer


def _time_scst_steps(run, warm_up: torch.Tensor, timed: list[torch.Tensor], g: torch.Generator) -> tuple[float, int]:
    """Seconds of scst's real step over the `timed` image batches, after one on `warm_up`; and the
    sampled captions they trained on."""
    from pipeline.scst.scst import scst_step

    cfg = run.cfg
    u = lambda b: torch.rand(len(b) * cfg.samples, cfg.max_length, generator=g)  # noqa: E731
    scst_step(run, warm_up, u(warm_up))
    run.scorer.seconds, n, t0 = 0.0, 0, time.perf_counter()
    for b in timed:
        n += int(scst_step(run, b, u(b))["n"])
    _sync(run.device)
    return time.perf_counter() - t0, n


def _xe_batches(data, tcfg: TrainConfig, steps: int) -> list[torch.Tensor]:
    from pipeline.train.train import epoch_batches

    return epoch_batches(data, data.caption_rows("train"), tcfg, 0, distributed.Context())[: steps + 1]
