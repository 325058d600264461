"""Config -> checked config -> LightningModule and DataModule: what every command that builds a model shares
(`leanvit fit|validate|test|visualize|benchmark`, the report tools). Imports nothing from the commands."""
from __future__ import annotations

from typing import Any, Optional


def load_checked(config: str, overrides: list[str], extra_top_level: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load, merge and resolve a config, and check every key against what it configures."""
    import pytorch_lightning as pl

    from callbacks import CALLBACKS
    from datamodules import DATAMODULES
    from experiments.config import ConfigError, check_config, load_config, to_plain
    from lightning_modules import TASKS, task_methods

    cfg_node, origins = load_config(config, overrides)
    cfg = to_plain(cfg_node, origins)
    task = cfg.get("task", "classification")
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}; choose from {', '.join(TASKS)}")
    check_config(cfg, origins, methods=task_methods(task), datamodules=DATAMODULES, callbacks=CALLBACKS,
                 trainer_cls=pl.Trainer, extra_top_level=extra_top_level or {})
    return cfg


def build_objects(cfg: dict[str, Any], resuming: bool, command: str) -> tuple[Any, Any]:
    """The LightningModule and DataModule (and, for `fit`, the teacher); construction errors (a missing file,
    a bad value, a teacher without weights, data that does not fit the model) become one line before any work
    starts."""
    from datamodules import DATAMODULES
    from experiments.config import ConfigError
    from lightning_modules import module_class
    from lightning_modules.base import default_teacher_weights

    model_cfg = dict(cfg.get("model") or {})
    if resuming:  # the checkpoint restores every student weight; do not fetch or read them first
        model_cfg["teacher_weights"] = default_teacher_weights(  # ... but a teacher may still start from them
            model_cfg.get("teacher"), model_cfg.get("weights"), model_cfg.get("teacher_weights"))
        model_cfg.update(pretrained=False, weights=None)
    try:
        datamodule = DATAMODULES[cfg.get("datamodule", "embedded")](**(cfg.get("data") or {}))
        module = module_class(cfg["method"], cfg.get("task", "classification"))(**model_cfg)
        if command in ("fit", "validate", "test"):
            datamodule.setup(command)  # reads the data set: a missing or misshapen folder is reported now
            check_model_fits_data(module, datamodule)
        if command == "fit":
            module.prepare_teacher()
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    except (OSError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        if model_cfg.get("weights") is None and (model_cfg.get("pretrained") or model_cfg.get("teacher")):
            raise ConfigError(f"model: could not load pretrained weights ({type(err).__name__}: {first}); "
                              f"offline? use model.weights=FILE") from err
        raise
    return module, datamodule


def check_model_fits_data(module: Any, datamodule: Any) -> None:
    """The model's input size and classes against what the data gives."""
    from experiments.config import ConfigError

    embed = module.student.vit.patch_embed
    if embed.img_size is not None and getattr(embed, "strict_img_size", True):
        if tuple(embed.img_size) != (datamodule.img_size, datamodule.img_size):
            raise ConfigError(f"data.img_size: {datamodule.img_size} px images for a model built for "
                              f"{embed.img_size[0]} px (model.img_size); set both to the same size")
    dense = bool(getattr(datamodule, "dense_labels", False))
    segmentation = hasattr(module, "decode_head")
    if dense != segmentation:
        raise ConfigError("task: segmentation needs a DataModule with label maps (datamodule: ade20k, or data.dataset: "
                          "digits_canvas_seg)" if segmentation else
                          "data: this data set gives label maps (segmentation); set task: segmentation")
    classes = len(getattr(datamodule, "classes", []) or [])
    if classes > module.num_classes:
        raise ConfigError(f"model.num_classes: {module.num_classes}, but the data has {classes} classes; set "
                          f"model.num_classes={classes}")
