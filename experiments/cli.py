"""The `leanvit` command: `leanvit fit|validate|test CONFIG.yaml [key.path=value ...]`.

Flow: load + merge the YAML (defaults, overrides) -> check every key -> run directory -> seed ->
`METHODS[method](**model)` -> `DATAMODULES[datamodule](**data)` -> Trainer(**trainer, loggers, callbacks)
-> fit/validate/test. Config problems and bad files are reported as one line, before any work starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

RUN_DIR_ENV = "LEANVIT_RUN_DIR"  # how the rank-0 process tells the DDP ranks it launches where the run lives
RESUME_ENV = "LEANVIT_RESUME_CKPT"  # ... and which checkpoint it resumes ("" for a fresh start)
DIVERGED_EXIT = 3  # a non-finite loss stopped training
LAUNCHER_ENV = "LEANVIT_LAUNCHER_PID"  # the process that started this rank (Lightning's DDP launcher = rank 0)


_EARLY_SIGNALS: list[int] = []  # SIGTERM/SIGUSR1 that reached `fit` before its heavy imports (see main)


def _note_early_signal(signum: int, frame: Any) -> None:
    _EARLY_SIGNALS.append(signum)


def _error(message: str) -> int:
    print(f"leanvit: error: {message}", file=sys.stderr)
    return 2


@dataclass
class Run:
    """Where a run lives and what it continues from."""

    experiment: str
    dir: Path
    resume_ckpt: Optional[Path]
    wandb_id: Optional[str]
    rank_zero: bool


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
    if cfg.get("version"):
        return experiment_dir / str(cfg["version"])
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
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"resume: no such checkpoint {str(path)!r}")
    return path


def prepare_run(cfg: dict[str, Any], command: str) -> Run:
    """Pick (or recover) the run directory; every DDP rank must agree on it."""
    import yaml

    experiment = experiment_name(cfg)
    experiment_dir = Path(cfg.get("runs_dir") or "runs") / experiment
    rank_zero = global_rank() == 0
    resume_ckpt = None
    if not rank_zero and RESUME_ENV in os.environ:  # the rank-0 process decided (resume=auto must agree)
        resume_ckpt = Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    elif cfg.get("resume") and command == "fit":
        resume_ckpt = find_resume(str(cfg["resume"]), experiment_dir, pinned_run_dir(cfg, experiment_dir))
    os.environ[RESUME_ENV] = str(resume_ckpt or "")
    wandb_id = (cfg.get("logger") or {}).get("wandb", {}).get("id")
    if resume_ckpt is not None:
        run_dir = resume_ckpt.parent.parent
        saved = run_dir / "config.yaml"
        if saved.is_file() and not wandb_id:
            wandb_id = ((yaml.safe_load(saved.read_text()) or {}).get("logger") or {}).get("wandb", {}).get("id")
    elif not rank_zero and os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif (pinned := pinned_run_dir(cfg, experiment_dir)) is not None:
        run_dir = pinned
    else:
        taken = [int(p.name.split("_")[1]) for p in experiment_dir.glob("version_*") if p.name.split("_")[1].isdigit()]
        run_dir = experiment_dir / f"version_{max(taken, default=-1) + 1}"
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if rank_zero:
        os.environ[LAUNCHER_ENV] = str(os.getpid())
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if wandb_id is None and rank_zero and (cfg.get("logger") or {}).get("wandb", {}).get("enabled"):
        wandb_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
    return Run(experiment, run_dir, resume_ckpt, wandb_id, rank_zero)


def resolve_trainer(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """`precision: auto` -> bf16-mixed on a GPU that has bf16, else 32-true."""
    import torch

    kwargs = dict(trainer_cfg)
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
        if ckpt.save_best and ckpt.monitor is not None:
            callbacks.append(ModelCheckpoint(filename="best", monitor=ckpt.monitor, mode=ckpt.mode, save_top_k=1,
                                             **common))
    for name, settings in (cfg.get("callbacks") or {}).items():
        if settings is None or settings is False:
            continue
        callbacks.append(CALLBACKS[name](**(settings if isinstance(settings, dict) else {})))
    return callbacks


def build_objects(cfg: dict[str, Any], resuming: bool, command: str) -> tuple[Any, Any]:
    """The LightningModule and DataModule (and, for `fit`, the teacher); construction errors (a missing file,
    a bad value, a teacher without weights) become one line before any work starts."""
    from datamodules import DATAMODULES
    from experiments.config import ConfigError
    from lightning_modules import METHODS
    from lightning_modules.base import default_teacher_weights

    model_cfg = dict(cfg.get("model") or {})
    if resuming:  # the checkpoint restores every student weight; do not fetch or read them first
        backbone = model_cfg.get("backbone", "deit_small_patch16_224")
        model_cfg["teacher_weights"] = default_teacher_weights(  # ... but a teacher may still start from them
            backbone, model_cfg.get("teacher"), model_cfg.get("weights"), model_cfg.get("teacher_weights"))
        model_cfg.update(pretrained=False, weights=None)
    try:
        module = METHODS[cfg["method"]](**model_cfg)
        datamodule = DATAMODULES[cfg.get("datamodule", "embedded")](**(cfg.get("data") or {}))
        if command == "fit":
            module.prepare_teacher()
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    except (OSError, RuntimeError) as err:
        if model_cfg.get("pretrained") or model_cfg.get("teacher"):
            raise ConfigError(f"model: could not load pretrained weights ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); offline? use model.weights=FILE") from err
        raise
    return module, datamodule


def write_config(cfg: dict[str, Any], run: Run) -> None:
    from omegaconf import OmegaConf

    cfg = dict(cfg)
    if run.wandb_id:
        cfg["logger"] = dict(cfg.get("logger") or {})
        cfg["logger"]["wandb"] = dict(cfg["logger"].get("wandb") or {}, id=run.wandb_id)
    OmegaConf.save(OmegaConf.create(cfg), run.dir / "config.yaml")


def summarise(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def load_checked(config: str, overrides: list[str], extra_top_level: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load, merge and resolve a config, and check every key against what it configures."""
    import pytorch_lightning as pl

    from callbacks import CALLBACKS
    from datamodules import DATAMODULES
    from experiments.config import check_config, load_config, to_plain
    from lightning_modules import METHODS

    cfg_node, origins = load_config(config, overrides)
    cfg = to_plain(cfg_node, origins)
    check_config(cfg, origins, methods=METHODS, datamodules=DATAMODULES, callbacks=CALLBACKS,
                 trainer_cls=pl.Trainer, extra_top_level=extra_top_level or {})
    return cfg


