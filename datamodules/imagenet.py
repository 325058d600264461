"""ImageNet in the standard folder layout, with the DeiT training recipe through timm's transforms.

    root/train/<wnid>/*.JPEG
    root/val/<wnid>/*.JPEG      (validation, and test unless root/test/<wnid>/ exists)
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from datamodules.sampling import EpochSampler, EvalSampler, SeededSamples, epoch_length

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with the user's data (a file, a folder, a setting that does not fit the data): reported as one
    line naming it, wherever in a run it is found (also from a loader worker)."""


class UnreadableImageError(DataError):
    """An image file that PIL cannot decode; the message names the file."""


WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, by its meaning rather than its bytes.

    - 16-bit and 32-bit integer grey (`I;16*`, `I`: a 16-bit PNG) is rescaled from 0..65535 to 0..255 (PIL's
      `convert("RGB")` clips it, collapsing every grey level above 255 to white); float grey (`F`) is taken
      as 0..1 when its values lie there, else as 0..255.
    - Transparency (RGBA, LA, a palette or grey image with a transparent colour) is composited over white,
      as an image viewer shows it (`convert("RGB")` keeps whatever colour the transparent pixels hold).
    - Grey, palette, CMYK and YCbCr go through PIL's own conversion.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64)  # (H, W)
        if image.mode == "F":
            scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.rint(np.nan_to_num(pixels) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: str | Path | IO[bytes]) -> Image.Image:
    """An image file (a path, or an open binary file such as a shard member's bytes) as 8-bit RGB (`to_rgb`);
    a decoding failure raises PIL's own error."""
    with (open(source, "rb") if isinstance(source, (str, Path)) else contextlib.nullcontext(source)) as f:
        image = Image.open(f)
        image.load()
        return to_rgb(image)


