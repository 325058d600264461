"""One LightningModule per token-reduction method, by name."""
from __future__ import annotations

from lightning_modules.avit import AViTModule
from lightning_modules.base import ReductionModule
from lightning_modules.dense import DenseModule
from lightning_modules.dynamicvit import DynamicViTModule
from lightning_modules.evit import EViTModule
from lightning_modules.tome import ToMeModule

METHODS: dict[str, type[ReductionModule]] = {
    "dense": DenseModule,
    "tome": ToMeModule,
    "evit": EViTModule,
    "dynamicvit": DynamicViTModule,
    "avit": AViTModule,
}

__all__ = ["METHODS", "ReductionModule"]
