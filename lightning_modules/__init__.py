"""One LightningModule per token-reduction method, by name."""
from __future__ import annotations

from lightning_modules.base import ReductionModule
from lightning_modules.dense import DenseModule

METHODS: dict[str, type[ReductionModule]] = {
    "dense": DenseModule,
}

__all__ = ["METHODS", "ReductionModule"]
