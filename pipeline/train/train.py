"""Stage 2: train the projection + LSTM decoder from the feature cache. The CNN is never run here.

One epoch = every caption of every valid training image, in length-grouped batches (little padding),
packed for the LSTM and the loss. After each epoch: validation loss/perplexity, greedy captions for
the validation images scored with CIDEr and BLEU-4; the best epoch by CIDEr is kept as best.pt.

Reproducibility: each epoch's batch order comes from (seed, epoch) alone and the global RNG state is
saved with each checkpoint, so `--resume` from last.pt ends exactly where an uninterrupted run would
(on the CPU; cuDNN kernels are not bitwise deterministic).

Outputs:  OUT/last.pt, OUT/best.pt
          METRICS/train_steps.csv   step, epoch, loss, perplexity, lr      (dvc plots)
          METRICS/train_epochs.json [{epoch, train_loss, val_loss, val_perplexity, CIDEr, BLEU-4, ...}] (dvc plots)
          METRICS/train.json        best epoch and its scores             (dvc metrics)
          METRICS/train.png         the curves of both, drawn with matplotlib (opens offline)

Many processes (`torchrun --nproc_per_node N -m pipeline train ...`, see `pipeline.core.distributed`):
DistributedDataParallel, one process per GPU (LOCAL_RANK) with nccl, or per CPU share with gloo.
Every rank builds the same global batches and takes an interleaved slice of each, and scales its
loss by its share of the batch's tokens, so DDP's gradient average is the gradient of the global
batch's mean token loss: the 1-process step, up to float rounding. The logged step loss is the
global batch's mean token loss (summed over the ranks), so the CSV compares with a 1-process run.
Rank 0 alone validates and writes checkpoints and logs; its stop decision (early stopping) is
broadcast, so all ranks leave the loop together. `--resume`: every rank loads last.pt. Each rank
reseeds its global RNG from (seed, epoch, rank) at every epoch, so dropout masks differ between
ranks and a resumed run reproduces them without saving N RNG states.
Known differences from one process: a global batch of fewer than N captions is skipped (each rank
needs one); with --batchnorm on the CPU, batch statistics are per rank (SyncBatchNorm needs CUDA).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core import distributed, paths
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import amp_dtype
from pipeline.decoder.checkpoint import same_cache
from pipeline.decoder.data import CaptionData, length_grouped_batches, load_cache
from pipeline.decoder.decoders import make_decoder
from pipeline.decoder.model import ModelConfig
from pipeline.decoder.overlap import training_images_record
from pipeline.train.config import TrainConfig
from pipeline.trainer.batch import Batch, caption_loss
from pipeline.trainer.outputs import check_room, claim_outputs
from pipeline.trainer.plots import plot_training
from pipeline.trainer.run import Run, RunState, place, rank_seed, resume, val_rows

SCORE_KEYS = ("val_loss", "val_perplexity", "CIDEr", "BLEU-4")
LOG_NAMES = ("train_steps.csv", "train_epochs.json", "train.json", "train.png")


@dataclass
class TrainSummary:
    epochs_run: int
    steps: int
    best_epoch: int
    best: dict
    seconds: float
    captions_per_second: float
    out: str
    history: list = field(default_factory=list)

    def line(self) -> str:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.best.items() if isinstance(v, float))
        return (f"trained {self.epochs_run} epoch(s), {self.steps} steps, {self.seconds:.1f} s "
                f"({self.captions_per_second:.0f} captions/s); best epoch {self.best_epoch}: {scores} -> {self.out}")


@dataclass
class TrainState(RunState):
    """RunState plus early stopping and throughput; best_score is the validation CIDEr (or -val_loss
    without validation images)."""

    bad_epochs: int = 0  # epochs since the best one (early stopping)
    captions: int = 0  # captions trained on

    def summary(self, out: Path) -> TrainSummary:
        return TrainSummary(epochs_run=self.epoch, steps=self.step, best_epoch=self.best_epoch, best=dict(self.best),
                            seconds=self.seconds, captions_per_second=self.captions / self.seconds if self.seconds else 0.0,
                            out=str(out), history=list(self.history))


class Trainer:
    """Model, optimizer and the one training step; shared by `train` and `pipeline bench train`."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, ddp: bool = False):
        if ddp and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.net = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
                    if ddp else self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, amsgrad=cfg.amsgrad, weight_decay=cfg.weight_decay)
        self.amp_dtype = amp_dtype(device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def set_lr(self, epoch: int) -> float:
        lr = self.cfg.lr * self.cfg.lr_decay ** (epoch // self.cfg.lr_decay_every)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def step(self, batch: Batch, update: bool = True, weight: float | None = None,
             group: int | None = None) -> torch.Tensor:
        """Forward + backward; with `update`, clip and take an optimizer step. Returns the detached loss.

        `weight` multiplies the loss for the backward pass only (DDP: this rank's token share of the
        global batch times N, see the module docstring). `group`: how many batches the coming update
        averages (default cfg.accumulate; fewer for an epoch's last, partial group). Under DDP the
        gradients of accumulation steps stay local (no_sync, which must cover the forward pass too, or
        DDP still all-reduces at the backward) and are averaged once, at the step that updates.
        """
        local = not update and isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
        with self.net.no_sync() if local else contextlib.nullcontext():
            loss = caption_loss(self.net, batch, self.amp_dtype, self.cfg.label_smoothing)
            scaled = loss if weight is None else loss * weight
            self.scaler.scale(scaled / (group or self.cfg.accumulate)).backward()
        if update:
            self.scaler.unscale_(self.opt)
            # max_norm=inf measures without clipping; the norm is the all-reduced one, so every rank agrees
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip if self.cfg.clip > 0 else math.inf)
            self.check_finite(loss, norm)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Stop before a non-finite loss or gradient reaches the weights (one device sync per update).

        With float16 autocast the GradScaler expects occasional inf gradients and skips those steps
        itself, so there only the loss decides."""
        scaled = self.scaler.is_enabled()
        bad = ~torch.isfinite(loss) if scaled else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if bool(bad):
            self.opt.zero_grad(set_to_none=True)
            raise PipelineError(f"training diverged: loss {float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g} "
                                f"(non-finite); no checkpoint is written for it: lower --lr or set --clip (the cached "
                                f"features were checked finite when they loaded)")


def epoch_batches(data: CaptionData, rows: torch.Tensor, cfg: TrainConfig, epoch: int,
                  dist: distributed.Context) -> list[torch.Tensor]:
    """This rank's batches of `epoch`: the same global batches for any number of processes, each rank
    taking an interleaved slice of every batch (so N processes follow the 1-process run closely)."""
    batches = global_batches(data, rows, cfg, epoch, dist.world_size)
    return [b[dist.rank::dist.world_size] for b in batches] if dist.enabled else batches


def global_batches(data: CaptionData, rows: torch.Tensor, cfg: TrainConfig, epoch: int,
                   world_size: int = 1) -> list[torch.Tensor]:
    """The batches of `epoch` as one process takes them, from (seed, epoch) alone; with N processes,
    only those of at least N captions (every rank must take part in every step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    batches = length_grouped_batches(rows, data.lengths, cfg.batch_size, g)
    return [b for b in batches if len(b) >= world_size]


def token_count(data: CaptionData, rows: torch.Tensor) -> int:
    """Predicted tokens of these captions (their words and <end>): the loss's averaging weight."""
    return int(data.lengths[rows].sum()) + len(rows)


def run_epoch(trainer: Trainer, data: CaptionData, batches: list[torch.Tensor], progress: bool = False,
              desc: str = "train", weights: list[float] | None = None) -> list[float]:
    """Train over `batches` (caption rows); returns the per-step losses (fetched from the device once,
    at the end). `weights`: one loss multiplier per batch for the backward pass (see Trainer.step), or None."""
    trainer.model.train()
    losses = []
    bar = tqdm(total=sum(len(b) for b in batches), unit="cap", desc=desc, disable=not progress,
               dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
    for i, rows in enumerate(batches):
        update = (i + 1) % trainer.cfg.accumulate == 0 or i == len(batches) - 1
        loss = trainer.step(Batch.of(data, rows, trainer.device), update, None if weights is None else weights[i],
                            accumulation_group(i, len(batches), trainer.cfg.accumulate))
        losses.append(loss)
        bar.update(len(rows))
        if progress and (i + 1) % trainer.cfg.print_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return torch.stack(losses).float().cpu().tolist() if losses else []


def accumulation_group(i: int, n_batches: int, accumulate: int) -> int:
    """How many batches the update that batch `i` contributes to averages: `accumulate`, except in the
    epoch's last group when `n_batches` is not a multiple of it (accumulate 4, 6 batches: 4, 4, 4, 4, 2, 2)."""
    start = i // accumulate * accumulate
    return min(accumulate, n_batches - start)


# ------------------------------------------------------------------------------------------ the run
@dataclass(kw_only=True)
class TrainRun(Run):
    """What one `train` call works with, built once by `setup`."""

    NAME = "train"
    STEP_FORMATS = {"loss": ".6f", "perplexity": ".4f", "lr": ".3g"}

    trainer: Trainer
    train_rows: torch.Tensor  # (M_train,) caption rows trained on

    def checkpoint_entry(self) -> dict:
        return {"train_config": asdict(self.cfg)}

    def unfinished(self, ckpt: dict) -> str | None:
        planned, state = ckpt.get("train_config", {}), ckpt.get("train_state", {})
        epoch, epochs, patience = ckpt.get("epoch", 0), planned.get("epochs"), planned.get("patience", 0)
        stopped_early = bool(patience) and state.get("bad_epochs", 0) >= patience
        return f"epoch {epoch} of {epochs}" if epochs and epoch < epochs and not stopped_early else None

    def summary(self, state: TrainState) -> dict:
        return {"train_seconds": round(state.seconds, 3),
                "captions_per_second": round(state.captions / state.seconds, 1) if state.seconds else 0.0}

    def plot(self, state: TrainState) -> None:
        plot_training(self.steps_log, state.history, self.metrics_dir / "train.png",
                      title=f"{self.metrics_dir}: best epoch {state.best_epoch} of {state.epoch}")


def train(cache_dir: str | os.PathLike = paths.CACHE_DIR, out: str | os.PathLike = paths.XE_DIR,
          metrics_dir: str | os.PathLike = paths.XE_METRICS, cfg: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> TrainSummary:
    """Train the decoder on the cache in `cache_dir`.

    Outputs: OUT/best.pt (the best validation CIDEr), OUT/last.pt (where the run stands), and the
    METRICS files listed in the module docstring. `resume` continues from OUT/last.pt and ends
    exactly where an uninterrupted run would. Refuses (PipelineError) a bad setting, a cache whose
    files do not belong together, a cache without training captions, and a last.pt made with another
    cache or other model settings.

    Before any work, rank 0 takes the locks of OUT and METRICS (a second run into either is refused at
    once), checks both are writable and have room for the checkpoints, and removes temp files that a
    killed run left there. A save that fails later ends in one line; the last good checkpoint is kept.
    """
    cfg = cfg or TrainConfig()
    cfg.check()
    with contextlib.ExitStack() as locks:
        # the process group starts here, with the run's own timeout (a later context() call keeps it)
        distributed.context(cfg.dist_timeout).decide(lambda: claim_outputs(locks, Path(out), Path(metrics_dir),
                                                                           LOG_NAMES))
        run = setup(cache_dir, Path(out), Path(metrics_dir), cfg, log)
        run.dist.decide(lambda: check_room(run.model, run.out))
        state = resume_or_init(run, resume)
        for epoch in range(state.epoch, cfg.epochs):
            train_epoch(run, state, epoch, progress)
            if end_of_epoch(run, state, epoch):
                run.log(f"early stop: no better validation CIDEr for {cfg.patience} epoch(s)")
                break
        run.finish(state)
        return state.summary(run.out)


def setup(cache_dir: str | os.PathLike, out: Path, metrics_dir: Path, cfg: TrainConfig, log) -> TrainRun:
    """Device, cache, a freshly initialised decoder (seeded) and its optimizer."""
    dist, device = place(cfg.device, cfg.dist_timeout)
    # raw captions: only rank 0's validation references, below
    data = load_cache(cache_dir, captions=False, grid=cfg.decoder == "attend")
    train_rows = data.training_rows(cache_dir)
    val_images = val_rows(data, cfg.val_images)
    model_cfg = ModelConfig.of(cfg, data.encoder.feature_dim, len(data.vocab), data.encoder.grid_size)
    torch.manual_seed(cfg.seed)
    model = make_decoder(model_cfg)
    model.fit_feature_stats(data.features, data.image_rows("train"), data.grid)  # a resume loads the saved ones
    trainer = Trainer(model, cfg, device, ddp=dist.enabled)
    return TrainRun(cfg=cfg, data=data, model=trainer.model, opt=trainer.opt, model_cfg=model_cfg, device=device,
                    dist=dist, val_images=val_images, references=data.references(val_images) if dist.is_main else {},
                    record=training_images_record(data), out=out, metrics_dir=metrics_dir,
                    log=log if dist.is_main else (lambda m: None), trainer=trainer, train_rows=train_rows)


def resume_or_init(run: TrainRun, wanted: bool) -> TrainState:
    """With `wanted` and a last.pt: its weights, optimizer, state and RNG; else a fresh state."""
    state = resume(run, wanted, lambda ckpt: check_resumable(ckpt, run.data, run.model_cfg, run.last), TrainState)
    if state is None:
        if wanted:
            run.log(f"--resume: no {run.last} yet, starting from scratch")
        return TrainState()
    run.log(f"resuming from {run.last}: epoch {state.epoch}, step {state.step}")
    return state


def train_epoch(run: TrainRun, state: TrainState, epoch: int, progress: bool) -> None:
    """One pass over the training captions; appends its steps to the log and advances `state`.

    Under DDP every rank takes its slice of the same global batches and weights its loss by its share
    of each batch's tokens (see the module docstring); the logged loss is the global batch's."""
    cfg, data, dist = run.cfg, run.data, run.dist
    lr = run.trainer.set_lr(epoch)
    batches = epoch_batches(data, run.train_rows, cfg, epoch, dist)
    whole, weights = batches, None
    if dist.enabled:
        whole = global_batches(data, run.train_rows, cfg, epoch, dist.world_size)
        torch.manual_seed(rank_seed(cfg.seed, epoch, dist.rank))
        totals = torch.tensor([token_count(data, b) for b in whole], dtype=torch.float64)
        mine = torch.tensor([token_count(data, b) for b in batches], dtype=torch.float64)
        weights = (mine * dist.world_size / totals).tolist()
    t0 = time.perf_counter()
    losses = run_epoch(run.trainer, data, batches, progress and dist.is_main, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       weights=weights)
    if dist.enabled and losses:  # each step's mean token loss over the global batch, as one process logs it
        losses = (dist.all_sum(torch.tensor(losses, dtype=torch.float64) * mine) / totals).tolist()
    seconds = time.perf_counter() - t0
    for i, loss in enumerate(losses):
        run.steps_log.append({"step": state.step + i + 1, "epoch": epoch + 1, "loss": loss,
                              "perplexity": math.exp(min(loss, 50.0)), "lr": lr})
    n_captions = sum(len(b) for b in whole)
    state.history.append({"epoch": epoch + 1, "step": state.step + len(losses), "lr": lr,
                          "train_loss": sum(losses) / max(len(losses), 1), "seconds": seconds,
                          "captions_per_second": n_captions / seconds if seconds else 0.0})
    state.step += len(losses)
    state.epoch = epoch + 1
    state.seconds += seconds
    state.captions += n_captions


def end_of_epoch(run: TrainRun, state: TrainState, epoch: int) -> bool:
    """Rank 0 validates, logs, keeps best.pt and writes last.pt and the logs; True when training should
    stop early. The other ranks wait at the broadcast, so every rank leaves the loop after the same epoch."""
    cfg, stop = run.cfg, False
    if run.dist.is_main:
        row = state.history[-1]
        row.update(run.validate())
        row = state.history[-1] = {k: row[k] for k in ("epoch", "step", "lr", "train_loss", *SCORE_KEYS,
                                                       "seconds", "captions_per_second") if k in row}
        improved = state.keep_best(row, row.get("CIDEr", -row.get("val_loss", 0.0)), SCORE_KEYS, epoch)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        run.log(" ".join([f"epoch {epoch + 1}: train_loss {row['train_loss']:.4f}"] +
                         [f"{k} {row[k]:.4f}" for k in SCORE_KEYS if k in row] +
                         [f"{row['captions_per_second']:.0f} captions/s", "(best)" if improved else ""]))
        stop = bool(cfg.patience) and state.bad_epochs >= cfg.patience
        run.save_epoch(state, improved, last=(epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stop)
    return run.dist.broadcast(stop)


def check_resumable(ckpt: dict, data: CaptionData, model_cfg: ModelConfig, path: Path) -> None:
    if not same_cache(ckpt, data):
        raise PipelineError(f"{path} was trained on another cache (vocabulary or features differ): "
                            f"train from scratch (drop --resume) or point --cache-dir at the cache it used")
    if ckpt["model_config"] != model_cfg.as_dict():
        raise PipelineError(f"{path} has other model settings ({ckpt['model_config']}) than asked "
                            f"({model_cfg.as_dict()}): resume with the same settings or drop --resume")
