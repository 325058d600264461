"""Sampling that makes a resumed run exact, with any number of loader workers.

Every random draw of the input pipeline is a function of `(seed, epoch, sample index)`: the sampler
yields `(epoch, index)` pairs and the dataset reseeds the RNGs before transforming a sample. Worker
processes, persistent or not, and restarts therefore do not change what a sample looks like.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from a tuple of integers (the run seed first)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed every global RNG the training loop draws from: torch (CPU and CUDA), numpy (timm Mixup), random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class EpochSampler(DistributedSampler):
    """A DistributedSampler (so Lightning leaves it in place) yielding `(epoch, index)`.

    `repeats > 1` turns on DeiT's repeated augmentation (timm's RepeatAugSampler): each image appears
    `repeats` times per epoch on different ranks, and an epoch keeps the usual number of samples.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 repeats: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeated: Optional[RepeatAugSampler] = None
        if repeats > 1:
            self.repeated = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=repeats)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        if self.repeated is not None:
            self.repeated.set_epoch(self.seed + self.epoch)
            indices = iter(self.repeated)
        else:
            indices = super().__iter__()
        epoch = self.epoch
        return ((epoch, int(i)) for i in indices)

    def __len__(self) -> int:
        return len(self.repeated) if self.repeated is not None else super().__len__()


class SeededSamples(Dataset):
    """Wraps a map-style dataset: `ds[(epoch, i)]` reseeds the RNGs from `(seed, epoch, i)`, then returns `base[i]`.
    A plain integer key (evaluation) is passed through."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            epoch, index = key
            seed_all(derive_seed(self.seed, epoch, index))
            return self.base[index]
        return self.base[key]
