"""The Trainer a command runs: its loggers (CSV, W&B), callbacks (checkpoints, throughput, token maps, preemption,
per-batch reseeding) and checkpoint IO, from the checked config."""
from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from callbacks import CALLBACKS, AtomicCheckpointIO, ReseedEachBatch
from callbacks.checkpointing import StepCheckpoint
from callbacks.preemption import Heartbeat, Preemption
from experiments.config import CheckpointConfig, ConfigError, LoggerConfig, WandbConfig, dataclass_from
from experiments.rundirs import Run


def resolve_trainer(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """`precision: auto` -> bf16-mixed on a GPU that has bf16, else 32-true."""
    kwargs = dict(trainer_cfg)
    if str(kwargs.get("accelerator", "auto")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {kwargs['accelerator']}, but torch sees no GPU on this machine "
                          f"(torch.cuda.is_available() is False); use trainer.accelerator=auto or cpu")
    if kwargs.get("precision", "auto") == "auto":
        gpu = torch.cuda.is_available() and kwargs.get("accelerator", "auto") in ("auto", "gpu", "cuda")
        kwargs["precision"] = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    return kwargs


def make_loggers(cfg: dict[str, Any], run: Run) -> list[Any]:

    logger_cfg = dataclass_from(LoggerConfig, cfg.get("logger"))
    wandb_cfg = dataclass_from(WandbConfig, logger_cfg.wandb)
    loggers: list[Any] = []
    if logger_cfg.csv:
        # one metrics.csv per invocation (logs/version_K): a resumed run appends a new file, never truncates
        loggers.append(CSVLogger(save_dir=str(run.dir), name="logs"))
    if wandb_cfg.enabled:
        loggers.append(WandbLogger(
            project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group, tags=wandb_cfg.tags,
            notes=wandb_cfg.notes, name=wandb_cfg.name or f"{run.experiment}/{run.dir.name}",
            id=run.wandb_id, resume="allow", save_dir=str(run.dir), offline=wandb_cfg.offline,
        ))
    return loggers


def make_callbacks(cfg: dict[str, Any], run: Run, command: str) -> list[Any]:


    callbacks: list[Any] = [ReseedEachBatch(cfg["seed"])]
    ckpt = dataclass_from(CheckpointConfig, cfg.get("checkpoint"))
    if command == "fit":
        # Two callbacks: Lightning's save_last only rewrites last.ckpt in epochs where a top-k checkpoint
        # was saved, and a resume must always find the latest epoch.
        common = dict(dirpath=run.dir / "checkpoints", every_n_epochs=ckpt.every_n_epochs,
                      enable_version_counter=False, auto_insert_metric_name=False)
        if ckpt.save_best and ckpt.monitor is not None:
            # before last.ckpt's callback: last.ckpt stores this tracker's state, which must include this epoch
            callbacks.append(ModelCheckpoint(filename="best", monitor=ckpt.monitor, mode=ckpt.mode, save_top_k=1,
                                             **common))
        if ckpt.save_last:
            callbacks.append(ModelCheckpoint(filename="last", monitor=None, save_top_k=1, **common))
            if ckpt.every_n_train_steps or ckpt.train_time_interval:
                # mid-epoch last.ckpt (one ModelCheckpoint cannot trigger on both epochs and steps)
                interval = timedelta(seconds=ckpt.train_time_interval) if ckpt.train_time_interval else None
                callbacks.append(StepCheckpoint(
                    dirpath=run.dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                    every_n_train_steps=ckpt.every_n_train_steps, train_time_interval=interval,
                    save_on_train_epoch_end=False, enable_version_counter=False, auto_insert_metric_name=False))
        callbacks += [Preemption(run.dir / "checkpoints" / "last.ckpt"),
                      Heartbeat(run.dir / "progress.json", ckpt.progress_interval)]
    for name, settings in (cfg.get("callbacks") or {}).items():
        if settings is None or settings is False:
            continue
        callbacks.append(CALLBACKS[name](**(settings if isinstance(settings, dict) else {})))
    return callbacks


def make_trainer(cfg: dict[str, Any], run: Run, command: str) -> Any:
    """The Trainer with leanvit's loggers, callbacks and checkpoint IO; a setting Lightning refuses (a device
    that is not there, a negative epoch count) -> one line naming the trainer key."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if os.environ.get("SLURM_JOB_ID"):
        if SLURMEnvironment.detect():  # leanvit's Preemption callback requeues; Lightning's would kill the ranks
            plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer_cfg = resolve_trainer(cfg.get("trainer") or {})
    try:
        return pl.Trainer(
            **trainer_cfg,
            logger=make_loggers(cfg, run) or False,
            callbacks=make_callbacks(cfg, run, command),
            plugins=plugins,
            default_root_dir=str(run.dir),
            enable_checkpointing=command == "fit",
        )
    except (MisconfigurationException, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"trainer: {first} (trainer settings: "
                          f"{', '.join(f'{k}={v}' for k, v in (cfg.get('trainer') or {}).items())})") from err


class _DropLightningTips:
    """A logging filter for Lightning's advertising tips."""
    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


_TIPS_FILTER = _DropLightningTips()  # one instance: adding it again is a no-op


def quiet_lightning() -> None:
    """Silence the Lightning messages about concerns leanvit already handles: its epoch-level metrics are
    torchmetrics gathered over every rank (the `sync_dist=True` advice does not apply), checkpoint folders of a
    resumed run are meant to hold checkpoints, a short epoch's logging interval, the shard stream's length (each
    loader worker streams its own planned slice, so `__len__` is exact); its internal deprecation
    warnings and tips are not the user's to act on."""
    for message in (r".*sync_dist=True.*", r".*isinstance\(treespec, LeafSpec\).*",
                    r"Checkpoint directory .* exists and is not empty", r".*smaller than the logging interval.*",
                    r".*does not have many workers which may be a bottleneck.*",
                    r"Your `IterableDataset` has `__len__` defined.*"):
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_TIPS_FILTER)


def finish_wandb(trainer: Any) -> None:
    """Close the W&B run so an offline run directory is complete when the command returns."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            import wandb

            logger.experiment.finish()
            wandb.teardown()  # flushes the offline files; a later run in this process starts a fresh service
