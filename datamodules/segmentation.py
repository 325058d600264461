"""Semantic segmentation data: ADE20K in its release layout, with Segmenter's (mmseg's) training pipeline.

    root/images/{training,validation}/*.jpg
    root/annotations/{training,validation}/*.png    (same stem; 0 = "other", 1..150 = the classes)
    root/objectInfo150.txt                            (optional: class names)

Labels are reduced as mmseg's `reduce_zero_label`: 0 -> 255 (ignored), k -> k - 1. Training (torch's RNG, which the
epoch sampler seeds per sample, so a resumed or DDP run draws the same crops): resize to fit 2048r x 512r (r uniform
in `scale_range`, ratio kept), a random `img_size` crop in which no class covers more than `cat_max_ratio` (10
tries), horizontal flip, photometric distortion, normalisation, padding to the crop (label 255). Validation: the
image resized so its shorter side is `img_size` (Segmenter's inference), the label map at its own size (mIoU is
measured there); images differ in size, so `eval_batch_size` is 1.

The sampler, resumable loader and DDP split are the classification DataModule's (`ImageDataModule`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from datamodules.imagenet import DataError, ImageDataModule, UnreadableImageError, load_rgb

IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------ transforms
def uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def coin(p: float = 0.5) -> bool:
    return bool(torch.rand(()) < p)


def rescale_size(height: int, width: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size with the long side <= `long_side` and the short side <=
    `short_side` -> (new height, new width), rounded as mmcv."""
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def crop_box(label: Tensor, size: int, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX,
             tries: int = 10) -> tuple[int, int, int, int]:
    """mmseg's RandomCrop: a random `size` crop (the whole side when shorter) of a `(H, W)` label map; with
    `cat_max_ratio < 1` redrawn up to `tries` times until no class covers more than that share of the crop's
    labelled pixels -> (top, left, height, width)."""
    height, width = label.shape

    def draw() -> tuple[int, int, int, int]:
        top = int(torch.randint(0, max(height - size, 0) + 1, ()))
        left = int(torch.randint(0, max(width - size, 0) + 1, ()))
        return top, left, min(size, height), min(size, width)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            top, left, h, w = box
            values = label[top:top + h, left:left + w]
            _, counts = values[values != ignore_index].unique(return_counts=True)
            if counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
                break
            box = draw()
    return box


def photometric_distortion(image: Tensor) -> Tensor:
    """mmseg's PhotoMetricDistortion on a uint8 `(3, H, W)` image, each step with probability 1/2: brightness
    +-32, contrast x[0.5, 1.5] (before or after the colour steps), saturation x[0.5, 1.5], hue +-18/180; values
    clipped to 0..255 after each step. Saturation and hue use torchvision's operations (a blend with the grey
    image; an HSV rotation)."""
    x = image.float()
    if coin():
        x = (x + uniform(-32, 32)).clamp(0, 255)
    contrast_first = coin()

    def contrast(t: Tensor) -> Tensor:
        return (t * uniform(0.5, 1.5)).clamp(0, 255) if coin() else t

    if contrast_first:
        x = contrast(x)
    x = x.round().to(torch.uint8)
    if coin():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5))
    if coin():
        x = TF.adjust_hue(x, int(torch.randint(-18, 19, ())) / 180.0)
    if not contrast_first:
        x = contrast(x.float()).round().to(torch.uint8)
    return x


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 `(3, H, W)` -> float, (x / 255 - mean) / std."""
    return TF.normalize(image.float() / 255.0, list(mean), list(std))


class SegmentationTrain:
    """Segmenter's (mmseg's) ADE20K training pipeline on `(image uint8 (3, H, W), label uint8/long (H, W))`."""

    def __init__(self, crop: int, scale_range: Sequence[float], base_size: int, cat_max_ratio: float, hflip: float,
                 photometric: bool, mean: Sequence[float], std: Sequence[float]) -> None:
        self.crop, self.scale_range, self.base_size = crop, tuple(scale_range), base_size
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.mean, self.std = mean, std

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        ratio = uniform(*self.scale_range)
        height, width = image.shape[-2:]
        size = rescale_size(int(height), int(width), self.base_size * ratio, self.crop * ratio)
        image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        label = TF.resize(label[None], list(size), interpolation=TF.InterpolationMode.NEAREST)[0]
        top, left, h, w = crop_box(label, self.crop, self.cat_max_ratio)
        image, label = image[:, top:top + h, left:left + w], label[top:top + h, left:left + w]
        if coin(self.hflip):
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = photometric_distortion(image)
        pad = (0, self.crop - image.shape[-1], 0, self.crop - image.shape[-2])  # (left, right, top, bottom)
        x = torch.nn.functional.pad(normalize(image, self.mean, self.std), pad, value=0.0)
        y = torch.nn.functional.pad(label.long(), pad, value=IGNORE_INDEX)
        return x, y


class SegmentationEval:
    """Validation: the image resized so its shorter side is `size` (bilinear), the label map untouched."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        height, width = image.shape[-2:]
        factor = self.size / min(height, width)
        resized = TF.resize(image, [round(height * factor), round(width * factor)],
                            interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return normalize(resized, self.mean, self.std), label.long()


def eval_collate(batch: list[tuple[Tensor, Tensor]]) -> Any:
    """torch's collate, with a message that names the setting when images of different sizes meet in a batch."""
    sizes = {tuple(x.shape) for x, _ in batch}
    if len(sizes) > 1:
        raise DataError(f"data.eval_batch_size: validation images of different sizes in one batch "
                        f"({', '.join(str(s[1:]) for s in sorted(sizes)[:3])}); set data.eval_batch_size=1")
    return default_collate(batch)


# ------------------------------------------------------------------------------------------------ ADE20K
def read_class_names(path: Path, count: int) -> list[str]:
    """Class names from ADE20K's objectInfo150.txt (tab-separated, the name last, first synonym kept); the
    class numbers when the file is absent."""
    if not path.is_file():
        return [str(i) for i in range(count)]
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    names = [row[-1].split(";")[0].strip() for row in rows]
    if len(names) != count:
        raise DataError(f"data: {path} names {len(names)} classes, expected {count}")
    return names


class ADE20KSplit(Dataset):
    """One split's (image, label map) pairs, transformed by a joint `transform(image, label)`."""

    def __init__(self, root: Path, split: str, transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                 reduce_zero_label: bool = True) -> None:
        images, labels = root / "images" / split, root / "annotations" / split
        layout = f"expected {images}/<name>.jpg and {labels}/<name>.png (the ADEChallengeData2016 layout)"
        for folder in (images, labels):
            if not folder.is_dir():
                raise FileNotFoundError(f"data.root: {folder} does not exist: {layout}")
        self.images = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise DataError(f"data: {images} holds no images: {layout}")
        self.labels = [labels / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise DataError(f"data: {len(missing)} image(s) of {images} have no label map, e.g. {missing[0]}")
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, path: Path) -> Tensor:
        try:
            with Image.open(path) as f:
                if f.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"data: label map {path} is {f.mode}, expected one channel of class numbers")
                label = torch.from_numpy(np.asarray(f, dtype=np.int64).copy())
        except (OSError, UnidentifiedImageError) as err:
            raise UnreadableImageError(f"data: cannot read label map {path}: {err}") from err
        if self.reduce_zero_label:  # mmseg: 0 ("other") ignored, the classes 1..150 -> 0..149
            label = torch.where(label == 0, IGNORE_INDEX, label - 1)
        return label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path = self.images[index]
        try:
            image = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise UnreadableImageError(f"data: cannot read image {path}: {err}") from err
        label = self.read_label(self.labels[index])
        if label.shape != image.shape[-2:]:
            raise DataError(f"data: label map {self.labels[index]} is {tuple(label.shape)}, its image "
                            f"{tuple(image.shape[-2:])}")
        return self.transform(image, label)


