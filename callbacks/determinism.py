"""Exact resume: the training RNGs depend only on (seed, epoch, batch, rank), never on history."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from datamodules.sampling import derive_seed, seed_all


class ReseedEachBatch(Callback):
    """Reseed torch, numpy and random before every training batch.

    A checkpoint does not hold the global RNG state, and the loader, validation and logging draw from it
    in between; reseeding from `(seed, epoch, batch_idx, rank)` makes mixup, DropPath, Gumbel noise and
    every other draw of a resumed run the same as in the uninterrupted one. Data augmentation is seeded
    per sample by the DataModule (`datamodules.sampling`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed_all(derive_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))
