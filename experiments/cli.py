"""The `leanvit` command: `leanvit fit|validate|test CONFIG.yaml [key.path=value ...]`.

Flow: load + merge the YAML (defaults, overrides) -> check every key -> run directory -> seed ->
`METHODS[method](**model)` -> `DATAMODULES[datamodule](**data)` -> Trainer(**trainer, loggers, callbacks)
-> fit/validate/test. Config problems and bad files are reported as one line, before any work starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from experiments.build import build_objects, check_model_fits_data, load_checked  # noqa: F401  (public here too)

RUN_DIR_ENV = "LEANVIT_RUN_DIR"  # how the rank-0 process tells the DDP ranks it launches where the run lives
RESUME_ENV = "LEANVIT_RESUME_CKPT"  # ... and which checkpoint it resumes ("" for a fresh start)
DIVERGED_EXIT = 3  # a non-finite loss stopped training
LAUNCHER_ENV = "LEANVIT_LAUNCHER_PID"  # the process that started this rank (Lightning's DDP launcher = rank 0)


_EARLY_SIGNALS: list[int] = []  # SIGTERM/SIGUSR1 that reached `fit` before its heavy imports (see main)


def _note_early_signal(signum: int, frame: Any) -> None:
    _EARLY_SIGNALS.append(signum)


def launched_rank_zero() -> bool:
    """This process is rank 0 of its launch, or not launched as one rank of several (torchrun sets RANK and
    LOCAL_RANK, SLURM SLURM_PROCID, Lightning's launcher LOCAL_RANK and NODE_RANK in the ranks it starts)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _error(message: str) -> int:
    """Exit status 2 with one line on stderr; every rank of a launch gets the same bad input, rank 0 says it."""
    if launched_rank_zero():
        print(f"leanvit: error: {message}", file=sys.stderr)
    return 2


@dataclass
class Run:
    """Where a run lives and what it continues from."""

    experiment: str
    dir: Path
    resume_ckpt: Optional[Path]  # fit: the checkpoint it continues; validate/test: the checkpoint evaluated
    wandb_id: Optional[str]
    rank_zero: bool
    resume_position: Optional[dict[str, int]] = None  # rank 0: the resumed checkpoint's global_step and epoch


def experiment_name(cfg: dict[str, Any]) -> str:
    from experiments.config import EXPERIMENTS_DIR

    if cfg.get("experiment"):
        return str(cfg["experiment"])
    path = Path(cfg["config_path"])
    try:
        return str(path.relative_to(EXPERIMENTS_DIR).with_suffix(""))
    except ValueError:
        return path.stem


def global_rank() -> int:
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def pinned_run_dir(cfg: dict[str, Any], experiment_dir: Path) -> Optional[Path]:
    """The run directory a command is tied to without searching: `version=`, or the job id of a torchrun or
    SLURM job (every rank of a job starts at once and must agree; a requeued SLURM job keeps its id)."""
    from experiments.config import ConfigError

    if cfg.get("version"):
        return experiment_dir / str(cfg["version"])
    if os.environ.get("TORCHELASTIC_RUN_ID") == "none" and not os.environ.get("SLURM_JOB_ID"):
        # torchrun without --rdzv-id: every launch would share runs/<experiment>/job_none
        raise ConfigError("torchrun: no --rdzv-id, so this launch has no job id of its own to name its run "
                          "directory; add --rdzv-id=JOB (or --standalone on one node), or pass version=NAME")
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if job:
        return experiment_dir / f"job_{job}"
    return None


def find_resume(resume: str, experiment_dir: Path, pinned: Optional[Path] = None) -> Optional[Path]:
    """`last` -> the newest `last.ckpt` of this experiment; `auto` -> the same, or None (start a new run) when
    there is none - within the pinned run directory only, when the command has one (a job's own run); a run
    directory -> its `last.ckpt`; or a .ckpt file."""
    from experiments.config import ConfigError

    if resume == "auto" and pinned is not None:
        last = pinned / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    if resume in ("last", "auto"):
        found = sorted(experiment_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found and resume == "auto":
            return None
        if not found:
            raise ConfigError(f"resume=last: no {experiment_dir}/*/checkpoints/last.ckpt to resume from")
        return found[-1]
    path = Path(resume)
    if path.is_dir():
        if not (path / "checkpoints").is_dir() and not (path / "config.yaml").is_file():
            raise ConfigError(f"resume: {str(path)!r} is not a run directory (no config.yaml, no checkpoints/)")
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"resume: no such checkpoint {str(path)!r}")
    return path


def checkpoint_position(path: Path) -> dict[str, int]:
    """A checkpoint's `global_step` and `epoch`, read without unpickling objects; an unreadable file (truncated,
    not a checkpoint) -> one line naming it and the run's other checkpoints to use instead."""
    import torch

    from experiments.config import ConfigError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError("no state_dict: not a Lightning checkpoint")
        return {"global_step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0))}
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: -p.stat().st_mtime)
        instead = (f"; the run's other checkpoints, newest first: {', '.join(map(str, others))} (resume=FILE)"
                   if others else "")
        raise ConfigError(f"resume: cannot read {path} (truncated or not a checkpoint: {first}){instead}") from err


# What a resumed run may not change: the checkpoint's weights would not fit, or would train another model.
ARCHITECTURE_KEYS = ("method", "model.backbone", "model.backbone_kwargs", "model.num_classes", "model.img_size",
                     "model.reduction_layers")
# Keys that say how a command was started, not what the run is.
INVOCATION_KEYS = ("resume", "version", "config_path", "logger.wandb.id")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict) and cfg:
        return {k: v for key, value in cfg.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: cfg} if prefix else {}


