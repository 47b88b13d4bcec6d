"""Self-critical sequence training (SCST) from the feature cache: optimise CIDEr-D directly.

Starts from a cross-entropy checkpoint (train's best.pt) and trains the same decoder with REINFORCE:
for each training image, sample K captions (multinomial), reward each with its CIDEr-D against the
image's reference captions (`pipeline.scst.cider`, document frequencies of the training split,
<end> counted as a word), and push up the log-probability of the samples that beat the baseline:

    loss = -sum_k (r_k - b_k) * log p(caption_k) / number of sampled tokens
    b_k  = mean reward of the image's other K-1 samples        (baseline "loo", Luo 2020)
         | reward of the image's greedy caption                 (baseline "greedy", Rennie et al. 2017)

The CNN is never run: like train, this reads the cached features only. After every epoch rank 0
decodes the validation images greedily and keeps the best CIDEr as best.pt; the cross-entropy model
itself is scored first (epoch 0), so best.pt is never worse on validation than where SCST started. On the
demo, whose pictures' attributes are known, an epoch whose captions get fewer validation pictures all right
(pipeline.decoder.attributes) than the start is never kept as best.pt, whatever its CIDEr.
Checkpoints have train's format, so evaluate and caption take them as they are.

Outputs:  OUT/last.pt, OUT/best.pt
          METRICS/scst_steps.csv   step, epoch, reward, baseline, length, loss
          METRICS/scst_epochs.json one row per epoch: mean reward, baseline, sampled length, val CIDEr...
          METRICS/scst.json        the best epoch and its scores (dvc metrics)
          METRICS/scst.png         reward and baseline per step, validation CIDEr per epoch

Reproducibility and resume: each epoch's image order and sampling numbers come from (seed, epoch)
alone (the captions are drawn by inverting each row's distribution at its own uniform number), so
`--resume` from last.pt (written after every epoch) ends exactly where an uninterrupted run would
(on the CPU), and N ranks sample the captions one process would.
Many processes (torchrun): every rank takes an interleaved slice of each batch's images (all K
samples of an image stay on one rank, as the leave-one-out baseline needs), weights its loss by its
share of the batch's sampled tokens, and the gradients are summed over the ranks before the step,
so N processes take the 1-process step up to float rounding.
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

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import distributed, paths
from pipeline.core.errors import PipelineError
from pipeline.decoder.attributes import attribute_accuracy, read_row_truths
from pipeline.decoder.checkpoint import load_checkpoint, needs_grid, restore_decoder, same_cache
from pipeline.decoder.data import load_cache
from pipeline.decoder.decode import decode_rows
from pipeline.decoder.model import ModelConfig
from pipeline.decoder.overlap import RECORD_KEY, training_images_record
from pipeline.scst.cider import CiderD, load_or_build_df
from pipeline.scst.config import ScstConfig
from pipeline.scst.sample import (
    greedy_baseline,
    greedy_captions,
    leave_one_out_baseline,
    sample_captions,
    sampling_policy,
    scst_loss,
)
from pipeline.trainer.outputs import check_room, claim_outputs
from pipeline.trainer.plots import plot_scst
from pipeline.trainer.run import Run, RunState, place, rank_seed, resume, val_rows

SCORE_KEYS = ("val_loss", "CIDEr", "BLEU-4", "all_right")  # all_right: the demo's only (see ScstRun.validate)
LOG_NAMES = ("scst_steps.csv", "scst_epochs.json", "scst.json", "scst.png")
STEP_KEYS = ("reward", "baseline", "length", "loss")
# what each training epoch's row of scst_epochs.json says about its sampling; the starting row (epoch 0, no
# sampling) has them too, as null, since `dvc plots` fails on rows that lack keys of the others
EPOCH_KEYS = ("reward", "baseline", "sample_length", "seconds", "samples_per_second")


@dataclass
class ScstState(RunState):
    """RunState plus the sampled captions trained on; best_epoch 0 is the cross-entropy checkpoint itself,
    and history's first row (epoch 0) the starting point."""

    samples: int = 0  # sampled captions trained on


@dataclass
class ScstSummary:
    epochs_run: int
    best_epoch: int
    start: dict  # validation scores of the cross-entropy checkpoint
    best: dict
    seconds: float
    samples_per_second: float
    out: str

    def line(self) -> str:
        cider = f"validation CIDEr {self.start.get('CIDEr', float('nan')):.4f} -> {self.best.get('CIDEr', float('nan')):.4f}"
        return (f"scst: {self.epochs_run} epoch(s), {self.seconds:.1f} s ({self.samples_per_second:.0f} sampled "
                f"captions/s); {cider} (best epoch {self.best_epoch}) -> {self.out}")


