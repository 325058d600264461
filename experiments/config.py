"""Experiment configs: YAML with `defaults:` inheritance, dotlist overrides, and checks that name the key
and the file that set it before any work starts.

Each section is checked against the signature of the class it configures (`model:` against
`METHODS[method]`, `data:` against `DATAMODULES[datamodule]`, `trainer:` against `pytorch_lightning.Trainer`),
so a new constructor argument is a new config key with no schema to keep in sync.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import pathlib
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent
COMMAND_LINE = "the command line"


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key path and where it was set."""


# ------------------------------------------------------------------------------------------------ loading
def find_config(path: str | pathlib.Path) -> pathlib.Path:
    """A config path as given, or relative to the experiments folder (`deit_small/dense.yaml`)."""
    candidates = [pathlib.Path(path), EXPERIMENTS_DIR / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config: no such file {str(path)!r} (looked in . and {EXPERIMENTS_DIR})")


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for key, value in node.items() for p in _leaf_paths(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if prefix else []


def _display(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(path)


def _load_yaml(path: pathlib.Path, origins: dict[str, str], chain: tuple[pathlib.Path, ...] = ()) -> DictConfig:
    if path in chain:
        raise ConfigError(f"defaults: {_display(path)} includes itself ({' -> '.join(map(_display, chain))})")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: keep one line
        raise ConfigError(f"config: cannot parse {_display(path)}: {str(err).splitlines()[0]}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config: {_display(path)} must hold a mapping at the top level")
    merged = OmegaConf.create({})
    defaults = node.pop("defaults", [])
    if not isinstance(defaults, (ListConfig, list)):
        raise ConfigError(f"defaults: expected a list of YAML paths (set in {_display(path)})")
    for entry in defaults:
        base = (path.parent / str(entry)).resolve()
        if not base.is_file():
            raise ConfigError(f"defaults: no such file {str(entry)!r} (set in {_display(path)})")
        merged = OmegaConf.merge(merged, _load_yaml(base, origins, chain + (path,)))
    if chain:  # `experiment` names a file's own runs: a child that inherited it would write into its parent's runs
        node.pop("experiment", None)
    plain = OmegaConf.to_container(node, resolve=False)
    for key in _leaf_paths(plain):
        origins[key] = _display(path)
    return OmegaConf.merge(merged, node)


def load_config(path: str | pathlib.Path, overrides: list[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """Merge a YAML with its `defaults` (in order, under it) and the dotlist overrides (last).

    Returns the config and, for every leaf key path, where it was last set.
    """
    origins: dict[str, str] = {}
    config_path = find_config(path)
    cfg = _load_yaml(config_path, origins)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from err
        for key in _leaf_paths(OmegaConf.to_container(dot, resolve=False)) or [item.split("=", 1)[0]]:
            origins[key] = COMMAND_LINE
        cfg = OmegaConf.merge(cfg, dot)
    cfg.setdefault("config_path", str(config_path))
    return cfg, origins


def to_plain(cfg: DictConfig, origins: dict[str, str]) -> dict[str, Any]:
    """Resolve interpolations and missing values (`???`) into plain Python containers."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        where = origins.get(key)
        msg = str(err).splitlines()[0]
        if "Missing mandatory value" in msg:
            msg = "missing required value"
        raise ConfigError(f"{key}: {msg}" + (f" (set in {where})" if where else "")) from err


# ------------------------------------------------------------------------------------------------ checking
def signature_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters a constructor accepts, following `**kwargs` into the base classes' constructors."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that cannot be resolved: check names only
            hints = {}
        sig = inspect.signature(init)
        var_kw = False
        for name, param in sig.parameters.items():
            if name == "self" or param.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
                continue
            if name not in params:
                params[name] = param.replace(annotation=hints.get(name, param.annotation))
        if not var_kw:
            break
    return params


_NONE = type(None)


def type_matches(value: Any, annotation: Any) -> bool:
    """Does a YAML value (None, bool, int, float, str, list, dict) fit a type annotation?"""
    if annotation in (inspect.Parameter.empty, Any, object) or isinstance(annotation, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is _NONE or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, pathlib.Path):
        return isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(type_matches(v, a) for v, a in zip(value, args))
        return not args or all(type_matches(v, args[0]) for v in value)
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (not args or all(type_matches(v, args[1]) for v in value.values()))
    return False  # a class that a YAML value cannot be an instance of (another union member may still fit)


def describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    return getattr(annotation, "__name__", text) if isinstance(annotation, type) else text


def check_section(values: Any, params: dict[str, inspect.Parameter], section: str, origins: dict[str, str],
                  skip: tuple[str, ...] = (), required: bool = True) -> None:
    """Unknown keys, wrong types and missing required arguments of one section -> ConfigError."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {values!r}{_where(section, origins)}")
    for key, value in values.items():
        path = f"{section}.{key}"
        if key in skip or key not in params:
            choices = [p for p in params if p not in skip]
            close = difflib.get_close_matches(str(key), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(choices)}"
            raise ConfigError(f"{path}: unknown key{_where(path, origins)}{hint}")
        annotation = params[key].annotation
        if not type_matches(value, annotation):
            raise ConfigError(f"{path}: expected {describe(annotation)}, got {value!r} "
                              f"({type(value).__name__}){_where(path, origins)}")
    if required:
        for name, param in params.items():
            if name not in skip and param.default is inspect.Parameter.empty and name not in values:
                raise ConfigError(f"{section}.{name}: missing required value (set it in the YAML or as "
                                  f"{section}.{name}=...)")


def _where(path: str, origins: dict[str, str]) -> str:
    where = origins.get(path) or next((o for k, o in origins.items() if k.startswith(path + ".")), None)
    return f" (set in {where})" if where else ""


# ------------------------------------------------------------------------------------------------ schema
@dataclass
class WandbConfig:
    """Weights & Biases through Lightning's WandbLogger (`WANDB_MODE=offline` works with no API key)."""

    enabled: bool = False
    project: str = "leanvit"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None
    offline: bool = False
    id: Optional[str] = None  # filled in on the first run; resume reuses it


@dataclass
class LoggerConfig:
    wandb: dict = field(default_factory=dict)
    csv: bool = True


@dataclass
class CheckpointConfig:
    """Lightning ModelCheckpoint: `last.ckpt` every epoch (and every `every_n_train_steps` optimiser steps and/or
    every `train_time_interval` seconds of training, mid-epoch), `best.ckpt` by `monitor`."""

    monitor: Optional[str] = "val/acc1"
    mode: Literal["max", "min"] = "max"
    save_last: bool = True
    save_best: bool = True
    every_n_epochs: int = 1
    every_n_train_steps: Optional[int] = None
    train_time_interval: Optional[float] = None  # seconds
    progress_interval: float = 5.0  # seconds between progress.json updates (the lost-work report on resume)


@dataclass
class RunConfig:
    """Top-level keys of an experiment YAML."""

    method: str
    task: str = "classification"  # or segmentation (the method's student under a Segmenter decode head)
    experiment: Optional[str] = None
    datamodule: str = "embedded"
    seed: int = 0
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    logger: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)
    callbacks: dict = field(default_factory=dict)
    resume: Optional[str] = None
    runs_dir: str = "runs"
    version: Optional[str] = None
    config_path: Optional[str] = None
    description: Optional[str] = None
    report: bool = False  # fit: write the report (plots + table) of this run into <run>/report


# Keys the CLI sets on the Trainer itself.
TRAINER_RESERVED = ("logger", "callbacks", "plugins", "default_root_dir", "enable_checkpointing", "model_registry")


def drop_unset(cfg: dict[str, Any], *, methods: dict[str, type], datamodules: dict[str, type]) -> None:
    """`key: null` for a key the section's class does not take removes a key an inherited YAML set (e.g. the
    embedded data's `dataset` when a config switches to `datamodule: imagenet`, or `data.dataset=null`)."""
    classes = {"model": methods.get(cfg.get("method", "")), "data": datamodules.get(cfg.get("datamodule", RunConfig.datamodule))}
    for section, cls in classes.items():
        values = cfg.get(section)
        if cls is None or not isinstance(values, dict):
            continue
        params = signature_params(cls)
        for key in [k for k, v in values.items() if v is None and k not in params]:
            del values[key]


def check_config(cfg: dict[str, Any], origins: dict[str, str], *, methods: dict[str, type],
                 datamodules: dict[str, type], callbacks: dict[str, type], trainer_cls: type,
                 extra_top_level: dict[str, Any] = {}) -> None:
    """Check every section of a resolved config against the classes it configures (dropping `key: null` of keys
    the class does not take, see `drop_unset`)."""
    drop_unset(cfg, methods=methods, datamodules=datamodules)
    top = signature_params(RunConfig)
    for key, annotation in extra_top_level.items():
        top[key] = inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    scalars = {k: v for k, v in cfg.items() if k not in ("model", "data", "trainer", "logger", "checkpoint", "callbacks")}
    check_section(scalars, top, "config", origins, required=False)
    if "method" not in cfg:
        raise ConfigError("method: missing required value (one of: " + ", ".join(methods) + ")")
    for key, registry in (("method", methods), ("datamodule", datamodules)):
        name = cfg.get(key, RunConfig.datamodule if key == "datamodule" else None)
        if name not in registry:
            raise ConfigError(f"{key}: unknown {key} {name!r}{_where(key, origins)}; choose from {', '.join(registry)}")
    check_section(cfg.get("model"), signature_params(methods[cfg["method"]]), "model", origins)
    check_section(cfg.get("data"), signature_params(datamodules[cfg.get("datamodule", RunConfig.datamodule)]),
                  "data", origins)
    trainer_params = signature_params(trainer_cls)
    if "precision" in trainer_params:  # leanvit adds "auto": bf16-mixed on a GPU with bf16, else 32-true
        precision = trainer_params["precision"]
        trainer_params["precision"] = precision.replace(annotation=Union[Literal["auto"], precision.annotation])
    check_section(cfg.get("trainer"), trainer_params, "trainer", origins, skip=TRAINER_RESERVED)
    logger = cfg.get("logger") or {}
    check_section(logger, signature_params(LoggerConfig), "logger", origins)
    check_section(logger.get("wandb"), signature_params(WandbConfig), "logger.wandb", origins)
    check_section(cfg.get("checkpoint"), signature_params(CheckpointConfig), "checkpoint", origins)
    callback_cfg = cfg.get("callbacks") or {}
    if not isinstance(callback_cfg, dict):
        raise ConfigError(f"callbacks: expected a mapping of callback name -> settings{_where('callbacks', origins)}")
    for name, settings in callback_cfg.items():
        if name not in callbacks:
            raise ConfigError(f"callbacks.{name}: unknown callback{_where('callbacks.' + name, origins)}; "
                              f"choose from {', '.join(callbacks)}")
        if settings is not None and settings is not False:
            check_section(settings if settings is not True else {}, signature_params(callbacks[name]),
                          f"callbacks.{name}", origins)


def dataclass_from(cls: type, values: Optional[dict[str, Any]]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in names})