def check_image_folder(split_dir: Path) -> None:
    """Fail with a message that says what was expected where, before torchvision's generic errors."""
    expected = f"expected {split_dir}/<class>/<image> (e.g. {split_dir}/n01440764/img.JPEG)"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data: {split_dir} does not exist: {expected}")
    entries = list(split_dir.iterdir())
    classes = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if loose:
        raise ValueError(f"data: images lie directly in {split_dir} ({loose[0].name}, ...): {expected}")
    if not classes:
        raise ValueError(f"data: {split_dir} has no class folders: {expected}")
    for folder in sorted(classes):
        if not any(p.suffix.lower() in IMG_EXTENSIONS for p in folder.iterdir() if p.is_file()):
            raise ValueError(f"data: class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}): {expected}")


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder whose unreadable images are reported by path, or skipped when asked.

    A skipped image is replaced by the next readable one, so batches keep their size; every skip is
    warned about and counted in `skipped` (shared memory, so loader workers' counts add up)."""

    def __init__(self, root: str | Path, transform: Callable[..., Any], skip_unreadable: bool = False,
                 skipped: Optional[torch.Tensor] = None) -> None:
        check_image_folder(Path(root))
        super().__init__(str(root), transform=transform)
        self.skip_unreadable = skip_unreadable
        self.skipped = skipped if skipped is not None else torch.zeros((), dtype=torch.long).share_memory_()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for _ in range(len(self.samples)):
            path, target = self.samples[index]
            try:
                image = load_rgb(path)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                if not self.skip_unreadable:
                    raise UnreadableImageError(
                        f"data: cannot read image {path}: {err} (set data.skip_unreadable=true to skip it)"
                    ) from err
                warnings.warn(f"data: skipping unreadable image {path}: {err}", stacklevel=2)
                self.skipped += 1
                index = (index + 1) % len(self.samples)
                continue
            return self.transform(image), target
        raise UnreadableImageError(f"data: no readable image in {self.root}")


def check_pipeline(*, img_size: int, batch_size: int, eval_batch_size: Optional[int], num_workers: int,
                   repeated_aug: int, re_prob: float, hflip: float, color_jitter: float, scale: tuple[float, ...],
                   crop_pct: float, std: tuple[float, ...]) -> None:
    """Values no data pipeline can run with -> a DataError naming the `data.` key and what it expects."""
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise DataError(f"data.{key}: expected {expected}, got {value!r}")

    need(img_size >= 1, "img_size", img_size, "a positive number of pixels")
    need(batch_size >= 1, "batch_size", batch_size, "a positive number of images per process")
    need(eval_batch_size is None or eval_batch_size >= 1, "eval_batch_size", eval_batch_size,
         "a positive number of images (or null: batch_size)")
    need(num_workers >= 0, "num_workers", num_workers, "0 (load in the main process) or more worker processes")
    need(repeated_aug >= 0, "repeated_aug", repeated_aug, "0 (off) or the number of copies of each image, e.g. 3")
    for key, value in (("re_prob", re_prob), ("hflip", hflip)):
        need(0.0 <= value <= 1.0, key, value, "a probability in [0, 1]")
    need(color_jitter >= 0, "color_jitter", color_jitter, "0 (off) or a positive strength")
    need(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "scale", list(scale),
         "[min, max] area fractions with 0 < min <= max <= 1")
    need(0 < crop_pct <= 1, "crop_pct", crop_pct, "a fraction in (0, 1]")
    need(len(std) == 3 and all(v > 0 for v in std), "std", list(std), "three positive numbers")


class ResumableLoader(DataLoader):
    """The training DataLoader with the state Lightning saves in every checkpoint: the epoch and how many of its
    batches were trained (read from the trainer when the checkpoint is written). Restored from a mid-epoch
    checkpoint it starts at the next batch of the same epoch order (`EpochSampler.skip`); the data order is a
    pure function of (seed, epoch, position), so the resumed run sees exactly the batches it would have."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches, epoch_batches = self.progress()
        return {"epoch": epoch, "batches": batches, "epoch_batches": epoch_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler) or state.get("epoch") != sampler.epoch or not self.batch_size:
            return
        if state["batches"] >= state.get("epoch_batches", float("inf")):
            # written after the epoch's last training batch (before its validation): Lightning will not create
            # another iterator before the next epoch, so this first one must already be the next epoch's
            sampler.set_epoch(sampler.epoch + 1)
        else:
            sampler.skip(int(state["batches"]) * self.batch_size)


class ImageDataModule(pl.LightningDataModule):
    """The image pipeline every data set shares: timm transforms, the epoch-seeded sampler, the loaders.

    Transform defaults are DeiT's: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode),
    colour jitter 0.3, bicubic, crop_pct 0.875, ImageNet mean/std. `repeated_aug=3` is DeiT's repeated
    augmentation. Samples are drawn by an epoch-seeded sampler, so a resumed run sees the same batches.
    Subclasses say where the images come from (`build_splits`).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        repeated_aug: int = 0,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        color_jitter: float = 0.3,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_pipeline(img_size=img_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
                       num_workers=num_workers, repeated_aug=repeated_aug, re_prob=re_prob, hflip=hflip,
                       color_jitter=color_jitter, scale=tuple(scale), crop_pct=crop_pct, std=tuple(std))
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers
        self.repeated_aug = repeated_aug
        self.train_kwargs: dict[str, Any] = dict(auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode,
                                 color_jitter=color_jitter, hflip=hflip, scale=tuple(scale))
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.datasets: dict[str, Any] = {}  # split -> a map-style Dataset (folders), or a ShardList (shards)
        self.classes: list[str] = []

    def train_transform(self) -> Callable[..., Any]:
        return create_transform(self.img_size, is_training=True, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, **self.train_kwargs)

    def eval_transform(self) -> Callable[..., Any]:
        return create_transform(self.img_size, is_training=False, interpolation=self.interpolation,
                                crop_pct=self.crop_pct, mean=self.mean, std=self.std)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str]]:
        """-> train, val, test datasets (transformed) and the class names."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """The number of classes the data set has (known once `setup()` has read it)."""
        if not self.datasets:
            raise RuntimeError(f"{type(self).__name__}.num_classes: call setup() first (it reads the data set)")
        return len(self.classes)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        train, val, test, self.classes = self.build_splits()
        self.datasets = {"train": SeededSamples(train, self.seed), "val": val, "test": test}

    def check_training_batches(self, world_size: int) -> None:
        """A training set that gives no full batch would end `fit` at once, "successfully": refuse it."""
        images, per_rank = self.training_samples(world_size)
        if per_rank < self.batch_size:
            procs = f"{world_size} processes" if world_size > 1 else "1 process"
            raise DataError(f"data.batch_size: {self.batch_size} is more than the {per_rank} training samples an epoch "
                            f"gives each process ({images} images, {procs}): no training batch at all (the last "
                            f"partial batch is dropped); use data.batch_size <= {per_rank}")

    def training_samples(self, world_size: int) -> tuple[int, int]:
        """(training images, samples each process trains on per epoch)."""
        self.setup("fit")
        images = len(self.datasets["train"])
        return images, epoch_length(images, world_size, max(self.repeated_aug, 1))

    def fit_epoch(self) -> int:
        """The epoch the fit loop runs next (after a resume, not 0)."""
        trainer = self.trainer
        # the fit loop's epoch counter (a progress tracker whose typed base lacks `processed`)
        return getattr(trainer.fit_loop.epoch_progress.current, "processed") if trainer is not None else 0

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                    persistent_workers=self.persistent_workers and self.num_workers > 0)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, **self._loader_kwargs(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(self.datasets["train"], num_replicas=world, rank=rank, seed=self.seed,
                               repeats=self.repeated_aug)
        # Lightning creates the first iterator, and with workers prefetches from it, before its set_epoch call:
        # after a resume that first epoch is not 0, so start at the epoch the fit loop resumes at.
        sampler.set_epoch(self.fit_epoch())
        return ResumableLoader(self.datasets["train"], batch_size=self.batch_size, sampler=sampler, drop_last=True,
                               progress=self._train_progress, **self._loader_kwargs())

    def _train_progress(self) -> tuple[int, int, int]:
        """(epoch, batches of it trained, batches it has) as the trainer counts them when a checkpoint is written."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 0
        return (trainer.current_epoch, getattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed"),
                int(trainer.num_training_batches))

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._eval_loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._eval_loader(self.datasets["test"])

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """In order; split across DDP ranks without padding, so every image counts once."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return self._loader(dataset, self.eval_batch_size, sampler=EvalSampler(dataset, num_replicas=world, rank=rank))


class ImageNetDataModule(ImageDataModule):
    """ImageNet, or any data set in its folder layout: `root/{train,val}/<class>/<image>`, and `root/test/`
    when present (else test = val). Unreadable images are errors naming the file, or skipped (counted in
    `skipped_images`, logged as `data/skipped_images`) with `skip_unreadable`."""

    def __init__(self, *, root: str = "data/imagenet", skip_unreadable: bool = False, **pipeline: Any) -> None:
        super().__init__(**pipeline)
        self.root = Path(root)
        self.skip_unreadable = skip_unreadable
        self.skipped = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def skipped_images(self) -> int:
        return int(self.skipped.item())

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str]]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root: {self.root} does not exist: expected {self.root}/train/<class>/<image> and "
                f"{self.root}/val/<class>/<image> (the ImageNet layout)")
        split = lambda name, tf: ImageFolderDataset(self.root / name, tf, self.skip_unreadable, self.skipped)  # noqa: E731
        train = split("train", self.train_transform())
        val = split("val", self.eval_transform())
        test = split("test", self.eval_transform()) if (self.root / "test").is_dir() else val
        if val.classes != train.classes:
            raise ValueError(f"data: {self.root}/val has {len(val.classes)} class folders, {self.root}/train has "
                             f"{len(train.classes)}; they must be the same classes")
        return train, val, test, train.classes