def config_changes(saved: dict[str, Any], cfg: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Leaf keys whose value differs between a run's saved config and this command's -> (saved, now)."""
    a, b = flatten(saved), flatten(cfg)
    skip = lambda k: any(k == i or k.startswith(i + ".") for i in INVOCATION_KEYS)  # noqa: E731
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k) != b.get(k)}


def check_same_model(saved: dict[str, Any], cfg: dict[str, Any], run_dir: Path) -> None:
    """A resume whose config builds another model than the run's refuses, naming the keys."""
    from experiments.config import ConfigError
    from experiments.recipes import effective

    try:
        before, now = flatten(effective(saved)), flatten(effective(cfg))
    except KeyError:  # the saved run's method is not known any more: compare as written
        before, now = flatten(saved), flatten(cfg)

    def arch(flat: dict[str, Any]) -> dict[str, Any]:  # the architecture's leaves; an empty section is none
        return {k: v for k, v in flat.items() if v != {} and any(k == a or k.startswith(a + ".") for a in ARCHITECTURE_KEYS)}

    a, b = arch(before), arch(now)
    changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if changed:
        raise ConfigError(f"resume: {run_dir} trained another model ({'; '.join(changed)}); resume with the run's "
                          f"own config ({run_dir}/config.yaml), or start a new run without resume=")


def prepare_run(cfg: dict[str, Any], command: str) -> Run:
    """Pick (or recover) the run directory; every DDP rank must agree on it. Nothing is created yet
    (`create_run_dir`): a command that fails before its run starts leaves nothing behind."""
    import yaml

    from experiments.config import ConfigError

    experiment = experiment_name(cfg)
    experiment_dir = Path(cfg.get("runs_dir") or "runs") / experiment
    rank_zero = global_rank() == 0
    launched = not rank_zero and os.environ.get(RUN_DIR_ENV)  # a DDP rank started by rank 0 (Lightning's launcher)
    resume_ckpt, resume_position = None, None
    if not rank_zero and RESUME_ENV in os.environ:  # the rank-0 process decided (resume=auto must agree)
        resume_ckpt = Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    elif cfg.get("resume") and command == "fit":
        resume_ckpt = find_resume(str(cfg["resume"]), experiment_dir, pinned_run_dir(cfg, experiment_dir))
    elif cfg.get("resume"):
        if str(cfg["resume"]) == "auto":
            raise ConfigError(f"resume=auto: only for fit; {command} evaluates resume=RUN_DIR|last|FILE.ckpt")
        resume_ckpt = find_resume(str(cfg["resume"]), experiment_dir)
    saved_cfg: dict[str, Any] = {}
    if resume_ckpt is not None:
        saved = resume_ckpt.parent.parent / "config.yaml"
        saved_cfg = (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}
        if rank_zero:
            resume_position = checkpoint_position(resume_ckpt)
            if saved_cfg:  # the checkpoint's weights must fit the model this command builds
                check_same_model(saved_cfg, cfg, resume_ckpt.parent.parent)
    os.environ[RESUME_ENV] = str(resume_ckpt or "")
    wandb_id = (cfg.get("logger") or {}).get("wandb", {}).get("id")
    if command == "fit" and not wandb_id:  # a resumed run continues its own W&B run
        wandb_id = (saved_cfg.get("logger") or {}).get("wandb", {}).get("id")
    if resume_ckpt is not None and command == "fit":
        run_dir = resume_ckpt.parent.parent
    elif launched:
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif (pinned := pinned_run_dir(cfg, experiment_dir)) is not None:
        run_dir = pinned
        if rank_zero and holds_run(run_dir) and not (command == "fit" and cfg.get("resume") == "auto"):
            raise ConfigError(f"version: {run_dir} holds a run already and is never overwritten; continue it with "
                              f"resume={run_dir}, or start a new run with another version=NAME (or none)")
    else:
        taken = [int(p.name.split("_")[1]) for p in experiment_dir.glob("version_*") if p.name.split("_")[1].isdigit()]
        run_dir = experiment_dir / f"version_{max(taken, default=-1) + 1}"
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if rank_zero:
        os.environ[LAUNCHER_ENV] = str(os.getpid())
    if wandb_id is None and rank_zero and (cfg.get("logger") or {}).get("wandb", {}).get("enabled"):
        wandb_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
    return Run(experiment, run_dir, resume_ckpt, wandb_id, rank_zero, resume_position)


def holds_run(run_dir: Path) -> bool:
    """A run directory with anything in it (an empty folder made by hand may be used)."""
    return run_dir.is_dir() and any(run_dir.iterdir())


def create_run_dir(run: Run) -> bool:
    """Create the run directory (rank 0); True when this command created it (and may remove it on failure)."""
    from experiments.config import ConfigError

    if not run.rank_zero:
        return False
    created = not run.dir.exists()
    try:
        (run.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run.dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"runs_dir: cannot create or write the run directory {run.dir}: "
                          f"{err.strerror or err}") from err
    return created


def remove_if_unused(run_dir: Path, runs_dir: Path, keep_progress: bool = True) -> None:
    """After a failed command: remove the run directory it created unless training left something in it (a
    checkpoint, results, or - with `keep_progress` - progress: the logs of a run that diverged are worth keeping)."""
    if not run_dir.is_dir():
        return
    kept = [p for p in run_dir.rglob("*") if p.is_file() and (p.suffix == ".ckpt" or p.name.startswith("results_")
                                                             or (keep_progress and p.name == "progress.json"))]
    if not kept:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.parents:  # and the experiment folders it was the first run of
            if parent == runs_dir or not parent.is_relative_to(runs_dir) or any(parent.iterdir()):
                break
            parent.rmdir()


def resolve_trainer(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """`precision: auto` -> bf16-mixed on a GPU that has bf16, else 32-true."""
    import torch

    from experiments.config import ConfigError

    kwargs = dict(trainer_cfg)
    if str(kwargs.get("accelerator", "auto")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {kwargs['accelerator']}, but torch sees no GPU on this machine "
                          f"(torch.cuda.is_available() is False); use trainer.accelerator=auto or cpu")
    if kwargs.get("precision", "auto") == "auto":
        gpu = torch.cuda.is_available() and kwargs.get("accelerator", "auto") in ("auto", "gpu", "cuda")
        kwargs["precision"] = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    return kwargs


def make_loggers(cfg: dict[str, Any], run: Run) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from experiments.config import LoggerConfig, WandbConfig, dataclass_from

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
    from datetime import timedelta

    from pytorch_lightning.callbacks import ModelCheckpoint

    from callbacks import CALLBACKS, ReseedEachBatch
    from callbacks.checkpointing import StepCheckpoint
    from callbacks.preemption import Heartbeat, Preemption
    from experiments.config import CheckpointConfig, dataclass_from

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


def write_config(cfg: dict[str, Any], run: Run) -> None:
    """The run's `config.yaml`. A resume whose config changes keys (e.g. `trainer.max_epochs`) keeps the earlier
    file as `config_history/<n>.yaml` and says what changed: a run's config is never silently rewritten."""
    import yaml
    from omegaconf import OmegaConf

    cfg = dict(cfg)
    if run.wandb_id:
        cfg["logger"] = dict(cfg.get("logger") or {})
        cfg["logger"]["wandb"] = dict(cfg["logger"].get("wandb") or {}, id=run.wandb_id)
    path = run.dir / "config.yaml"
    if path.is_file():
        changes = config_changes(yaml.safe_load(path.read_text()) or {}, cfg)
        if not changes:
            return
        history = run.dir / "config_history"
        history.mkdir(exist_ok=True)
        kept = history / f"{len(list(history.glob('*.yaml'))) + 1}.yaml"
        shutil.copy2(path, kept)
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
        print(f"leanvit: this command changes {shown}{' ...' if len(changes) > 6 else ''}; the run's earlier "
              f"config is kept as {kept}", flush=True)
    tmp = path.with_name(".config.yaml.tmp")
    OmegaConf.save(OmegaConf.create(cfg), tmp)
    os.replace(tmp, path)


def summarise(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


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
    import logging
    import warnings

    for message in (r".*sync_dist=True.*", r".*isinstance\(treespec, LeafSpec\).*",
                    r"Checkpoint directory .* exists and is not empty", r".*smaller than the logging interval.*",
                    r".*does not have many workers which may be a bottleneck.*",
                    r"Your `IterableDataset` has `__len__` defined.*"):
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_TIPS_FILTER)


def run_trainer_command(command: str, config: str, overrides: list[str]) -> int:
    quiet_lightning()
    cfg = load_checked(config, overrides)
    if command == "fit":
        from callbacks.preemption import preemption_signals

        with preemption_signals(received=_EARLY_SIGNALS[-1] if _EARLY_SIGNALS else 0):
            return run_checked_command(command, cfg)
    warn_if_untrained(cfg, command)
    return run_checked_command(command, cfg)


def run_checked_command(command: str, cfg: dict[str, Any]) -> int:
    import pytorch_lightning as pl

    from experiments.config import ConfigError

    run = prepare_run(cfg, command)
    if run.resume_ckpt is not None and command != "fit" and run.rank_zero:
        print(f"leanvit {command}: evaluating {run.resume_ckpt}", flush=True)
    pl.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    module, datamodule = build_objects(cfg, resuming=run.resume_ckpt is not None, command=command)
    trainer = make_trainer(cfg, run, command)
    if command == "fit":
        try:
            datamodule.check_training_batches(trainer.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    created = create_run_dir(run)
    status: Optional[int] = None
    bad_input = False
    try:
        status = run_in_dir(command, cfg, run, trainer, module, datamodule)
        return status
    except ConfigError:
        status, bad_input = 2, True
        raise
    finally:
        # a bad input keeps nothing that cannot be resumed; other failures (a checkpoint that could not be written
        # exits 2 too) keep the logs and progress of what trained
        if status != 0 and created:
            remove_if_unused(run.dir, Path(cfg.get("runs_dir") or "runs"), keep_progress=not bad_input)


def make_trainer(cfg: dict[str, Any], run: Run, command: str) -> Any:
    """The Trainer with leanvit's loggers, callbacks and checkpoint IO; a setting Lightning refuses (a device
    that is not there, a negative epoch count) -> one line naming the trainer key."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from callbacks import AtomicCheckpointIO
    from experiments.config import ConfigError

    plugins: list[Any] = [AtomicCheckpointIO()]
    if os.environ.get("SLURM_JOB_ID"):
        from lightning_fabric.plugins.environments import SLURMEnvironment

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


def run_in_dir(command: str, cfg: dict[str, Any], run: Run, trainer: Any, module: Any, datamodule: Any) -> int:
    from experiments.config import ConfigError

    if run.rank_zero and (command != "fit" or run.resume_ckpt is None):
        write_config(cfg, run)
    elif run.rank_zero:  # a resume records its config once it trains (resuming a finished run changes nothing)
        from pytorch_lightning.callbacks import LambdaCallback

        trainer.callbacks.append(LambdaCallback(on_train_start=lambda *_: write_config(cfg, run)))
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        try:
            logger.log_hyperparams(cfg)  # W&B starts its run here
        except Exception as err:  # W&B's own checks: no API key, a bad WANDB_MODE or entity, ...
            if not isinstance(logger, WandbLogger):
                raise
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()][:3]
            raise ConfigError(f"logger.wandb: {'; '.join(lines) or type(err).__name__} (run `wandb login` or set "
                              f"WANDB_API_KEY; or log offline with WANDB_MODE=offline or logger.wandb.offline=true)"
                              ) from err
    started = time.time()
    try:
        results = run_stage(command, trainer, module, datamodule, run)
    except TrainingStopped as err:
        if run.rank_zero:
            print(f"leanvit: {err}", file=sys.stderr)
            return err.status
        # a rank that Lightning's launcher started from rank 0: exiting non-zero would make that launcher kill
        # rank 0 mid-cleanup; rank 0 reports the status
        return 0 if os.environ.get(LAUNCHER_ENV) == str(os.getppid()) else err.status
    finally:
        finish_wandb(trainer)
    if not run.rank_zero:
        return 0
    results_file = run.dir / f"results_{command}.json"
    if command == "fit" and run.resume_position is not None \
            and trainer.global_step == run.resume_position["global_step"] and results_file.is_file():
        from pytorch_lightning.loggers import CSVLogger

        for logger in trainer.loggers:  # this command's (new, empty) CSV log: the run is left as it was
            if isinstance(logger, CSVLogger):
                shutil.rmtree(logger.log_dir, ignore_errors=True)
        print(f"leanvit fit: {run.dir} had finished (step {trainer.global_step}, epoch {trainer.current_epoch}); "
              f"nothing to train, its results are kept; raise trainer.max_epochs to train on")
        return 0
    results["wall_seconds"] = round(time.time() - started, 1)
    tmp = results_file.with_name(f".{results_file.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    os.replace(tmp, results_file)
    if cfg.get("report"):
        from experiments.report import write_report

        write_report([run.dir], run.dir / "report")
    shown = {k: v for k, v in results.items()  # (a dense run's speed-up is against itself: not shown)
             if k.split("/")[0] in ("val", "test", "best") or k == "flops/gmacs"
             or (k == "throughput/speedup" and cfg["method"] != "dense")}
    made = [f"{name} {run.dir / folder}/" for name, folder in (("token maps", "token_maps"), ("report", "report"))
            if (run.dir / folder).is_dir()]
    print(f"leanvit {command}: " + ", ".join(f"{k} {format_metric(k, v)}" for k, v in sorted(shown.items()))
          + f"  ({results['wall_seconds']:.0f} s; run dir {run.dir}" + "".join(f"; {m}" for m in made) + ")")
    return 0


def format_metric(key: str, value: float) -> str:
    """Two decimals; MACs with four significant digits (a micro ViT's 0.0156 vs 0.0226 GMACs must show)."""
    return f"{value:.4g}" if key.startswith("flops/") else f"{value:.2f}"


class TrainingStopped(Exception):
    """Training ended early on purpose (preempted, diverged) or could not write a checkpoint: one line and a
    status, no traceback."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def finish_wandb(trainer: Any) -> None:
    """Close the W&B run so an offline run directory is complete when the command returns."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            import wandb

            logger.experiment.finish()
            wandb.teardown()  # flushes the offline files; a later run in this process starts a fresh service


def resume_report(run: Run) -> str:
    """Where a resume continues from, and what the interrupted attempt lost since that checkpoint."""
    from callbacks.preemption import lost_work

    assert run.resume_ckpt is not None and run.resume_position is not None
    position = run.resume_position
    line = (f"leanvit: resuming {run.dir} from {run.resume_ckpt} at step {position['global_step']} "
            f"(epoch {position['epoch']})")
    lost = lost_work(run.dir / "progress.json", position, run.resume_ckpt)
    if lost is not None:
        line += f"; the interrupted attempt lost {lost[0]} steps (~{lost[1]:.1f} min) since that checkpoint"
    return line


def run_stage(command: str, trainer: Any, module: Any, datamodule: Any, run: Run) -> dict[str, float]:
    from datamodules.imagenet import DataError
    from experiments.config import ConfigError

    try:
        return run_stage_unchecked(command, trainer, module, datamodule, run)
    except DataError as err:  # a file found bad mid-run (a corrupt image): one line, exit 2
        raise ConfigError(data_error_line(err)) from err


def run_stage_unchecked(command: str, trainer: Any, module: Any, datamodule: Any, run: Run) -> dict[str, float]:
    if command == "fit":
        if run.resume_ckpt is not None and run.rank_zero:
            print(resume_report(run), flush=True)
        from callbacks.checkpointing import CheckpointWriteError, NonFiniteCheckpointError
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        from callbacks.preemption import PREEMPTED_EXIT, Preempted
        from experiments.config import ConfigError
        from lightning_modules.base import NonFiniteLossError

        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.resume_ckpt) if run.resume_ckpt else None)
        except Preempted as err:
            raise TrainingStopped(str(err), PREEMPTED_EXIT) from err
        except (NonFiniteLossError, NonFiniteCheckpointError) as err:
            raise TrainingStopped(str(err), DIVERGED_EXIT) from err
        except CheckpointWriteError as err:
            raise TrainingStopped(str(err), 2) from err
        except MisconfigurationException as err:
            if "could not find the monitored key" not in str(err):
                raise
            keys = str(err).split("returned metrics:", 1)[-1].split("]")[0].strip(" [")
            raise ConfigError(f"checkpoint.monitor: {trainer.checkpoint_callback.monitor!r} is not a metric this "
                              f"run logs; logged: {keys}") from err
        results = summarise(trainer.callback_metrics)
        best = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), None)
        if best is not None and best.best_model_score is not None:
            results["best/" + best.monitor] = float(best.best_model_score)
    else:
        evaluate = trainer.validate if command == "validate" else trainer.test
        ckpt_path = str(run.resume_ckpt) if run.resume_ckpt else None
        results = summarise(evaluate(module, datamodule=datamodule, ckpt_path=ckpt_path)[0])
    return results


