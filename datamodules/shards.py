"""ImageNet as WebDataset tar shards, streamed, with exact resume (`datamodule: wds`).

Layout (timm's `imagenet-1k-wds`, and what `leanvit shard` / `leanvit export-data --format wds` write):

    root/_info.json               {"splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}, ...}}
    root/<filenames of a split>   tar shards, each sample an image (`.jpg`, `.png`, ...) and its class (`.cls`)

`root` is a folder or a URL prefix (`s3://`, `gs://`, `https://` through fsspec; `pipe:CMD` through
webdataset); `data.train_shards` / `data.val_shards` (brace patterns, e.g. `train/shard-{000000..000127}.tar`)
pick shards instead of the split's list. The tar reading is webdataset's.

The epoch order is a pure function of (seed, epoch, world size, loader workers, batch size): the shards are
permuted by (seed, epoch) and concatenated into one sequence of samples; rank r streams its own contiguous
slice, each loader worker a contiguous part of that slice in whole batches, through a seeded shuffle buffer.
So every rank has the same number of batches, ranks and workers read disjoint samples, and an epoch sees every
sample once, except fewer than world x batch samples that drop_last leaves out (a different few each epoch).
With `repeated_aug=k`, each streamed sample appears k times in a row (copies 0..k-1, each its own
augmentation; on one rank, unlike DeiT's sampler, which spreads copies over ranks) and an epoch keeps DeiT's
length, so it streams about 1/k of the shards' samples, as DeiT's repeated augmentation shows 1/k of the
images. Each sample's augmentation is seeded by (seed, epoch, sample, copy), as in the folder DataModule.
Resume: the loader state is (epoch, batches trained); a resumed worker replays its stream without decoding up
to its next batch.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.imagenet import DataError, ImageDataModule, ResumableLoader, load_rgb
from datamodules.sampling import derive_seed, epoch_length, seed_all

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
INFO_NAMES = ("_info.json", "info.json")


# ------------------------------------------------------------------------------------------------ opening
def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def join(root: str, name: str) -> str:
    """A shard name under a folder or URL prefix (an absolute name or URL stays as it is)."""
    if urlparse(name).scheme or name.startswith(("/", "pipe:")):
        return name
    return f"{root.rstrip('/')}/{name}"


def open_url(url: str) -> Any:
    """A binary stream: local files and `pipe:CMD` through webdataset's gopen; other URLs through fsspec (s3://
    with s3fs, gs:// with gcsfs, https://), else through webdataset's own schemes (curl, gsutil)."""
    import webdataset

    if is_local(url) or url.startswith("pipe:"):
        return webdataset.gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as error:  # no fsspec backend installed for this scheme
        if urlparse(url).scheme in webdataset.gopen.gopen_schemes:
            return webdataset.gopen(url, "rb")
        raise DataError(f"data: cannot open {url}: {error}") from error


def read_info(root: str) -> dict[str, Any]:
    """`root/_info.json` (or `info.json`); {} when there is none."""
    for name in INFO_NAMES:
        url = join(root, name)
        if is_local(url) and not Path(url.removeprefix("file://")).is_file():
            continue
        try:
            with open_url(url) as f:
                return json.load(f)
        except ValueError as error:
            raise DataError(f"data: {url} is not valid JSON: {error}") from error
        except OSError:
            if is_local(url):
                raise
    return {}


@dataclass(frozen=True)
class ShardList:
    """A split's shards and how many samples each holds."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def offsets(self) -> list[int]:
        """The id of each shard's first sample (a sample's id: its position in the split's shard list)."""
        return [0, *itertools.accumulate(self.lengths)][:-1]


def resolve_split(root: str, split: str, info: dict[str, Any], pattern: Optional[str]) -> Optional[ShardList]:
    """The split's shards from a brace pattern or _info.json, with their sizes; None if the split has none.
    Every local shard must exist: a missing one is named now, not hours into a run."""
    from braceexpand import braceexpand

    splits = info.get("splits", {})
    entry = next((splits[name] for name in SPLIT_NAMES[split] if name in splits), None)
    known: dict[str, int] = {}
    if entry is not None:
        known = dict(zip(entry["filenames"], entry["shard_lengths"]))
    if pattern:
        names = list(braceexpand(pattern))
        missing = [n for n in names if n not in known]
        if missing:
            raise DataError(f"data.{split}_shards: {missing[0]} is not listed in {join(root, INFO_NAMES[0])} with its "
                            f"sample count ({len(missing)} of {len(names)} shards unlisted); write shards with "
                            f"`leanvit shard`, or list them in its splits.{split}.filenames/shard_lengths")
    elif entry is not None:
        names = list(entry["filenames"])
    else:
        return None
    urls = tuple(join(root, n) for n in names)
    if not names or sum(int(known[n]) for n in names) == 0:
        raise DataError(f"data: the {split} split of {root} has no samples")
    for url in urls:
        if is_local(url) and not Path(url).is_file():
            raise DataError(f"data: shard {url} does not exist ({split} split of {root})")
    return ShardList(urls, tuple(int(known[n]) for n in names))


