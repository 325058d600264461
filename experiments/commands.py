"""The `leanvit` commands: fit / validate / test in a run directory, visualize, config, report, export-data, shard.
Each returns an exit status; a bad input raises `ConfigError` (one line, status 2, in `cli.py`)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LambdaCallback
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from callbacks.checkpointing import CheckpointWriteError, NonFiniteCheckpointError
from callbacks.preemption import PREEMPTED_EXIT, Preempted, preemption_signals
from callbacks.token_maps import save_figures
from datamodules import export_image_folder
from datamodules.imagenet import DataError, load_rgb
from datamodules.shard_writer import export_embedded_shards, shard_image_folder
from experiments.build import build_objects, load_checked
from experiments.config import ConfigError
from experiments.recipes import effective
from experiments.report import write_report
from experiments.rundirs import (
    LAUNCHER_ENV,
    Run,
    create_run_dir,
    experiment_name,
    prepare_run,
    remove_if_unused,
    resume_report,
    write_config,
)
from experiments.trainer import finish_wandb, make_trainer, quiet_lightning
from lightning_modules.base import NonFiniteLossError

DIVERGED_EXIT = 3  # a non-finite loss stopped training


def summarise(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def run_trainer_command(command: str, config: str, overrides: list[str], early_signal: int = 0) -> int:
    """fit / validate / test; `early_signal`: a preemption signal that reached `fit` before it could handle one."""
    quiet_lightning()
    cfg = load_checked(config, overrides)
    if command == "fit":
        with preemption_signals(received=early_signal):
            return run_checked_command(command, cfg)
    warn_if_untrained(cfg, command)
    return run_checked_command(command, cfg)


def run_checked_command(command: str, cfg: dict[str, Any]) -> int:

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


def run_in_dir(command: str, cfg: dict[str, Any], run: Run, trainer: Any, module: Any, datamodule: Any) -> int:
    if run.rank_zero and (command != "fit" or run.resume_ckpt is None):
        write_config(cfg, run)
    elif run.rank_zero:  # a resume records its config once it trains (resuming a finished run changes nothing)

        trainer.callbacks.append(LambdaCallback(on_train_start=lambda *_: write_config(cfg, run)))

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
    return f"{value:.4g}" if key.startswith("flops/") or key.endswith("/gmacs") else f"{value:.2f}"


class TrainingStopped(Exception):
    """Training ended early on purpose (preempted, diverged) or could not write a checkpoint: one line and a
    status, no traceback."""
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def run_stage(command: str, trainer: Any, module: Any, datamodule: Any, run: Run) -> dict[str, float]:
    """trainer.fit / validate / test -> the metrics; how training ended early -> `TrainingStopped` (its status), a
    bad input found mid-run (a corrupt image, a monitor key nobody logs) -> `ConfigError`."""
    if command == "fit" and run.resume_ckpt is not None and run.rank_zero:
        print(resume_report(run), flush=True)
    ckpt_path = str(run.resume_ckpt) if run.resume_ckpt else None
    try:
        if command != "fit":
            evaluate = trainer.validate if command == "validate" else trainer.test
            return summarise(evaluate(module, datamodule=datamodule, ckpt_path=ckpt_path)[0])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except DataError as err:  # a file found bad mid-run (a corrupt image): one line, exit 2
        raise ConfigError(data_error_line(err)) from err
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
    # a segmentation DataModule's evaluation transform takes label maps too: its image-only one here
    transform = getattr(datamodule, "image_transform", datamodule.eval_transform)()
    try:
        images = torch.stack([transform(load_rgb(p)) for p in paths])
    except OSError as err:
        raise ConfigError(f"images: cannot read an image: {err}") from err
    out = Path(cfg.get("out") or "token_maps")
    written = save_figures(module.student, images, out, unique_names(paths), datamodule.mean, datamodule.std,
                           cfg.get("layers"), title=f"{cfg['method']} {experiment_name(cfg)}", module=module)
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
    print(OmegaConf.to_yaml(OmegaConf.create(effective(load_checked(config, overrides)))), end="")
    return 0


def warn_if_untrained(cfg: dict[str, Any], command: str) -> None:
    """Evaluating or drawing a model that has no trained weights is almost always a mistake: say so."""
    model = cfg.get("model") or {}
    if not model.get("pretrained") and not model.get("weights") and not cfg.get("resume"):
        print(f"leanvit {command}: warning: the model has no trained weights (model.pretrained is false and no "
              f"model.weights=FILE): its initialisation is evaluated", file=sys.stderr)


def report_command(run_dirs: list[str], out: str) -> int:
    try:
        written = write_report([Path(d) for d in run_dirs], Path(out))
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    print(f"leanvit report: wrote {', '.join(str(p) for p in written)}")
    return 0


def export_data(out: str, dataset: str, format: str = "folder", samples_per_shard: int = 1000) -> int:
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
    try:
        root = shard_image_folder(source, out, samples_per_shard=samples_per_shard, seed=seed)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    print(f"leanvit shard: wrote {root}/{{train,val}}/*.tar and {root}/_info.json (datamodule: wds, data.root={root})")
    return 0