def data_error_line(err: Exception) -> str:
    """A data error's own message, also when a loader worker raised it (PyTorch re-raises it in the main process
    with the worker's traceback in the message: keep its last line, the error itself)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if f"{type(err).__name__}: " in last else last
    return text.splitlines()[0] if text else type(err).__name__


VISUALIZE_KEYS: dict[str, Any] = {"images": str, "out": str, "layers": Optional[list[int]]}


def visualize_command(config: str, overrides: list[str]) -> int:
    """`leanvit visualize CONFIG [model.weights=...] images=PATH_OR_GLOB out=DIR`: token maps for any images."""
    import glob

    import torch
    from callbacks.token_maps import save_figures
    from datamodules.imagenet import load_rgb
    from experiments.config import ConfigError

    cfg = load_checked(config, overrides, VISUALIZE_KEYS)
    if not cfg.get("images"):
        raise ConfigError("images: missing required value (a file, a folder or a glob: images=photos/*.jpg)")
    pattern = str(cfg["images"])
    paths = sorted(Path(pattern).glob("*")) if Path(pattern).is_dir() else [Path(p) for p in sorted(glob.glob(pattern))]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise ConfigError(f"images: nothing matches {pattern!r}")
    warn_if_untrained(cfg, "visualize")
    module, datamodule = build_objects(cfg, resuming=False, command="visualize")
    transform = datamodule.eval_transform()
    try:
        images = torch.stack([transform(load_rgb(p)) for p in paths])
    except OSError as err:
        raise ConfigError(f"images: cannot read an image: {err}") from err
    out = Path(cfg.get("out") or "token_maps")
    written = save_figures(module.student, images, out, unique_names(paths), datamodule.mean, datamodule.std,
                           cfg.get("layers"), title=f"{cfg['method']} {experiment_name(cfg)}")
    print(f"leanvit visualize: wrote {len(written)} figures to {out}/")
    return 0


def unique_names(paths: list[Path]) -> list[str]:
    """A figure name per image: its stem, or - where stems repeat (a/1.png, b/1.png) - its path below the folder
    all images share, joined with underscores, so no figure overwrites another."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return ["_".join(p.resolve().with_suffix("").relative_to(common).parts) for p in paths]


