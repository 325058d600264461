"""Sampling that makes a resumed run exact, with any number of loader workers.

Every random draw of the input pipeline is a function of `(seed, epoch, sample index, copy)`: the sampler
yields `(epoch, index, copy)` keys and the dataset reseeds the RNGs before transforming a sample. Worker
processes, persistent or not, and restarts therefore do not change what a sample looks like. `copy`
numbers the appearances of one image in an epoch (DeiT's repeated augmentation shows each image several
times, and a padded epoch repeats a few): each copy is its own augmentation.
"""
from __future__ import annotations

import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

SampleKey = tuple[int, int, int]  # (epoch, index, copy)


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from a tuple of integers (the run seed first)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed every global RNG the training loop draws from: torch (CPU and CUDA), numpy (timm Mixup), random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def epoch_order(num_items: int, *, seed: int, epoch: int, num_replicas: int, rank: int,
                repeats: int = 1) -> list[tuple[int, int]]:
    """One rank's `(index, copy)` sequence for an epoch: a pure function of its arguments.

    The global order is a permutation seeded by `seed + epoch` (as torch's DistributedSampler), each index
    repeated `repeats` times in a row (DeiT's RASampler: consecutive copies land on different ranks), padded
    by wrapping around to a multiple of `num_replicas`; rank r takes positions r, r + R, ... With repeats,
    an epoch keeps DeiT's length, `floor(N // 256 * 256 / R)` per rank (all of them below 256 images).
    A copy number is unique per index within an epoch (wrapped padding continues the count).
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(num_items, generator=g).tolist()
    repeats = max(1, repeats)
    n = num_items * repeats  # the repeated sequence: perm[p // repeats], copy p % repeats
    per_rank = epoch_length(num_items, num_replicas, repeats)
    positions = range(rank, per_rank * num_replicas, num_replicas)[:per_rank]
    # position p -> index perm[(p % n) // repeats]; wrapped padding (p >= n) counts on as copies repeats, ...
    return [(perm[(p % n) // repeats], (p % n) % repeats + repeats * (p // n)) for p in positions]


def epoch_length(num_items: int, num_replicas: int, repeats: int = 1) -> int:
    """Samples per rank and epoch (see `epoch_order`)."""
    per_rank = math.ceil(num_items * max(1, repeats) / num_replicas)
    if repeats > 1:  # DeiT's RASampler keeps the epoch length of one pass, rounded down to 256 images
        selected = num_items // 256 * 256 // num_replicas if num_items >= 256 else math.ceil(num_items / num_replicas)
        per_rank = min(per_rank, selected)
    return per_rank


class EpochSampler(DistributedSampler):
    """A DistributedSampler (so Lightning leaves it in place and calls `set_epoch`) yielding
    `(epoch, index, copy)` keys in the order of `epoch_order`.

    `repeats > 1` is DeiT's repeated augmentation: each image appears `repeats` times per epoch, the copies on
    different ranks (consecutive on one device), each with its own augmentation; an epoch keeps the usual
    number of samples.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 repeats: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats = max(1, repeats)
        self.start = 0  # samples of this epoch already trained (a mid-epoch resume); used by the next iterator

    def order(self) -> list[tuple[int, int]]:
        return epoch_order(len(self.dataset), seed=self.seed, epoch=self.epoch,  # type: ignore[arg-type]
                           num_replicas=self.num_replicas, rank=self.rank, repeats=self.repeats)

    def skip(self, samples: int) -> None:
        """Let the next iterator start `samples` into this epoch's order (once): a mid-epoch resume continues
        with the next batch, none replayed, none skipped."""
        self.start = samples

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, start = self.epoch, self.start
        self.start = 0
        return ((epoch, index, copy) for index, copy in self.order()[start:])

    def __len__(self) -> int:
        return epoch_length(len(self.dataset), self.num_replicas, self.repeats)  # type: ignore[arg-type]


class EvalSampler(DistributedSampler):
    """Evaluation split across ranks without padding: rank r reads indices r, r + R, ... in order.

    torch's DistributedSampler pads every rank to the same length, so with a data set that the world size
    does not divide some images are counted twice; here every image is counted exactly once and metrics
    gathered over the ranks equal a single-process evaluation."""

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


class SeededSamples(Dataset):
    """Wraps a map-style dataset: `ds[(epoch, i, copy)]` reseeds the RNGs from `(seed, epoch, i, copy)`, then
    returns `base[i]`. A plain integer key (evaluation) is passed through."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | SampleKey) -> Any:
        if isinstance(key, tuple):
            epoch, index, copy = key
            seed_all(derive_seed(self.seed, epoch, index, copy))
            return self.base[index]
        return self.base[key]