# ------------------------------------------------------------------------------------------------ the epoch plan
def worker_batches(batches: int, workers: int) -> list[int]:
    """Batches of each loader worker: the DataLoader takes one batch from each worker in turn, so with the first
    `batches % workers` workers one batch longer, batch b of the rank comes from worker b % workers."""
    return [batches // workers + (w < batches % workers) for w in range(workers)]


@dataclass(frozen=True)
class Slice:
    """What one loader worker streams in an epoch: `distinct` samples from `start` of the epoch's sequence
    (wrapping around), each `repeats` times, of which it yields `samples` (whole batches)."""

    start: int
    distinct: int
    samples: int


def rank_samples(num_samples: int, world: int, repeats: int = 1) -> int:
    """Samples each rank trains on per epoch: its share, rounded down (a stream needs no padding; what is left
    over, fewer than `world` samples, waits for another epoch's order), or DeiT's epoch length with repeats."""
    return epoch_length(num_samples, world, repeats) if repeats > 1 else num_samples // world


def train_plan(num_samples: int, *, world: int, rank: int, workers: int, batch_size: int,
               repeats: int = 1) -> tuple[int, list[Slice]]:
    """(batches per rank, each worker's slice) for one rank: the same number of batches on every rank, disjoint
    contiguous slices (DeiT's epoch length with repeated augmentation, as the folder sampler's)."""
    repeats = max(1, repeats)
    batches = rank_samples(num_samples, world, repeats) // batch_size
    per_worker = worker_batches(batches, workers)
    distinct = [math.ceil(n * batch_size / repeats) for n in per_worker]
    rank_start = rank * sum(distinct)
    slices, start = [], rank_start
    for n, d in zip(per_worker, distinct):
        slices.append(Slice(start, d, n * batch_size))
        start += d
    return batches, slices


def eval_plan(num_samples: int, *, world: int, rank: int, workers: int, batch_size: int) -> list[Slice]:
    """Evaluation: rank r reads its contiguous share in order, its workers whole batches of it (only the last
    batch partial); every sample exactly once over the ranks."""
    lo, hi = rank * num_samples // world, (rank + 1) * num_samples // world
    per_worker = worker_batches(math.ceil((hi - lo) / batch_size), workers)
    slices, start = [], lo
    for n in per_worker:
        count = min(n * batch_size, hi - start)
        slices.append(Slice(start, count, count))
        start += count
    return slices


def shard_order(shards: ShardList, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(len(shards.urls)))
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(len(shards.urls), generator=generator).tolist()


# ------------------------------------------------------------------------------------------------ streaming
def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard (webdataset's tar reader, grouped by key); a broken shard -> DataError."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def fail(error: Exception) -> bool:
        raise DataError(f"data: cannot read shard {url}: {type(error).__name__}: {error}") from error

    try:
        stream_ = open_url(url)
    except OSError as error:
        raise DataError(f"data: cannot open shard {url}: {error}") from error
    with stream_:
        try:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream_}], handler=fail), handler=fail)
        except DataError:
            raise
        except Exception as error:  # the tar reader's own errors (tarfile.ReadError, a truncated stream)
            raise DataError(f"data: cannot read shard {url}: {type(error).__name__}: {error}") from error


def stream(shards: ShardList, order: list[int], start: int, count: int,
           reader: Callable[[str], Iterable[dict[str, Any]]] = read_shard) -> Iterator[tuple[int, dict[str, Any]]]:
    """`count` raw samples from position `start` of the epoch's sequence (the shards in `order`, concatenated;
    wrapping around), each with its id. Reads only the shards that hold them."""
    offsets = shards.offsets()
    total = shards.num_samples
    position, left = start % total, count
    while left > 0:
        # the shard holding `position` of the sequence, and the sample's place in it
        before = 0
        for shard in order:
            if before + shards.lengths[shard] > position:
                break
            before += shards.lengths[shard]
        skip = position - before
        url, length = shards.urls[shard], shards.lengths[shard]
        seen = 0
        for index, sample in enumerate(reader(url)):
            seen = index + 1
            if index < skip:
                continue
            yield offsets[shard] + index, sample
            left -= 1
            if left == 0 or index + 1 >= length:
                break
        if left > 0 and seen < length:
            raise DataError(f"data: shard {url} holds {seen} samples, its _info.json entry says {length}")
        position = (before + length) % total


