"""The reduction schedule: EViT's keep-rate cosine schedule (`adjust_keep_rate`), for every method with a knob.

The schedule is a reduction strength `alpha` in [0, 1]: 0 (no reduction) before `start_epoch`, then
EViT's half cosine up to 1 over `shrink_epochs`, 1 after; stepped every training iteration. Each method
maps it onto its own knob through `module.apply_reduction(alpha)`: EViT and DynamicViT
`keep_rate = 1 - alpha * (1 - target)` (exactly EViT's `base + (1 - base) * (cos(pi t) + 1) / 2`), ToMe
`r_l = round(alpha * r_l)`, A-ViT the ponder-loss weight. Returned values are logged as `train/<name>`.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, cast

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class Scheduled(Protocol):
    def apply_reduction(self, alpha: float) -> dict[str, float]: ...


def reduction_strength(epoch: float, start_epoch: float, shrink_epochs: float) -> float:
    """alpha at a (fractional) epoch: 0 before `start_epoch`, half cosine to 1 over `shrink_epochs`, then 1."""
    if epoch < start_epoch:
        return 0.0
    if shrink_epochs <= 0 or epoch >= start_epoch + shrink_epochs:
        return 1.0
    t = (epoch - start_epoch) / shrink_epochs
    return (1.0 - math.cos(math.pi * t)) / 2.0


class ReductionSchedule(Callback):
    """Anneal a method's reduction from none to its target, per training step (`model.reduction_schedule`).

    start_epoch: epochs trained with no reduction. shrink_epochs: length of the half-cosine ramp.
    The last value is checkpointed and re-applied on resume; validation uses the value of the last
    training step.
    """

    def __init__(self, start_epoch: float = 0.0, shrink_epochs: float = 0.0) -> None:
        self.start_epoch = start_epoch
        self.shrink_epochs = shrink_epochs
        self.alpha = reduction_strength(0.0, start_epoch, shrink_epochs)

    @property
    def state_key(self) -> str:
        # the class's name before the rename, so checkpoints written then resume with their schedule
        return "KeepRateSchedule" + repr({"start_epoch": self.start_epoch, "shrink_epochs": self.shrink_epochs})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cast(Scheduled, pl_module).apply_reduction(self.alpha)  # the restored value on resume; the start value otherwise

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = max(1, trainer.num_training_batches)
        epoch = trainer.current_epoch + batch_idx / batches
        self.alpha = reduction_strength(epoch, self.start_epoch, self.shrink_epochs)
        for name, value in cast(Scheduled, pl_module).apply_reduction(self.alpha).items():
            pl_module.log(f"train/{name}", value, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alpha = float(state_dict["alpha"])
