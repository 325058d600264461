"""Long runs on shared clusters: stop cleanly on a preemption signal, record progress for the lost-work report.

`Preemption`: SIGTERM (a scheduler preempting the job, `scancel`) or SIGUSR1 (SLURM's warning before the time
limit, `--signal=USR1@90`) sets a flag; at the next optimiser-step boundary every rank learns of it (one
all-reduce), last.ckpt is written at that step, and the run stops with `Preempted` (the CLI exits with
status 75, EX_TEMPFAIL: try again). Under SLURM a SIGUSR1 also requeues the job (`scontrol requeue`); the
requeued job continues through `resume=auto`.

`Heartbeat`: rank 0 writes `<run>/progress.json` (global step, epoch, time) every few seconds, so a resume can
say how many steps and minutes were lost since the checkpoint it continues from.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from callbacks.checkpointing import at_last_training_batch

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # sysexits EX_TEMPFAIL: the job can be run again (requeued) and resumes
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a step boundary after a preemption signal; last.ckpt holds that step."""

    def __init__(self, signum: int, step: int, epoch: int, checkpoint: Path, requeued: bool) -> None:
        self.signum, self.step, self.epoch, self.checkpoint, self.requeued = signum, step, epoch, checkpoint, requeued
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(f"preempted by {name}: stopped at step {step} (epoch {epoch}), checkpoint {checkpoint}"
                         + ("; the SLURM job is requeued" if requeued else "") + "; continue with resume=auto")


def slurm_job_id() -> Optional[str]:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this SLURM job (the job script's `resume=auto` then continues the run)."""
    job = slurm_job_id()
    if job is None:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("preemption: could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.warning("preemption: scontrol requeue %s failed: %s", job, done.stderr.strip())
    return done.returncode == 0


_received = [0]  # the preemption signal this process got (0: none); set by the handler, read at step boundaries


def _note_signal(signum: int, frame: Optional[FrameType]) -> None:
    _received[0] = signum  # only a flag: the training loop acts at a step boundary


@contextlib.contextmanager
def preemption_signals(received: int = 0) -> Iterator[None]:
    """Around `fit`: a SIGTERM/SIGUSR1 during start-up or a resume is remembered, not fatal (training then stops at
    its first step boundary with a checkpoint); the previous handlers come back afterwards. `received`: a signal
    the command caught before this (the CLI catches them from its first line)."""
    _received[0] = received
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _note_signal) for signum in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class Preemption(Callback):
    """Stop every rank at the next optimiser-step boundary after SIGTERM/SIGUSR1, with last.ckpt at that step."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    @property
    def received(self) -> int:
        return _received[0]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning installed its own handlers (which would kill the other ranks at once)
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, _note_signal)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # mid-accumulation: not a step boundary
        self._last_step = trainer.global_step
        if at_last_training_batch(trainer):
            return  # the epoch's validation comes next: stop after it, with the epoch-end state (StepCheckpoint)
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        if not trainer.strategy.reduce_boolean_decision(bool(self.received), all=False):
            return
        trainer.save_checkpoint(self.checkpoint)  # every rank calls it: it synchronises them
        requeued = self.received == signal.SIGUSR1 and trainer.is_global_zero and requeue_slurm_job()
        raise Preempted(self.received, trainer.global_step, trainer.current_epoch, self.checkpoint, requeued)


class Heartbeat(Callback):
    """Rank 0 writes `progress.json` (global_step, epoch, unix time) at most every `interval` seconds."""

    def __init__(self, path: Path, interval: float = 5.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self._written = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.time()
        if not trainer.is_global_zero or now - self._written < self.interval:
            return
        self._written = now
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"global_step": trainer.global_step, "epoch": trainer.current_epoch, "time": now}))
        os.replace(tmp, self.path)


def lost_work(progress: Path, checkpoint: dict[str, Any], checkpoint_path: Path) -> Optional[tuple[int, float]]:
    """(steps, minutes) run after `checkpoint` was written and lost with the process, from the heartbeat; None
    when the previous attempt left no heartbeat."""
    if not progress.is_file():
        return None
    try:
        beat = json.loads(progress.read_text())
    except (OSError, ValueError):
        return None
    steps = max(0, int(beat["global_step"]) - int(checkpoint.get("global_step", 0)))
    minutes = max(0.0, (float(beat["time"]) - checkpoint_path.stat().st_mtime) / 60.0)
    return steps, minutes
