"""One LightningModule per token-reduction method, by name."""
from __future__ import annotations

from lightning_modules.atc import ATCModule
from lightning_modules.avit import AViTModule
from lightning_modules.base import ReductionModule
from lightning_modules.dense import DenseModule
from lightning_modules.diffrate import DiffRateModule
from lightning_modules.dynamicvit import DynamicViTModule
from lightning_modules.evit import EViTModule
from lightning_modules.mctf import MCTFModule
from lightning_modules.pitome import PiToMeModule
from lightning_modules.segmentation import segmentation_module
from lightning_modules.tome import ToMeModule

METHODS: dict[str, type[ReductionModule]] = {
    "dense": DenseModule,
    "tome": ToMeModule,
    "evit": EViTModule,
    "dynamicvit": DynamicViTModule,
    "avit": AViTModule,
    "pitome": PiToMeModule,
    "diffrate": DiffRateModule,
    "mctf": MCTFModule,
    "atc": ATCModule,
}

# What a run trains its method for (the YAML's top-level `task:`): image classification (the method's module) or
# semantic segmentation (`segmentation_module`: the method's student under a Segmenter decode head)
TASKS = ("classification", "segmentation")


def module_class(method: str, task: str = "classification") -> type[ReductionModule]:
    """The LightningModule class a run of `method` for `task` builds (its constructor is the `model:` section)."""
    if task not in TASKS:
        raise ValueError(f"task: expected {' or '.join(TASKS)}, got {task!r}")
    cls = METHODS[method]
    return segmentation_module(cls) if task == "segmentation" else cls


def task_methods(task: str = "classification") -> dict[str, type[ReductionModule]]:
    """Every method's module class for `task`, by name (what a config's `model:` section is checked against)."""
    return {name: module_class(name, task) for name in METHODS}


def method_name(module: ReductionModule | type[ReductionModule]) -> str:
    """The registry name of a method's module (or class): `METHODS[method_name(m)] is type(m)`."""
    cls = module if isinstance(module, type) else type(module)
    for name, method in METHODS.items():
        if method is cls:
            return name
    for name, method in METHODS.items():  # a subclass of a registered method
        if issubclass(cls, method):
            return name
    raise KeyError(f"{cls.__name__} is not a registered method (lightning_modules.METHODS)")


__all__ = ["METHODS", "TASKS", "ReductionModule", "method_name", "module_class", "task_methods"]
