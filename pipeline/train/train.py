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

Many processes (`torchrun --nproc_per_node N -m pipeline train ...`, see `pipeline.distributed`):
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
import csv
import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import write_json, write_text
from pipeline.core.locks import hold_all
from pipeline.core.runtime import amp_dtype, choose_device, tune
from pipeline.core.storage import (
    check_free_space,
    ensure_writable,
    human_bytes,
    remove_stale_temps,
    reporting_disk_errors,
)
from pipeline.decoder.checkpoint import load_checkpoint, save_checkpoint
from pipeline.decoder.data import CaptionData, length_grouped_batches, load_cache
from pipeline.decoder.decode import decode
from pipeline.decoder.model import CaptionDecoder, ModelConfig, packed_targets, teacher_forcing
from pipeline.decoder.overlap import RECORD_KEY, training_images_record
from pipeline.train.config import TrainConfig
from pipeline.train.plots import plot_training

SCORE_KEYS = ("val_loss", "val_perplexity", "CIDEr", "BLEU-4")


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
class TrainState:
    """Where a run stands; saved in every checkpoint (as a plain dict) so --resume continues exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken (batches, with accumulation)
    best_epoch: int = 0
    best: dict = field(default_factory=dict)  # the best epoch's SCORE_KEYS
    best_score: float = -math.inf  # validation CIDEr (or -val_loss without validation images)
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    history: list = field(default_factory=list)  # one row per epoch (train_epochs.json)
    seconds: float = 0.0  # training time, validation excluded
    captions: int = 0  # captions trained on

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return known_fields(cls, d)

    def summary(self, out: Path) -> TrainSummary:
        return TrainSummary(epochs_run=self.epoch, steps=self.step, best_epoch=self.best_epoch, best=dict(self.best),
                            seconds=self.seconds, captions_per_second=self.captions / self.seconds if self.seconds else 0.0,
                            out=str(out), history=list(self.history))


class Trainer:
    """Model, optimizer and the one training step; shared by `train` and `pipeline bench train`."""

    def __init__(self, model: CaptionDecoder, cfg: TrainConfig, device: torch.device, ddp: bool = False):
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

    def loss(self, features, words, n, start_id: int, end_id: int):
        return caption_loss(self.net, features, words, n, start_id, end_id, self.device, self.amp_dtype)

    def step(self, features, words, n, start_id, end_id, update: bool = True, weight: float | None = None,
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
            loss, _ = self.loss(features, words, n, start_id, end_id)
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
                                f"(non-finite); no checkpoint is written for it. Check the features "
                                f"(`pipeline extract --force`) or lower --lr / set --clip")


def caption_loss(net, features: torch.Tensor, words: torch.Tensor, n: torch.Tensor, start_id: int, end_id: int,
                 device: torch.device, amp_dtype=None) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy of a batch, and its token count.

    features (B, D) any float dtype; words (B, L) 0-padded word ids; n (B,) word counts (on the CPU,
    since packing needs CPU lengths).
    """
    inputs, targets, lengths, order = teacher_forcing(words, n, start_id, end_id)  # (B, T), (B, T), (B,)
    features = features[order].to(device, non_blocking=True).float()
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(features, inputs, lengths)  # (sum(lengths), V)
    loss = F.cross_entropy(logits.float(), packed_targets(targets, lengths))
    return loss, int(lengths.sum())


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
    """Train over `batches`; returns the per-step losses (fetched from the device once, at the end).

    `weights`: one loss multiplier per batch for the backward pass (see Trainer.step), or None."""
    trainer.model.train()
    vocab = data.vocab
    losses = []
    bar = tqdm(total=sum(len(b) for b in batches), unit="cap", desc=desc, disable=not progress,
               dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
    for i, rows in enumerate(batches):
        update = (i + 1) % trainer.cfg.accumulate == 0 or i == len(batches) - 1
        feats = data.features[data.caption_image[rows]]  # (B, D) float16 in memory
        loss = trainer.step(feats, data.labels[rows], data.lengths[rows], vocab.start_id, vocab.end_id, update,
                            None if weights is None else weights[i], accumulation_group(i, len(batches),
                                                                                        trainer.cfg.accumulate))
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


@torch.no_grad()
def validate(model: CaptionDecoder, data: CaptionData, cfg: TrainConfig, device: torch.device,
             val_images: torch.Tensor, references: dict) -> dict:
    """Validation loss/perplexity over every val caption, and greedy-decoding CIDEr/BLEU-4."""
    model.eval()
    rows = data.caption_rows("val")
    total, tokens = 0.0, 0
    v = data.vocab
    for b in torch.split(rows, cfg.batch_size * 4):
        loss, n_tok = caption_loss(model, data.features[data.caption_image[b]], data.labels[b], data.lengths[b],
                                   v.start_id, v.end_id, device)
        total += float(loss) * n_tok
        tokens += n_tok
    out = {}
    if tokens:
        out["val_loss"] = total / tokens
        out["val_perplexity"] = math.exp(min(out["val_loss"], 50.0))
    if len(val_images):
        hyps = decode(model, data.features[val_images].to(device).float(), beam_size=1, max_length=cfg.max_length,
                      start_id=v.start_id, end_id=v.end_id, banned_ids=(v.pad_id, v.start_id, v.unk_id))
        from pipeline.decoder.metrics import fast_scores  # pycocoevalcap: loaded only when validation scores

        candidates = {int(r): v.decode(h.tokens) for r, h in zip(val_images, hyps)}
        out.update(fast_scores(references, candidates))
    return out


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """What one `train` call works with, built once by `setup`."""

    cfg: TrainConfig
    data: CaptionData
    model_cfg: ModelConfig
    trainer: Trainer
    device: torch.device
    dist: distributed.Context
    train_rows: torch.Tensor  # (M_train,) caption rows trained on
    val_images: torch.Tensor  # (N_val,) image rows decoded at validation
    references: dict  # row -> tokenized reference captions of val_images
    out: Path
    metrics_dir: Path
    log: Callable[[str], None]
    steps_log: list = field(default_factory=list)  # one row per optimizer step (train_steps.csv)

    @property
    def last(self) -> Path:
        return self.out / "last.pt"


def train(cache_dir: str | os.PathLike = "cache", out: str | os.PathLike = "checkpoints",
          metrics_dir: str | os.PathLike = "metrics", cfg: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> TrainSummary:
    """Train the decoder of `cfg` on the cache in `cache_dir`; write checkpoints to `out` and logs to `metrics_dir`.

    Outputs: OUT/best.pt (the best validation CIDEr), OUT/last.pt (where the run stands), and the
    METRICS files listed in the module docstring. `resume` continues from OUT/last.pt and ends
    exactly where an uninterrupted run would. Refuses (PipelineError) a bad setting, a cache whose
    files do not belong together, a cache without training captions, and a last.pt made with another
    cache or other model settings.

    Before any work, rank 0 takes the locks of OUT and METRICS (a second run into either is refused at
    once), checks both are writable and have room for the checkpoints, and removes temp files that a
    killed run left there. A save that fails later ends in one line; the last good checkpoint is kept.
    """
    with contextlib.ExitStack() as locks:
        return _train(cache_dir, out, metrics_dir, cfg, resume, progress, log, locks)


def _train(cache_dir, out, metrics_dir, cfg: TrainConfig | None, resume: bool, progress: bool, log,
           locks: contextlib.ExitStack) -> TrainSummary:
    """`train`, with `locks` holding (on rank 0) the locks of its output folders until it returns."""
    cfg = cfg or TrainConfig()
    cfg.check()
    distributed.context().decide(lambda: claim_outputs(locks, Path(out), Path(metrics_dir)))
    run = setup(cache_dir, Path(out), Path(metrics_dir), cfg, log)
    run.dist.decide(lambda: check_room(run.trainer.model, run.out))
    state = resume_or_init(run, resume)
    for epoch in range(state.epoch, cfg.epochs):
        train_epoch(run, state, epoch, progress)
        if end_of_epoch(run, state, epoch):
            run.log(f"early stop: no better validation CIDEr for {cfg.patience} epoch(s)")
            break
    if run.dist.is_main:
        with reporting_disk_errors(run.metrics_dir, f"the checkpoints in {run.out} are kept: free space and "
                                   f"rerun with --resume to write the logs"):
            write_logs(run, state, final=True)
    return state.summary(run.out)


def setup(cache_dir: str | os.PathLike, out: Path, metrics_dir: Path, cfg: TrainConfig, log) -> Run:
    """Device, cache, a freshly initialised decoder (seeded) and its optimizer."""
    dist = distributed.context(cfg.dist_timeout)
    device = choose_device(cfg.device, dist.local_rank if dist.enabled else None)
    tune(device, fixed_shapes=False)  # batches vary in caption length
    data = load_cache(cache_dir, captions=False)  # raw captions: only rank 0's validation references, below
    train_rows = data.training_rows(cache_dir)
    val_images = data.image_rows("val")
    if cfg.val_images:
        val_images = val_images[: cfg.val_images]
    model_cfg = ModelConfig.of(cfg, data.encoder.feature_dim, len(data.vocab))
    torch.manual_seed(cfg.seed)
    model = CaptionDecoder(model_cfg)
    model.fit_feature_stats(data.features, data.image_rows("train"))  # a resume overwrites these with the saved ones
    trainer = Trainer(model, cfg, device, ddp=dist.enabled)
    return Run(cfg, data, model_cfg, trainer, device, dist, train_rows, val_images,
               data.references(val_images) if dist.is_main else {},
               out, metrics_dir, log if dist.is_main else (lambda m: None))


def resume_or_init(run: Run, resume: bool) -> TrainState:
    """With `resume` and a last.pt: its weights, optimizer, state and RNG; else a fresh state.

    Rank 0 decides for all ranks whether to resume, so they never disagree (or half refuse)."""
    last = run.last

    def resumable() -> bool:
        if not (resume and last.exists()):
            return False
        check_resumable(load_checkpoint(last), run.data, run.model_cfg, last)
        return True

    if not run.dist.decide(resumable):
        if resume:
            run.log(f"--resume: no {last} yet, starting from scratch")
        return TrainState()
    ckpt = load_checkpoint(last)
    run.trainer.model.load_state_dict(ckpt["model"])
    run.trainer.opt.load_state_dict(ckpt["optimizer"])
    state = TrainState.from_dict(ckpt["train_state"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    run.steps_log = [r for r in read_steps(run.metrics_dir / "train_steps.csv") if r["step"] <= state.step]
    run.log(f"resuming from {last}: epoch {state.epoch}, step {state.step}")
    return state


def train_epoch(run: Run, state: TrainState, epoch: int, progress: bool) -> None:
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


def end_of_epoch(run: Run, state: TrainState, epoch: int) -> bool:
    """Rank 0 validates, logs, keeps best.pt and writes last.pt and the logs; True when training should
    stop early. The other ranks wait at the broadcast, so every rank leaves the loop after the same epoch."""
    cfg, stop = run.cfg, False
    if run.dist.is_main:
        row = state.history[-1]
        row.update(validate(run.trainer.model, run.data, cfg, run.device, run.val_images, run.references))
        row = state.history[-1] = {k: row[k] for k in ("epoch", "step", "lr", "train_loss", *SCORE_KEYS,
                                                       "seconds", "captions_per_second") if k in row}
        score = row.get("CIDEr", -row.get("val_loss", 0.0))
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
            state.best = {k: row[k] for k in SCORE_KEYS if k in row}
        else:
            state.bad_epochs += 1
        run.log(" ".join([f"epoch {epoch + 1}: train_loss {row['train_loss']:.4f}"] +
                         [f"{k} {row[k]:.4f}" for k in SCORE_KEYS if k in row] +
                         [f"{row['captions_per_second']:.0f} captions/s", "(best)" if improved else ""]))
        stop = bool(cfg.patience) and state.bad_epochs >= cfg.patience
        with reporting_disk_errors(run.out, f"the last good checkpoint {run.last} is kept: free space and "
                                   f"rerun with --resume"):
            if improved:
                save(run, state, run.out / "best.pt")
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stop:
                save(run, state, run.last)
                write_logs(run, state)
    return run.dist.broadcast(stop)


def save(run: Run, state: TrainState, path: Path) -> None:
    """A checkpoint of the decoder, optimizer, state and RNG: everything to resume, evaluate or caption."""
    refuse_non_finite(run.trainer.model, path)
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    save_checkpoint(path, decoder_checkpoint(run.trainer.model, run.trainer.opt, run.model_cfg, run.data, state, rng,
                                             training_images_record(run.data), train_config=asdict(run.cfg)))


def decoder_checkpoint(model: CaptionDecoder, opt: torch.optim.Optimizer, model_cfg: ModelConfig, data: CaptionData,
                       state, rng: dict, record: dict, **extra) -> dict:
    """The checkpoint payload train and scst share (evaluate and caption read either): weights, optimizer,
    settings, vocabulary, encoder record, the cache's fingerprints, the training images, the run's state
    (a dataclass with epoch and step) and RNG; `extra` names the stage's own settings."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_config": model_cfg.as_dict(), **extra,
            "vocab": list(data.vocab.tokens), "encoder": data.encoder.as_dict(),
            "cache": {k: v for k, v in data.fingerprints.items() if k != "features_settings"},
            "epoch": state.epoch, "step": state.step, "train_state": asdict(state), "rng": rng, RECORD_KEY: record}


def refuse_non_finite(model: torch.nn.Module, path: Path) -> None:
    """Never write a checkpoint whose weights hold inf/NaN: training diverged, and the last good one stays."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PipelineError(f"refusing to write {path}: the decoder holds non-finite values ({', '.join(bad[:3])}); "
                            f"training diverged, check the features or lower --lr")


CHECKPOINT_NAMES = ("last.pt", "best.pt")
LOG_NAMES = ("train_steps.csv", "train_epochs.json", "train.json", "train.png")


def claim_outputs(locks: contextlib.ExitStack, out: Path, metrics_dir: Path, log_names=LOG_NAMES) -> None:
    """Rank 0, before any work: lock OUT and METRICS, prove both writable, drop temp files a killed run left
    (of the checkpoints and of `log_names`, the stage's METRICS files). Shared by train and scst."""
    hold_all(locks, [(out, "--out"), (metrics_dir, "--metrics-dir")])
    ensure_writable(out, "--out")
    ensure_writable(metrics_dir, "--metrics-dir")
    remove_stale_temps(out, list(CHECKPOINT_NAMES))
    remove_stale_temps(metrics_dir, list(log_names))


def check_room(model: torch.nn.Module, out: Path) -> None:
    """Rank 0: refuse a run whose checkpoints cannot fit on OUT's disk. At the worst moment OUT holds
    best.pt, last.pt and the temp file replacing one of them; each holds the weights and Adam's two moments.
    Shared by train and scst."""
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = 3 * params + 65536  # + vocabulary, settings, RNG state
    have = sum((out / n).stat().st_size for n in CHECKPOINT_NAMES if (out / n).exists())
    check_free_space(out, 3 * size - have, f"checkpoints need about {human_bytes(size)} each (best.pt, last.pt "
                     f"and a temp file while one is replaced)", "free space, or pass --out on a larger disk")


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG seed of `rank` in `epoch` under DDP (dropout): distinct per rank and epoch."""
    return ((seed * 1_000_003 + epoch) * 10_007 + rank + 1) % (1 << 63)


def same_cache(ckpt: dict, data: CaptionData) -> bool:
    """Whether `ckpt` was trained on this cache's vocabulary and features (their fingerprints)."""
    cache = ckpt.get("cache", {})
    return cache.get("vocab") == data.fingerprints["vocab"] and cache.get("features") == data.fingerprints["features"]


def known_fields(cls, d: dict):
    """A dataclass `cls` from the keys of `d` it knows: a run's state read back from a checkpoint."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def check_resumable(ckpt: dict, data: CaptionData, model_cfg: ModelConfig, path: Path) -> None:
    if not same_cache(ckpt, data):
        raise PipelineError(f"{path} was trained on another cache (vocabulary or features differ): "
                            f"train from scratch (drop --resume) or point --cache-dir at the cache it used")
    if ckpt["model_config"] != model_cfg.as_dict():
        raise PipelineError(f"{path} has other model settings ({ckpt['model_config']}) than asked "
                            f"({model_cfg.as_dict()}): resume with the same settings or drop --resume")


STEP_FORMATS = {"loss": ".6f", "perplexity": ".4f", "lr": ".3g"}  # train_steps.csv's columns after step, epoch


def read_steps(path: Path) -> list[dict]:
    """A steps CSV (train's or scst's) back as rows: step and epoch ints, every other column a float."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k in ("step", "epoch") else float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_steps(path: Path, rows: list[dict], formats: dict[str, str]) -> None:
    """One row per optimizer step: step, epoch, then the `formats` columns, each written with its format."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "epoch", *formats], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, **{k: format(r[k], spec) for k, spec in formats.items()}})
    write_text(path, buf.getvalue())


def write_logs(run: Run, state: TrainState, final: bool = False) -> None:
    """train_steps.csv, train_epochs.json and train.json (and, once at the end, train.png)."""
    write_steps(run.metrics_dir / "train_steps.csv", run.steps_log, STEP_FORMATS)
    write_json(run.metrics_dir / "train_epochs.json", state.history)
    summary = {"best_epoch": state.best_epoch, **state.best, "epochs": state.epoch, "steps": state.step,
               "train_seconds": round(state.seconds, 3),
               "captions_per_second": round(state.captions / state.seconds, 1) if state.seconds else 0.0}
    write_json(run.metrics_dir / "train.json", summary)
    if final:  # ~0.7 s a picture: once per run, not at every save
        plot_training(run.steps_log, state.history, run.metrics_dir / "train.png",
                      title=f"{run.metrics_dir}: best epoch {state.best_epoch} of {state.epoch}")
