"""DataModules by name (the YAML's `datamodule:` key)."""
from __future__ import annotations

import pytorch_lightning as pl

from datamodules.embedded import EmbeddedDataModule, export_image_folder
from datamodules.imagenet import ImageDataModule, ImageNetDataModule
from datamodules.segmentation import ADE20KDataModule, SegmentationDataModule
from datamodules.shards import WdsDataModule

DATAMODULES: dict[str, type[pl.LightningDataModule]] = {
    "imagenet": ImageNetDataModule,
    "embedded": EmbeddedDataModule,
    "wds": WdsDataModule,
    "ade20k": ADE20KDataModule,
}

__all__ = ["ADE20KDataModule", "DATAMODULES", "EmbeddedDataModule", "SegmentationDataModule", "ImageDataModule", "ImageNetDataModule", "WdsDataModule",
           "export_image_folder"]