class SegmentationDataModule(ImageDataModule):
    """The segmentation pipeline on top of the classification DataModule's sampler and loaders: batches are
    `(images (B, 3, H, W), label maps (B, H, W) long, 255 = ignore)`. Subclasses give `build_splits`."""

    dense_labels = True  # batches carry label maps: a `task: segmentation` run needs such a DataModule

    def __init__(self, *, img_size: int = 512, batch_size: int = 8, eval_batch_size: Optional[int] = 1,
                 scale_range: tuple[float, float] = (0.5, 2.0), base_size: int = 2048, cat_max_ratio: float = 0.75,
                 hflip: float = 0.5, photometric: bool = True, **pipeline: Any) -> None:
        super().__init__(img_size=img_size, batch_size=batch_size, eval_batch_size=eval_batch_size, hflip=hflip,
                         auto_augment=None, re_prob=0.0, color_jitter=0.0, **pipeline)
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise DataError(f"data.scale_range: expected [min, max] resize ratios with 0 < min <= max, got "
                            f"{list(scale_range)}")
        if not 0 < cat_max_ratio <= 1:
            raise DataError(f"data.cat_max_ratio: expected a share in (0, 1] (1: any crop), got {cat_max_ratio}")
        if base_size < img_size:
            raise DataError(f"data.base_size: {base_size} is below the crop (data.img_size {img_size})")
        self.scale_range, self.base_size, self.cat_max_ratio = tuple(scale_range), base_size, cat_max_ratio
        self.photometric = photometric

    def train_transform(self) -> Callable[..., Any]:
        return SegmentationTrain(self.img_size, self.scale_range, self.base_size, self.cat_max_ratio,
                                 float(self.train_kwargs["hflip"]), self.photometric, self.mean, self.std)

    def eval_transform(self) -> Callable[..., Any]:
        return SegmentationEval(self.img_size, self.mean, self.std)

    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        """A PIL image alone (`leanvit visualize`): resized so its shorter side is `img_size`, centre-cropped to a
        square, normalised."""
        size = self.img_size

        def transform(image: Image.Image) -> Tensor:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
            pixels = TF.center_crop(TF.resize(pixels, size, antialias=True), [size, size])
            return normalize(pixels, self.mean, self.std)

        return transform

    def _eval_loader(self, dataset: Dataset) -> Any:
        loader = super()._eval_loader(dataset)
        loader.collate_fn = eval_collate
        return loader


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K (SceneParsing, ADEChallengeData2016): 150 classes, 20,210 training and 2,000 validation images.
    `datamodule: ade20k`; `data.root` is the folder holding `images/` and `annotations/`."""

    def __init__(self, *, root: str = "data/ade20k", reduce_zero_label: bool = True, **pipeline: Any) -> None:
        super().__init__(**pipeline)
        self.root = Path(root)
        self.reduce_zero_label = reduce_zero_label

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str]]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root: {self.root} does not exist: expected {self.root}/images/training/ "
                                    f"and {self.root}/annotations/training/ (ADEChallengeData2016)")
        train = ADE20KSplit(self.root, "training", self.train_transform(), self.reduce_zero_label)
        val = ADE20KSplit(self.root, "validation", self.eval_transform(), self.reduce_zero_label)
        classes = read_class_names(self.root / "objectInfo150.txt", 150 if self.reduce_zero_label else 151)
        return train, val, val, classes


__all__ = ["ADE20KDataModule", "SegmentationDataModule", "crop_box", "rescale_size"]