def config_command(config: str, overrides: list[str]) -> int:
    """`leanvit config CONFIG [overrides]`: the resolved, checked config `fit` would run, with the method's and
    the DataModule's defaults filled in, as YAML."""
    from omegaconf import OmegaConf

    from experiments.recipes import effective

    print(OmegaConf.to_yaml(OmegaConf.create(effective(load_checked(config, overrides)))), end="")
    return 0


def warn_if_untrained(cfg: dict[str, Any], command: str) -> None:
    """Evaluating or drawing a model that has no trained weights is almost always a mistake: say so."""
    model = cfg.get("model") or {}
    if not model.get("pretrained") and not model.get("weights") and not cfg.get("resume"):
        print(f"leanvit {command}: warning: the model has no trained weights (model.pretrained is false and no "
              f"model.weights=FILE): its initialisation is evaluated", file=sys.stderr)


def report_command(run_dirs: list[str], out: str) -> int:
    from experiments.config import ConfigError
    from experiments.report import write_report

    try:
        written = write_report([Path(d) for d in run_dirs], Path(out))
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    print(f"leanvit report: wrote {', '.join(str(p) for p in written)}")
    return 0


def export_data(out: str, dataset: str, format: str = "folder", samples_per_shard: int = 1000) -> int:
    from datamodules import export_image_folder
    from datamodules.shard_writer import export_embedded_shards
    from experiments.config import ConfigError

    if format == "wds":
        try:
            root = export_embedded_shards(out, dataset, samples_per_shard=samples_per_shard)
        except FileExistsError as err:
            raise ConfigError(str(err)) from err
        print(f"leanvit: wrote {dataset} as shards {root}/{{train,val}}/*.tar and {root}/_info.json "
              f"(datamodule: wds, data.root={root})")
        return 0
    root = export_image_folder(out, dataset)  # type: ignore[arg-type]
    print(f"leanvit: wrote {dataset} as {root}/{{train,val}}/<class>/*.png")
    return 0


