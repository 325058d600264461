"""The recipe table: what each shipped experiment YAML trains with, read from its fully resolved config.

README.md holds one row per experiment YAML (method x backbone) with these columns, plus the columns a config
cannot know (the official GPU count, the official command it reproduces, where leanvit deliberately
differs); `tests/test_recipes.py` resolves every YAML and compares, so a drift between a YAML and the
table fails CI. `python -m experiments.recipes` prints the derived columns of every YAML.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from experiments.config import EXPERIMENTS_DIR


def effective(cfg: dict[str, Any]) -> dict[str, Any]:
    """A checked config with the constructor defaults of its `model:` and `data:` sections filled in: what
    `fit` would run (`leanvit config` prints it)."""
    from datamodules import DATAMODULES
    from experiments.config import RunConfig, signature_params
    from lightning_modules import module_class

    out = dict(cfg)
    classes = {"model": module_class(cfg["method"], cfg.get("task", "classification")), "data": DATAMODULES[cfg.get("datamodule", RunConfig.datamodule)]}
    for section, cls in classes.items():
        defaults = {name: p.default for name, p in signature_params(cls).items()
                    if p.default is not inspect.Parameter.empty}
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        out[section] = defaults | dict(cfg.get(section) or {})
    return out


def _num(value: float) -> str:
    return f"{value:g}"


def _lr(m: dict[str, Any]) -> str:
    lr = f"{_num(m['lr'])} per {m['lr_reference_batch']}" if m.get("lr_reference_batch") else f"{_num(m['lr'])} fixed"
    if m.get("optimizer", "adamw") != "adamw" or m.get("lr_schedule", "cosine") != "cosine":  # AdamW + cosine: unsaid
        lr += f", {m['optimizer']}" + (f" {_num(m['momentum'])}" if m["optimizer"] == "sgd" else "")
        lr += f", {m['lr_schedule']}" + (f" {_num(m['poly_power'])}" if m["lr_schedule"] == "poly" else "")
    return lr


def _warmup(m: dict[str, Any]) -> str:
    if not m["warmup_epochs"]:
        return "-"
    return f"{_num(m['warmup_epochs'])} from {_num(m['warmup_lr'])}" + (", prefix" if m.get("warmup_prefix") else "")


def _schedule(m: dict[str, Any]) -> str:
    s = m.get("reduction_schedule") or m.get("keep_rate_schedule")
    if not s:
        return "-"
    start, shrink = s.get("start_epoch", 0), s.get("shrink_epochs", 0)
    return f"{_num(start)} -> {_num(start + shrink)}"


def _teacher(c: dict[str, Any]) -> str:
    m = c["model"]
    if c["method"] == "dynamicvit":
        name = "dense segmentation model" if c.get("task") == "segmentation" else m.get("teacher") or "backbone"
        return f"{name} (KL {_num(m['kl_weight'])}, MSE {_num(m['distill_weight'])})"
    if m.get("teacher_weight") or m.get("consistency_weight"):  # a branch of the network itself (MCTF)
        return (f"own branch, r < {_num(m['r_teacher_max'])} (CE {_num(m['teacher_weight'])}, consistency "
                f"{_num(m['consistency_weight'])} above p {_num(m['consistency_threshold'])})")
    if m.get("distillation", "none") != "none":
        return f"{m['teacher']} ({m['distillation']})"
    return "-"


def _setting(c: dict[str, Any]) -> str:
    from lightning_modules import METHODS

    m = c["model"]
    return ", ".join(f"{k} {m[k]}" for k in METHODS[c["method"]].setting_keys if m.get(k) is not None) or "-"


# (header, cell) for the columns read from a config; README adds: GPUs, global batch, reproduces, differs.
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("method", lambda c: c["method"]),
    ("setting", _setting),
    ("init", lambda c: "pretrained" if c["model"].get("pretrained") or c["model"].get("weights") else "scratch"),
    ("epochs", lambda c: str(c["trainer"]["max_epochs"])),
    ("batch/GPU", lambda c: str(c["data"]["batch_size"])),
    ("lr", lambda c: _lr(c["model"])),
    ("warm-up", lambda c: _warmup(c["model"])),
    ("min lr", lambda c: _num(c["model"]["min_lr"])),
    ("wd", lambda c: _num(c["model"]["weight_decay"])),
    ("drop path", lambda c: _num(c["model"]["drop_path_rate"])),
    ("EMA", lambda c: _num(c["model"]["ema_decay"]) if c["model"].get("ema_decay") is not None else "-"),
    ("rep. aug", lambda c: str(c["data"]["repeated_aug"]) if c["data"].get("repeated_aug", 0) > 1 else "-"),
    ("mixup/cutmix/smooth", lambda c: "/".join(_num(c["model"][k]) for k in ("mixup", "cutmix", "label_smoothing"))),
    ("reduction schedule", lambda c: _schedule(c["model"])),
    ("teacher", _teacher),
    ("precision", lambda c: str((c.get("trainer") or {}).get("precision", "auto"))),
    ("train mode", lambda c: "train" if c["model"]["train_mode"] else "eval"),
]
OFFICIAL_COLUMNS = ["GPUs", "global batch", "reproduces", "differs"]


def recipe_cells(cfg: dict[str, Any]) -> dict[str, str]:
    """The derived columns of one resolved, checked config."""
    full = effective(cfg)
    return {header: cell(full) for header, cell in COLUMNS}


def experiment_yamls() -> list[Path]:
    """Every shipped experiment YAML (the `_base/` pieces are not experiments)."""
    return sorted(p for p in EXPERIMENTS_DIR.rglob("*.yaml") if "_base" not in p.parts)


def main() -> None:
    from experiments.build import load_checked

    print("| YAML | " + " | ".join(h for h, _ in COLUMNS) + " |")
    for path in experiment_yamls():
        cells = recipe_cells(load_checked(str(path), []))
        print(f"| {path.relative_to(EXPERIMENTS_DIR)} | " + " | ".join(cells.values()) + " |")


if __name__ == "__main__":
    main()