@dataclass(kw_only=True)
class ScstRun(Run):
    """What one `scst` call works with, built once by `setup` (or directly, as bench scst does)."""

    NAME = "scst"
    STEP_FORMATS = dict.fromkeys(STEP_KEYS, ".6f")

    scorer: CiderD  # anything with CiderD.score
    train_images: torch.Tensor  # (N_train,) image rows with a valid feature and reference captions
    init: str = ""  # the cross-entropy checkpoint SCST started from
    val_truths: dict = field(default_factory=dict)  # val image row -> its attributes where known (the demo's)
    policy: object = None  # what samples: the model, or the model with its step compiled (None: the model)

    def validate(self) -> dict:
        """Run.validate, plus, where the val pictures' attributes are known (the demo), the share of greedy
        captions that get them all right: on the demo CIDEr rose while captions said "on the right" for every
        place, so best.pt must not lower this share (end_of_epoch)."""
        row = super().validate()
        if self.val_truths:
            v = self.data.vocab
            hyps = decode_rows(self.model, self.data, self.val_images, self.device, beam_size=1,
                               max_length=self.cfg.max_length, start_id=v.start_id, end_id=v.end_id,
                               banned_ids=(v.pad_id, v.start_id, v.unk_id))
            captions = {int(r): v.decode(h.tokens) for r, h in zip(self.val_images, hyps)}
            row["all_right"] = attribute_accuracy(captions, self.val_truths)["all_right"]
        return row

    def captions_to_sample(self, from_epoch: int) -> int:
        """Sampled captions of the epochs from `from_epoch` on, all ranks' (so every rank decides the same)."""
        return (self.cfg.epochs - from_epoch) * len(self.train_images) * self.cfg.samples

    def choose_policy(self, from_epoch: int) -> str:
        """Set `policy` as scst.compile decides for the captions still to sample from `from_epoch` on; returns
        the decision in a few words."""
        self.policy, why = sampling_policy(self.model, self.model_cfg.decoder, self.cfg.compile, self.device,
                                           self.captions_to_sample(from_epoch), self.log)
        return why

    def checkpoint_entry(self) -> dict:
        return {"scst": {"init": self.init, **asdict(self.cfg)}}

    def unfinished(self, ckpt: dict) -> str | None:
        epoch, epochs = ckpt.get("epoch", 0), ckpt.get("scst", {}).get("epochs")
        return f"epoch {epoch} of {epochs}" if epochs and epoch < epochs else None

    def summary(self, state: ScstState) -> dict:
        last = state.history[-1] if state.history else {}
        return {"reward": last.get("reward"), "scst_seconds": round(state.seconds, 3)}

    def plot(self, state: ScstState) -> None:
        plot_scst(self.steps_log, state.history, self.metrics_dir / "scst.png",
                  title=f"SCST from {self.init}: best epoch {state.best_epoch} of {state.epoch}")


def scst(cache_dir: str | os.PathLike = paths.CACHE_DIR, init: str | os.PathLike = paths.XE_CHECKPOINT,
         out: str | os.PathLike = paths.SCST_DIR, metrics_dir: str | os.PathLike = paths.SCST_METRICS,
         cfg: ScstConfig | None = None, resume: bool = False, progress: bool = True,
         log: Callable[[str], None] = print) -> ScstSummary:
    """Self-critical training of the decoder in `init` on the cache in `cache_dir`.

    Writes OUT/best.pt (best validation CIDEr, the starting model included), OUT/last.pt and the
    METRICS files of the module docstring; builds cache_dir/cider_df.npz when it is missing or stale.
    Refuses (PipelineError) a bad setting, a leave-one-out baseline with fewer than 2 samples, a
    missing or foreign `init` checkpoint or one trained on another cache, and a cache without
    training captions.

    Like train: before any work rank 0 locks OUT and METRICS (a second run into either is refused), checks
    both are writable and have room for the checkpoints, and removes temp files a killed run left there.
    """
    cfg = cfg or ScstConfig()
    cfg.check()
    if cfg.baseline == "loo" and cfg.samples < 2:
        raise PipelineError("scst.baseline loo compares each sample with the image's other samples: set "
                            "scst.samples >= 2, or scst.baseline greedy")
    with contextlib.ExitStack() as locks:
        distributed.context().decide(lambda: claim_outputs(locks, Path(out), Path(metrics_dir), LOG_NAMES))
        run = setup(Path(cache_dir), Path(init), Path(out), Path(metrics_dir), cfg, log)
        run.dist.decide(lambda: check_room(run.model, run.out))
        state = resume_or_start(run, resume)
        run.log(run.choose_policy(state.epoch))
        for epoch in range(state.epoch, cfg.epochs):
            train_epoch(run, state, epoch, progress)
            end_of_epoch(run, state, epoch)
        run.finish(state)
        start = state.history[0] if state.history else {}
        return ScstSummary(epochs_run=state.epoch, best_epoch=state.best_epoch,
                           start={k: start[k] for k in SCORE_KEYS if k in start}, best=dict(state.best),
                           seconds=state.seconds, out=str(run.out),
                           samples_per_second=state.samples / state.seconds if state.seconds else 0.0)


