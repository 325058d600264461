"""Run directories: where a run lives (`runs/<experiment>/<version>`), which checkpoint a command resumes or
evaluates, what a resume may change, and the cleanup after a failed command. No Trainer is needed to test it."""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from omegaconf import OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from callbacks.preemption import lost_work
from experiments.config import EXPERIMENTS_DIR, ConfigError
from experiments.recipes import effective

RUN_DIR_ENV = "LEANVIT_RUN_DIR"  # how the rank-0 process tells the DDP ranks it launches where the run lives


RESUME_ENV = "LEANVIT_RESUME_CKPT"  # ... and which checkpoint it resumes ("" for a fresh start)


LAUNCHER_ENV = "LEANVIT_LAUNCHER_PID"  # the process that started this rank (Lightning's DDP launcher = rank 0)


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
    if cfg.get("experiment"):
        return str(cfg["experiment"])
    path = Path(cfg["config_path"])
    try:
        return str(path.relative_to(EXPERIMENTS_DIR).with_suffix(""))
    except ValueError:
        return path.stem


def global_rank() -> int:
    return getattr(rank_zero_only, "rank", 0)


def pinned_run_dir(cfg: dict[str, Any], experiment_dir: Path) -> Optional[Path]:
    """The run directory a command is tied to without searching: `version=`, or the job id of a torchrun or
    SLURM job (every rank of a job starts at once and must agree; a requeued SLURM job keeps its id)."""
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


def write_config(cfg: dict[str, Any], run: Run) -> None:
    """The run's `config.yaml`. A resume whose config changes keys (e.g. `trainer.max_epochs`) keeps the earlier
    file as `config_history/<n>.yaml` and says what changed: a run's config is never silently rewritten."""
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


def resume_report(run: Run) -> str:
    """Where a resume continues from, and what the interrupted attempt lost since that checkpoint."""
    assert run.resume_ckpt is not None and run.resume_position is not None
    position = run.resume_position
    line = (f"leanvit: resuming {run.dir} from {run.resume_ckpt} at step {position['global_step']} "
            f"(epoch {position['epoch']})")
    lost = lost_work(run.dir / "progress.json", position, run.resume_ckpt)
    if lost is not None:
        line += f"; the interrupted attempt lost {lost[0]} steps (~{lost[1]:.1f} min) since that checkpoint"
    return line