def shard_command(source: str, out: str, samples_per_shard: int, seed: int) -> int:
    from datamodules.shard_writer import shard_image_folder
    from experiments.config import ConfigError

    try:
        root = shard_image_folder(source, out, samples_per_shard=samples_per_shard, seed=seed)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    print(f"leanvit shard: wrote {root}/{{train,val}}/*.tar and {root}/_info.json (datamodule: wds, data.root={root})")
    return 0


EXAMPLES = """examples:
  leanvit fit digits/dense.yaml                                 # a micro ViT on the embedded digits, a few minutes on a CPU
  leanvit fit deit_small/evit_kr0.7.yaml data.root=/data/imagenet trainer.devices=8 trainer.strategy=ddp
  leanvit validate deit_small/tome_r13.yaml model.weights=deit_small_patch16_224.pth data.root=/data/imagenet"""


def help_epilog() -> str:
    """Methods (the METHODS registry), the shipped experiments and examples: only built when help is asked for
    (listing the methods imports torch)."""
    import textwrap

    from experiments.config import EXPERIMENTS_DIR
    from experiments.recipes import experiment_yamls
    from lightning_modules import METHODS

    experiments = [str(p.relative_to(EXPERIMENTS_DIR)) for p in experiment_yamls()]
    wrap = lambda text: textwrap.fill(text, 110, initial_indent="  ", subsequent_indent="  ")  # noqa: E731
    return (f"methods (method: NAME):\n{wrap(', '.join(METHODS))}\n\nshipped experiments (CONFIG, relative to "
            f"{EXPERIMENTS_DIR}):\n{wrap(', '.join(experiments))}\n\n{EXAMPLES}")


