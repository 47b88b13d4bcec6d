"""A decoder-training run, train's or scst's: what it works with, where it stands, and what it does around
its own step (device, resume from last.pt, best/last tracking, checkpoints and logs), written once.

A stage subclasses `Run` (naming its METRICS files, its step columns, its checkpoint entry, its summary
and its plot) and `RunState` (its own counters); the rest is here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.core import distributed
from pipeline.core.cache import describe_difference
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import write_json
from pipeline.core.runtime import choose_device, tune
from pipeline.core.storage import reporting_disk_errors
from pipeline.decoder.checkpoint import load_checkpoint, write_checkpoint
from pipeline.decoder.data import CaptionData
from pipeline.decoder.model import ModelConfig
from pipeline.trainer.logs import read_steps, write_steps
from pipeline.trainer.validate import validate


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (as a plain dict) so --resume continues exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    best_epoch: int = 0
    best: dict = field(default_factory=dict)  # the best epoch's scores
    best_score: float = -math.inf
    history: list = field(default_factory=list)  # one row per epoch (the epochs JSON)
    seconds: float = 0.0  # training time, validation excluded

    @classmethod
    def from_dict(cls, d: dict):
        """The state read back from a checkpoint: the keys this class knows (older files may lack some)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def keep_best(self, row: dict, score: float, keys: tuple[str, ...], epoch: int) -> bool:
        """Whether `score` of epoch `epoch` (0-based) beats the best so far; if so it becomes the best."""
        if score <= self.best_score:
            return False
        self.best_score, self.best_epoch = score, epoch + 1
        self.best = {k: row[k] for k in keys if k in row}
        return True


def _no_log(message: str) -> None:
    pass