def setup(cache_dir: Path, init: Path, out: Path, metrics_dir: Path, cfg: ScstConfig, log) -> ScstRun:
    """Device, cache, the starting decoder and its optimizer, and the CIDEr-D scorer of the train split."""
    dist, device = place(cfg.device)  # sampled captions vary in length
    ckpt = load_checkpoint(init)
    data = load_cache(cache_dir, grid=needs_grid(ckpt))
    if not same_cache(ckpt, data):
        raise PipelineError(f"{init} was trained on another cache (vocabulary or features differ): point --init at "
                            f"a checkpoint trained on {cache_dir}, or --cache-dir at the cache it was trained on")
    model, _, _ = restore_decoder(ckpt, device)
    with_refs = np.unique(data.caption_image[data.training_rows(cache_dir)].numpy())  # valid train images with captions

    def build_df():  # rank 0 builds cider_df.npz once; under torchrun the others then read the file
        df = load_or_build_df(cache_dir, data)
        return None if dist.enabled else df

    scorer = CiderD.from_data(dist.decide(build_df) or load_or_build_df(cache_dir, data), data, "train")
    val_images = val_rows(data, cfg.val_images)
    return ScstRun(cfg=cfg, data=data, model=model, opt=torch.optim.Adam(model.parameters(), lr=cfg.lr),
                   model_cfg=ModelConfig(**ckpt["model_config"]), device=device, dist=dist, val_images=val_images,
                   references=data.references(val_images),
                   record=ckpt.get(RECORD_KEY) or training_images_record(data),  # the images cross-entropy trained on
                   out=out, metrics_dir=metrics_dir, log=log if dist.is_main else (lambda m: None), scorer=scorer,
                   train_images=torch.from_numpy(with_refs).long(), init=str(init),
                   val_truths=read_row_truths(data.manifest, val_images) if dist.is_main else {})


def resume_or_start(run: ScstRun, wanted: bool) -> ScstState:
    """With `wanted` and a last.pt: its weights, optimizer and state. Else score the starting model
    (epoch 0 of the history) and keep it as best.pt."""
    def check(ckpt: dict) -> None:
        if ckpt.get("scst", {}).get("init") != run.init or ckpt["model_config"] != run.model_cfg.as_dict():
            raise PipelineError(f"{run.last} continues SCST from another checkpoint or model than --init "
                                f"{run.init}: drop --resume, or pass the --init it started from")

    state = resume(run, wanted, check, ScstState)
    if state is not None:
        run.log(f"resuming SCST from {run.last}: epoch {state.epoch}, step {state.step}")
        return state
    if wanted:
        run.log(f"--resume: no {run.last} yet, starting SCST from {run.init}")
    state = ScstState()
    if run.dist.is_main:
        row = {"epoch": 0, "step": 0, **dict.fromkeys(EPOCH_KEYS), **run.validate()}
        state.history.append(row)
        state.best_score, state.best = row.get("CIDEr", -math.inf), {k: row[k] for k in SCORE_KEYS if k in row}
        run.log("start: " + " ".join(f"{k} {row[k]:.4f}" for k in SCORE_KEYS if k in row) + f" ({run.init})")
        run.save_epoch(state, improved=True, last=False)
    return state