def run_trainer_command(command: str, config: str, overrides: list[str]) -> int:
    cfg = load_checked(config, overrides)
    if command == "fit":
        from callbacks.preemption import preemption_signals

        with preemption_signals(received=_EARLY_SIGNALS[-1] if _EARLY_SIGNALS else 0):
            return run_checked_command(command, cfg)
    warn_if_untrained(cfg, command)
    return run_checked_command(command, cfg)


def run_checked_command(command: str, cfg: dict[str, Any]) -> int:
    import pytorch_lightning as pl

    run = prepare_run(cfg, command)
    pl.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    module, datamodule = build_objects(cfg, resuming=run.resume_ckpt is not None, command=command)

    from callbacks import AtomicCheckpointIO

    plugins: list[Any] = [AtomicCheckpointIO()]
    if os.environ.get("SLURM_JOB_ID"):
        from lightning_fabric.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():  # leanvit's Preemption callback requeues; Lightning's would kill the ranks
            plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = pl.Trainer(
        **resolve_trainer(cfg.get("trainer") or {}),
        logger=make_loggers(cfg, run) or False,
        callbacks=make_callbacks(cfg, run, command),
        plugins=plugins,
        default_root_dir=str(run.dir),
        enable_checkpointing=command == "fit",
    )
    if run.rank_zero:
        write_config(cfg, run)
    for logger in trainer.loggers:
        logger.log_hyperparams(cfg)
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
    if run.rank_zero:
        results["wall_seconds"] = round(time.time() - started, 1)
        (run.dir / f"results_{command}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        if cfg.get("report"):
            from experiments.report import write_report

            write_report([run.dir], run.dir / "report")
        shown = {k: v for k, v in results.items()
                 if k.split("/")[0] in ("val", "test", "best") or k in ("throughput/speedup", "flops/gmacs")}
        print(f"leanvit {command}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(shown.items()))
              + f"  ({results['wall_seconds']:.0f} s; run dir {run.dir})")
    return 0


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
    import torch

    from callbacks.preemption import lost_work

    assert run.resume_ckpt is not None
    try:
        ckpt = torch.load(run.resume_ckpt, map_location="cpu", weights_only=True, mmap=True)
        where = f"step {ckpt.get('global_step', '?')} (epoch {ckpt.get('epoch', '?')})"
    except Exception:  # the trainer names an unreadable file itself
        ckpt, where = None, "?"
    line = f"leanvit: resuming {run.dir} from {run.resume_ckpt} at {where}"
    lost = lost_work(run.dir / "progress.json", ckpt, run.resume_ckpt) if ckpt is not None else None
    if lost is not None:
        line += f"; the interrupted attempt lost {lost[0]} steps (~{lost[1]:.1f} min) since that checkpoint"
    return line


def run_stage(command: str, trainer: Any, module: Any, datamodule: Any, run: Run) -> dict[str, float]:
    if command == "fit":
        if run.resume_ckpt is not None and run.rank_zero:
            print(resume_report(run), flush=True)
        from callbacks.checkpointing import CheckpointWriteError, NonFiniteCheckpointError
        from callbacks.preemption import PREEMPTED_EXIT, Preempted
        from lightning_modules.base import NonFiniteLossError

        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.resume_ckpt) if run.resume_ckpt else None)
        except Preempted as err:
            raise TrainingStopped(str(err), PREEMPTED_EXIT) from err
        except (NonFiniteLossError, NonFiniteCheckpointError) as err:
            raise TrainingStopped(str(err), DIVERGED_EXIT) from err
        except CheckpointWriteError as err:
            raise TrainingStopped(str(err), 2) from err
        results = summarise(trainer.callback_metrics)
        best = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), None)
        if best is not None and best.best_model_score is not None:
            results["best/" + best.monitor] = float(best.best_model_score)
    elif command == "validate":
        results = summarise(trainer.validate(module, datamodule=datamodule)[0])
    else:
        results = summarise(trainer.test(module, datamodule=datamodule)[0])
    return results


