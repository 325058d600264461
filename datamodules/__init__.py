"""DataModules by name (the YAML's `datamodule:` key)."""
from __future__ import annotations

import pytorch_lightning as pl

from datamodules.embedded import EmbeddedDataModule, export_image_folder
from datamodules.imagenet import ImageDataModule, ImageNetDataModule

DATAMODULES: dict[str, type[pl.LightningDataModule]] = {
    "imagenet": ImageNetDataModule,
    "embedded": EmbeddedDataModule,
}

__all__ = ["DATAMODULES", "EmbeddedDataModule", "ImageDataModule", "ImageNetDataModule", "export_image_folder"]