def scst_step(run: ScstRun, images: torch.Tensor, uniforms: torch.Tensor) -> dict:
    """One SCST update on this rank's image rows (B,) of a global batch, sampling with this rank's rows
    of the batch's uniforms (B*k, max_length); returns the batch's global sums: reward, baseline,
    length, loss (times the rank's samples) and the sample count."""
    cfg, data, dist, v = run.cfg, run.data, run.dist, run.data.vocab
    banned = (v.pad_id, v.start_id, v.unk_id)
    k = cfg.samples
    feats = data.image_inputs(images, run.device)  # (B, D) or (B, 1 + R, D)
    run.model.train()
    s = sample_captions(run.policy or run.model, feats, k, cfg.max_length, v.start_id, v.end_id, banned,
                        uniforms=uniforms)  # N = B*k rows
    rows = images.repeat_interleave(k).numpy()  # (N,) image row of each sample
    rewards = torch.from_numpy(run.scorer.score(s.tokens.cpu(), s.lengths.cpu(), rows)).float().to(run.device)  # (N,)
    if cfg.baseline == "loo":
        base = leave_one_out_baseline(rewards, k)  # (N,)
    else:
        g_tokens, g_lengths = greedy_captions(run.model, feats, cfg.max_length, v.start_id, v.end_id, banned)
        g_rewards = run.scorer.score(g_tokens.cpu(), g_lengths.cpu(), images.numpy())  # (B,)
        base = greedy_baseline(torch.from_numpy(g_rewards).float().to(run.device), k)
    loss = scst_loss(s.logprobs, s.mask, rewards, base)  # mean over this rank's sampled tokens
    tokens = s.mask.sum().double()
    weight = float(tokens / dist.all_sum(tokens.reshape(1))[0]) * dist.world_size if dist.enabled else 1.0
    run.opt.zero_grad(set_to_none=True)
    (loss * weight).backward()
    if dist.enabled:  # sum of the ranks' token-weighted gradients = the global batch's gradient
        for p in run.model.parameters():
            if p.grad is not None:
                p.grad.copy_(dist.all_sum(p.grad) / dist.world_size)
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
    run.opt.step()
    n = len(rewards)
    sums = torch.tensor([float(rewards.sum()), float(base.sum()), float(s.lengths.sum()), float(loss.detach()) * n, n],
                        dtype=torch.float64)
    return dict(zip((*STEP_KEYS, "n"), dist.all_sum(sums).tolist()))


def train_epoch(run: ScstRun, state: ScstState, epoch: int, progress: bool) -> None:
    """One pass over the training images in (seed, epoch) order, batch_size images a step."""
    cfg, dist = run.cfg, run.dist
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = run.train_images[torch.randperm(len(run.train_images), generator=g)]
    batches = [b for b in torch.split(order, cfg.batch_size) if len(b) >= dist.world_size]
    torch.manual_seed(rank_seed(cfg.seed, epoch, dist.rank))  # dropout, reproducible on resume
    bar = tqdm(total=len(order), unit="img", desc=f"scst {epoch + 1}/{cfg.epochs}", disable=not (progress and dist.is_main),
               dynamic_ncols=True, file=sys.stderr)
    t0, totals = time.perf_counter(), dict.fromkeys((*STEP_KEYS, "n"), 0.0)
    for b in batches:
        # the batch's sampling numbers come from (seed, epoch, step) and are sliced like its images, so
        # any number of ranks samples the captions one process would
        u = torch.rand(len(b), cfg.samples, cfg.max_length, generator=g)  # (B, k, L)
        mine = slice(dist.rank, None, dist.world_size)
        sums = scst_step(run, b[mine], u[mine].reshape(-1, cfg.max_length))
        state.step += 1
        run.steps_log.append({"step": state.step, "epoch": epoch + 1, **{key: sums[key] / sums["n"] for key in STEP_KEYS}})
        totals = {key: totals[key] + sums[key] for key in totals}
        bar.update(len(b))
        bar.set_postfix(reward=f"{sums['reward'] / sums['n']:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    n = max(totals["n"], 1.0)
    state.history.append({"epoch": epoch + 1, "step": state.step, "reward": totals["reward"] / n,
                          "baseline": totals["baseline"] / n, "sample_length": totals["length"] / n,
                          "seconds": seconds, "samples_per_second": totals["n"] / seconds if seconds else 0.0})
    state.epoch, state.seconds, state.samples = epoch + 1, state.seconds + seconds, state.samples + int(totals["n"])


def end_of_epoch(run: ScstRun, state: ScstState, epoch: int) -> None:
    """Rank 0 validates (greedy CIDEr), logs, keeps best.pt and writes last.pt and the logs."""
    if run.dist.is_main:
        row = state.history[-1]
        row.update(run.validate())
        start = state.history[0].get("all_right") if state.history else None
        kept = start is None or row.get("all_right", start) >= start  # never fewer demo pictures all right
        improved = state.keep_best(row, row.get("CIDEr", -math.inf) if kept else -math.inf, SCORE_KEYS, epoch)
        run.log(f"scst epoch {epoch + 1}: reward {row['reward']:.4f} baseline {row['baseline']:.4f} "
                f"length {row['sample_length']:.2f} " + " ".join(f"{k} {row[k]:.4f}" for k in SCORE_KEYS if k in row)
                + f" {row['samples_per_second']:.0f} samples/s" + (" (best)" if improved else ""))
        run.save_epoch(state, improved, last=True)
    run.dist.barrier()