def main(argv: Optional[list[str]] = None) -> int:
    asked = sys.argv[1:] if argv is None else argv
    epilog = help_epilog() if any(a in ("-h", "--help") for a in asked) else None
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="leanvit", description="Token-reduction Vision Transformers: train, evaluate and benchmark from YAML.",
        epilog=epilog, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("fit", "train (and validate) a model"), ("validate", "evaluate on the validation split"),
                            ("test", "evaluate on the test split")):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, formatter_class=formatter)
        p.add_argument("config", help="experiment YAML (a path, or relative to the experiments folder)")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="omegaconf dotlist overrides")
    p = sub.add_parser("config", help="print the resolved, checked config (defaults filled in) that fit would run")
    p.add_argument("config", help="experiment YAML (a path, or relative to the experiments folder)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="omegaconf dotlist overrides")
    p = sub.add_parser("benchmark", help="throughput and MACs of a configured method next to its dense backbone")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides, and batch_sizes=[1,32] precision=32|bf16-mixed|16-mixed compile=true "
                        "output=FILE.json warmup=N repeats=N device=cpu|cuda avit_depth=FRACTION")
    p = sub.add_parser("visualize", help="token maps (kept, merged, pruned, halted patches) for any images")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides, and images=PATH_OR_GLOB out=DIR layers=[3,6,9,12]")
    p = sub.add_parser("report", help="accuracy vs throughput and vs GMACs plots and a table for run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p = sub.add_parser("export-data", help="write the embedded data set as an ImageNet-style folder tree")
    p.add_argument("out", help="output folder")
    p.add_argument("--dataset", default="digits", choices=["digits", "digits_canvas", "mnist"])
    p.add_argument("--format", default="folder", choices=["folder", "wds"],
                   help="folder: OUT/{train,val}/<class>/*.png; wds: tar shards OUT/{train,val}/*.tar + _info.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p = sub.add_parser("shard", help="write an ImageNet-style folder (SOURCE/{train,val}/<class>/<image>) as tar "
                                     "shards for `datamodule: wds`")
    p.add_argument("source", help="the image folder")
    p.add_argument("out", help="a new folder for the shards")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the training samples' shuffle before sharding")
    args = parser.parse_args(argv)
    previous: dict[int, Any] = {}
    if args.command == "fit":
        # a preemption signal during the imports and set-up must not kill a run before it can checkpoint: note
        # it here (stdlib only), `fit` stops at its first step boundary (callbacks/preemption.py)
        import signal
        import threading

        _EARLY_SIGNALS.clear()
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, _note_early_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return run_command(args)
    finally:
        import signal

        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def run_command(args: argparse.Namespace) -> int:
    from experiments.benchmark import benchmark_command
    from experiments.config import ConfigError

    commands: dict[str, Callable[[], int]] = {
        "fit": lambda: run_trainer_command("fit", args.config, args.overrides),
        "validate": lambda: run_trainer_command("validate", args.config, args.overrides),
        "test": lambda: run_trainer_command("test", args.config, args.overrides),
        "export-data": lambda: export_data(args.out, args.dataset, args.format, args.samples_per_shard),
        "shard": lambda: shard_command(args.source, args.out, args.samples_per_shard, args.seed),
        "benchmark": lambda: benchmark_command(args.config, args.overrides),
        "config": lambda: config_command(args.config, args.overrides),
        "visualize": lambda: visualize_command(args.config, args.overrides),
        "report": lambda: report_command([r for r in args.runs if not r.startswith("out=")],
                                         next((r[4:] for r in args.runs if r.startswith("out=")), "report")),
    }
    try:
        return commands[args.command]()
    except ConfigError as err:
        if os.environ.get("LEANVIT_TRACEBACK"):
            raise
        return _error(str(err))


if __name__ == "__main__":
    sys.exit(main())