def decode(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
    if key is None or "cls" not in sample:
        raise DataError(f"data: {where} has {sorted(k for k in sample if not k.startswith('__'))}; expected an image "
                        f"({', '.join(IMAGE_KEYS)}) and its class (.cls)")
    try:
        image = load_rgb(io.BytesIO(sample[key]))
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"data: cannot read image {where}: {error}") from error
    return image, int(sample["cls"])


class ShardStream(IterableDataset):
    """One split's samples streamed for the rank and loader worker it runs in (see the module docstring).

    `state` (shared memory, so persistent workers see it): [epoch, batches to skip]; the loader sets it before
    each epoch's iterator."""

    def __init__(self, shards: ShardList, transform: Callable[..., Any], *, train: bool, seed: int = 0,
                 batch_size: int = 1, world: int = 1, rank: int = 0, workers: int = 0, repeats: int = 0,
                 shuffle_buffer: int = 2048) -> None:
        self.shards, self.transform, self.train = shards, transform, train
        self.seed, self.batch_size, self.world, self.rank = seed, batch_size, world, rank
        self.workers, self.repeats, self.shuffle_buffer = max(1, workers), max(1, repeats), shuffle_buffer
        self.state = torch.zeros(2, dtype=torch.long).share_memory_()

    def plan(self) -> list[Slice]:
        n = self.shards.num_samples
        if self.train:
            return train_plan(n, world=self.world, rank=self.rank, workers=self.workers, batch_size=self.batch_size,
                              repeats=self.repeats)[1]
        return eval_plan(n, world=self.world, rank=self.rank, workers=self.workers, batch_size=self.batch_size)

    def __len__(self) -> int:
        return sum(s.samples for s in self.plan())

    def raw(self, worker: int, epoch: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(sample id, copy, raw sample) of a worker's epoch, undecoded, in the order it yields them."""
        part = self.plan()[worker]
        order = shard_order(self.shards, self.seed, epoch, self.train)
        samples: Iterable[tuple[int, dict[str, Any]]] = stream(self.shards, order, part.start, part.distinct)
        if self.train and self.shuffle_buffer > 1:
            from webdataset.filters import shuffle

            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, self.world, self.workers))
            samples = shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        emitted = 0
        for sample_id, sample in samples:
            for copy in range(self.repeats if self.train else 1):
                if emitted == part.samples:
                    return
                yield sample_id, copy, sample
                emitted += 1

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.workers:
            raise DataError(f"data.num_workers: the shard stream was planned for {self.workers} loader workers, the "
                            f"loader runs {info.num_workers if info is not None else 0}")
        epoch, skip_batches = (int(v) for v in self.state.tolist())
        # The loader takes batches round-robin from worker 0: batch b of the epoch is the next one of slice b % W.
        # Resumed after k batches, worker j plays slice (k + j) % W, so batch k + j comes first from worker j,
        # skipping the batches of that slice already trained.
        part = (worker + skip_batches) % self.workers
        skip = (skip_batches // self.workers + (part < skip_batches % self.workers)) * self.batch_size
        for position, (sample_id, copy, sample) in enumerate(self.raw(part, epoch)):
            if position < skip:
                continue
            if self.train:
                seed_all(derive_seed(self.seed, epoch, sample_id, copy))
            image, target = decode(sample)
            yield self.transform(image), target


class ShardLoader(ResumableLoader):
    """The training loader of a ShardStream, with the folder loader's checkpoint state (epoch, batches trained)
    and the stream's world size and worker count. Each new iterator (one per epoch) reads the epoch from the
    trainer; a restored mid-epoch state makes the next one skip the batches already trained."""

    def __init__(self, dataset: ShardStream, *args: Any, epoch: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch = epoch
        self.skip = 0
        self.restored_epoch: Optional[int] = None  # the epoch the first iterator after a restore streams

    def __iter__(self) -> Any:
        epoch = self.epoch() if self.restored_epoch is None else self.restored_epoch
        self.dataset.state.copy_(torch.tensor([epoch, self.skip]))  # type: ignore[attr-defined]
        self.skip, self.restored_epoch = 0, None
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        stream_: ShardStream = self.dataset  # type: ignore[assignment]
        return super().state_dict() | {"world": stream_.world, "workers": stream_.workers}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("epoch") != self.epoch():
            return  # from an epoch the trainer has completed: the next iterator streams the trainer's epoch, whole
        if state.get("batches", 0) >= state.get("epoch_batches", float("inf")):
            # written after the epoch's last training batch (before its validation): Lightning creates no other
            # iterator before the next epoch, so this first one streams the next epoch, whole
            self.restored_epoch = int(state["epoch"]) + 1
            return
        stream_ = self.dataset
        checked = (("world", "trainer.devices x num_nodes", "processes", stream_.world),  # type: ignore[attr-defined]
                   ("workers", "data.num_workers", "loader workers", stream_.workers))  # type: ignore[attr-defined]
        for key, setting, what, now in checked:
            if key in state and state[key] != now:
                raise DataError(f"{setting}: the checkpoint's shard stream ran with {state[key]} {what}, this run has "
                                f"{now}; a mid-epoch resume of sharded data needs the same (or resume from an "
                                f"epoch-end checkpoint)")
        self.restored_epoch, self.skip = int(state["epoch"]), int(state.get("batches", 0))


# ------------------------------------------------------------------------------------------------ the DataModule
class WdsDataModule(ImageDataModule):
    """`datamodule: wds`: ImageNet (or any classification set) as tar shards, local or in object storage, with
    the folder DataModule's DeiT transforms, repeated augmentation, per-sample seeding and exact resume."""

    def __init__(self, *, root: str = "data/imagenet-wds", train_shards: Optional[str] = None,
                 val_shards: Optional[str] = None, test_shards: Optional[str] = None, shuffle_buffer: int = 2048,
                 **pipeline: Any) -> None:
        super().__init__(**pipeline)
        if shuffle_buffer < 0:
            raise DataError(f"data.shuffle_buffer: expected 0 (off) or a number of samples, got {shuffle_buffer!r}")
        self.root = str(root)
        self.patterns = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.shuffle_buffer = shuffle_buffer
        self.shards: dict[str, ShardList] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.shards:
            return
        if is_local(self.root) and not Path(self.root).is_dir():
            raise FileNotFoundError(f"data.root: {self.root} does not exist: expected a folder (or URL prefix) of tar "
                                    f"shards with an _info.json (`leanvit shard IMAGE_FOLDER OUT` writes one)")
        info = read_info(self.root)
        for split in ("train", "val", "test"):
            shards = resolve_split(self.root, split, info, self.patterns[split])
            if shards is not None:
                self.shards[split] = shards
        for split in ("train", "val"):
            if split not in self.shards:
                raise DataError(f"data.root: {self.root} has no {split} shards: expected "
                                f"{join(self.root, INFO_NAMES[0])} "
                                f"with splits.{split} (filenames, shard_lengths), or data.{split}_shards")
        self.shards.setdefault("test", self.shards["val"])
        classes = info.get("classes")
        self.classes = list(classes) if classes else [str(i) for i in range(int(info.get("num_classes", 1000)))]
        self.datasets = self.shards  # what the base class's loaders are given

    def _stream(self, shards: ShardList, train: bool, batch_size: int) -> ShardStream:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        transform = self.train_transform() if train else self.eval_transform()
        return ShardStream(shards, transform, train=train, seed=self.seed, batch_size=batch_size, world=world,
                           rank=rank, workers=self.num_workers, repeats=self.repeated_aug,
                           shuffle_buffer=self.shuffle_buffer)

    def training_samples(self, world_size: int) -> tuple[int, int]:
        self.setup("fit")
        images = self.shards["train"].num_samples
        return images, rank_samples(images, world_size, max(self.repeated_aug, 1))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return ShardLoader(self._stream(self.shards["train"], True, self.batch_size), batch_size=self.batch_size,
                           drop_last=True, progress=self._train_progress, epoch=self.fit_epoch, **self._loader_kwargs())

    def _eval_loader(self, dataset: Any) -> DataLoader:
        """In order, each rank its contiguous share (the stream splits it: no sampler)."""
        return self._loader(self._stream(dataset, False, self.eval_batch_size), self.eval_batch_size)