VISUALIZE_KEYS: dict[str, Any] = {"images": str, "out": str, "layers": Optional[list[int]]}


def visualize_command(config: str, overrides: list[str]) -> int:
    """`leanvit visualize CONFIG [model.weights=...] images=PATH_OR_GLOB out=DIR`: token maps for any images."""
    import glob

    import torch
    from PIL import Image

    from callbacks.token_maps import save_figures
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
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    except OSError as err:
        raise ConfigError(f"images: cannot read an image: {err}") from err
    out = Path(cfg.get("out") or "token_maps")
    written = save_figures(module.student, images, out, [p.stem for p in paths], datamodule.mean, datamodule.std,
                           cfg.get("layers"), title=f"{cfg['method']} {experiment_name(cfg)}")
    print(f"leanvit visualize: wrote {len(written)} figures to {out}/")
    return 0


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
    if not model.get("pretrained") and not model.get("weights"):
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


def export_data(out: str, dataset: str) -> int:
    from datamodules import export_image_folder

    root = export_image_folder(out, dataset)  # type: ignore[arg-type]
    print(f"leanvit: wrote {dataset} as {root}/{{train,val}}/<class>/*.png")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="leanvit", description="Token-reduction Vision Transformers: train, evaluate and benchmark from YAML.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("fit", "train (and validate) a model"), ("validate", "evaluate on the validation split"),
                            ("test", "evaluate on the test split")):
        p = sub.add_parser(name, help=help_text)
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
        "export-data": lambda: export_data(args.out, args.dataset),
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