@dataclass(kw_only=True)
class Run:
    """What one training call works with, built once by the stage's setup."""

    NAME: ClassVar[str]  # METRICS/{NAME}_steps.csv, {NAME}_epochs.json, {NAME}.json, {NAME}.png
    STEP_FORMATS: ClassVar[dict[str, str]]  # the steps CSV's columns after step and epoch

    cfg: Any  # the stage's settings (batch_size and max_length are read here)
    data: CaptionData
    model: torch.nn.Module  # the decoder itself (make_decoder's) (train's DDP wrapper lives in its Trainer)
    opt: torch.optim.Optimizer
    model_cfg: ModelConfig
    device: torch.device
    dist: distributed.Context = field(default_factory=distributed.Context)
    val_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (N_val,) rows
    references: dict = field(default_factory=dict)  # row -> tokenized references of val_images
    record: dict = field(default_factory=dict)  # the images the decoder is trained on (decoder.overlap)
    out: Path = Path(".")
    metrics_dir: Path = Path(".")
    log: Callable[[str], None] = _no_log
    steps_log: list = field(default_factory=list)  # one row per optimizer step

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def checkpoint_entry(self) -> dict:
        """The stage's own settings, as a top-level entry of its checkpoints."""
        raise NotImplementedError

    def summary(self, state: RunState) -> dict:
        """{NAME}.json's keys after best_epoch, the best scores, epochs and steps."""
        raise NotImplementedError

    def unfinished(self, ckpt: dict) -> str | None:
        """Where the run in checkpoint `ckpt` (a last.pt) stopped short of its own epochs ("epoch 2 of 3"), or
        None when it finished (early stopping included) or does not say."""
        raise NotImplementedError

    def plot(self, state: RunState) -> None:
        raise NotImplementedError

    def validate(self) -> dict:
        return validate(self.model, self.data, self.device, self.val_images, self.references,
                        self.cfg.batch_size, self.cfg.max_length)

    def save(self, state: RunState, path: Path) -> None:
        """A checkpoint of the decoder, optimizer, state and RNG: everything to resume, evaluate or caption."""
        write_checkpoint(path, self.model, self.opt, self.model_cfg, self.data, state, rng_state(self.device),
                         self.record, **self.checkpoint_entry())

    def restore(self, ckpt: dict, state_cls: type[RunState]) -> RunState:
        """Weights, optimizer, RNG and state of `ckpt`, and the steps logged up to its step."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        state = state_cls.from_dict(ckpt["train_state"])
        steps = read_steps(self.metrics_dir / f"{self.NAME}_steps.csv")
        self.steps_log = [r for r in steps if r["step"] <= state.step]
        return state

    def save_epoch(self, state: RunState, improved: bool, last: bool) -> None:
        """Rank 0 after an epoch: best.pt when it `improved`; with `last`, last.pt and the logs."""
        with reporting_disk_errors(self.out, f"the last good checkpoint {self.last} is kept: free space and "
                                   f"rerun with --resume"):
            if improved:
                self.save(state, self.out / "best.pt")
            if last:
                self.save(state, self.last)
                self.write_logs(state)

    def finish(self, state: RunState) -> None:
        """Rank 0 at the end: the logs and, once per run (~0.7 s a picture), the plot."""
        if self.dist.is_main:
            with reporting_disk_errors(self.metrics_dir, f"the checkpoints in {self.out} are kept: free space "
                                       f"and rerun with --resume to write the logs"):
                self.write_logs(state, final=True)

    def write_logs(self, state: RunState, final: bool = False) -> None:
        write_steps(self.metrics_dir / f"{self.NAME}_steps.csv", self.steps_log, self.STEP_FORMATS)
        write_json(self.metrics_dir / f"{self.NAME}_epochs.json", state.history)
        write_json(self.metrics_dir / f"{self.NAME}.json", {"best_epoch": state.best_epoch, **state.best,
                                                            "epochs": state.epoch, "steps": state.step,
                                                            **self.summary(state)})
        if final:
            self.plot(state)


def resume(run: Run, wanted: bool, check: Callable[[dict], None], state_cls: type[RunState]) -> RunState | None:
    """With `wanted` and a last.pt that passes `check` (which raises to refuse it): the restored state, on
    every rank; else None. Rank 0 decides for all, so they never disagree (or half refuse)."""
    def resumable() -> bool:
        if not run.last.exists():
            return False
        if not wanted:
            refuse_unfinished(run, load_checkpoint(run.last))
            return False
        check(load_checkpoint(run.last))
        return True

    if not run.dist.decide(resumable):
        return None
    ckpt = load_checkpoint(run.last)
    (key, now), = run.checkpoint_entry().items()  # the stage's own settings, as its checkpoints record them
    then = ckpt.get(key, {})
    shared = [k for k in now if k in then and k not in QUIET_SETTINGS]  # settings an older record lacks: not news
    changed = describe_difference({k: then[k] for k in shared}, {k: now[k] for k in shared})
    if changed:
        run.log(f"--resume: settings differ from the run's own ({changed}); the rest of the run uses the new ones")
    return run.restore(ckpt, state_cls)


# Settings that may differ on resume without changing what is trained (where it runs, how it reports).
QUIET_SETTINGS = frozenset({"device", "print_every", "dist_timeout", "epochs", "init"})



def refuse_unfinished(run: Run, ckpt: dict) -> None:
    """A fresh run (no --resume) would overwrite OUT/last.pt: refuse when it holds an interrupted run, so
    that rerunning the same command after Ctrl-C never throws its finished epochs away."""
    stopped = run.unfinished(ckpt)
    if stopped:
        raise PipelineError(f"{run.last} holds an unfinished {run.NAME} run (stopped at {stopped}): continue it "
                            f"with --resume, or start afresh into another --out (or delete {run.last})")


def place(device: str, timeout_minutes: float | None = None) -> tuple[distributed.Context, torch.device]:
    """This process's place in the job (joining the process group under torchrun with `timeout_minutes`)
    and its device, tuned for batches that vary in length."""
    dist = distributed.context(timeout_minutes)
    dev = choose_device(device, dist.local_rank if dist.enabled else None)
    tune(dev, fixed_shapes=False)
    return dist, dev


def val_rows(data: CaptionData, limit: int) -> torch.Tensor:
    """The image rows (N_val,) decoded at validation: the first `limit` valid val images (0: all)."""
    rows = data.image_rows("val")
    return rows[:limit] if limit else rows


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG seed of `rank` in `epoch` (dropout): distinct per rank and epoch, so a resumed run
    reproduces every rank's masks without saving N RNG states."""
    return ((seed * 1_000_003 + epoch) * 10_007 + rank + 1) % (1 << 63)


def rng_state(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng
