"""Writing tar shards in timm's `imagenet-1k-wds` layout (`leanvit shard`, `leanvit export-data --format wds`).

    OUT/train/train-000000.tar ...  each sample: `<key>.<image extension>` (the image file's own bytes, never
    OUT/val/val-000000.tar ...      re-encoded) and `<key>.cls` (the class index, as text)
    OUT/_info.json                  {"splits": {split: {name, num_samples, filenames, shard_lengths}},
                                     "classes": [...], "num_classes": N}

webdataset's TarWriter writes each shard under a temporary name, renamed when complete; OUT must not hold
shards already (nothing is overwritten).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

Sample = tuple[str, str, Callable[[], bytes], int]  # (key, image extension, its bytes (read when written), class)


def refuse_existing(out: Path) -> None:
    for name in ("_info.json", "train", "val"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists: leanvit writes shards into a new folder only (nothing is "
                                  f"overwritten); choose another OUT or remove it")


def write_split(out: Path, split: str, samples: list[Sample], samples_per_shard: int) -> dict:
    """One split's shards under `out/split/`; returns its _info.json entry."""
    from tqdm import tqdm
    from webdataset import TarWriter

    (out / split).mkdir(parents=True)
    filenames, lengths = [], []
    progress = tqdm(total=len(samples), desc=f"shard {split}", unit="img", leave=False)
    for shard, first in enumerate(range(0, len(samples), samples_per_shard)):
        name = f"{split}/{split}-{shard:06d}.tar"
        part = out / f"{name}.partial"
        chunk = samples[first:first + samples_per_shard]
        with open(part, "wb") as stream, TarWriter(stream) as tar:
            for key, ext, read, target in chunk:
                tar.write({"__key__": key, ext: read(), "cls": str(target).encode()})
                progress.update()
        os.replace(part, out / name)
        filenames.append(name)
        lengths.append(len(chunk))
    progress.close()
    return {"name": split, "num_samples": sum(lengths), "filenames": filenames, "shard_lengths": lengths}


def write_info(out: Path, splits: dict[str, dict], classes: list[str]) -> None:
    tmp = out / "_info.json.partial"
    tmp.write_text(json.dumps({"splits": splits, "classes": classes, "num_classes": len(classes)}, indent=1))
    os.replace(tmp, out / "_info.json")


def shard_image_folder(source: str | Path, out: str | Path, samples_per_shard: int = 1000, seed: int = 0,
                       splits: Optional[tuple[str, ...]] = None) -> Path:
    """An ImageNet-style folder (`source/{train,val[,test]}/<class>/<image>`) as shards in `out`; the training
    samples in a seeded random order (a stream's shuffle buffer then mixes classes), the others in order."""
    from torchvision.datasets import ImageFolder

    from datamodules.imagenet import check_image_folder

    source, out = Path(source), Path(out)
    refuse_existing(out)
    names = splits or tuple(s for s in ("train", "val", "test") if (source / s).is_dir())
    if "train" not in names or "val" not in names:
        raise FileNotFoundError(f"{source}: expected {source}/train/<class>/<image> and {source}/val/<class>/<image>")
    info, classes = {}, None
    for split in names:
        check_image_folder(source / split)
        folder = ImageFolder(str(source / split))
        if classes is None:
            classes = folder.classes
        elif folder.classes != classes:
            raise ValueError(f"{source / split} has other class folders than {source / names[0]}")
        items = [(f"{Path(p).parent.name}_{Path(p).stem}", Path(p).suffix.lower().lstrip(".") or "jpg",
                  Path(p).read_bytes, target) for p, target in folder.samples]
        if split == "train":
            random.Random(seed).shuffle(items)
        info[split] = write_split(out, split, items, samples_per_shard)
    write_info(out, info, list(classes or []))
    return out


def shard_arrays(out: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                 samples_per_shard: int = 1000) -> Path:
    """Images held as arrays (the embedded data sets) as PNG shards in `out`."""
    import io

    out = Path(out)
    refuse_existing(out)

    def png(image: np.ndarray) -> Callable[[], bytes]:
        def encode() -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            return buffer.getvalue()
        return encode

    info = {}
    for split, (images, labels) in splits.items():
        items = [(f"{i:06d}", "png", png(images[i]), int(labels[i])) for i in range(len(labels))]
        if split == "train":
            random.Random(0).shuffle(items)
        info[split] = write_split(out, split, items, samples_per_shard)
    write_info(out, info, classes)
    return out


def export_embedded_shards(out: str | Path, dataset: str = "digits", val_fraction: float = 0.2, split_seed: int = 0,
                           samples_per_shard: int = 1000) -> Path:
    """The embedded data set's train/val split (the embedded DataModule's) as shards."""
    from datamodules.embedded import load_embedded, split_indices

    images, labels = load_embedded(dataset)  # type: ignore[arg-type]
    split = split_indices(labels, val_fraction, split_seed)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return shard_arrays(out, {name: (images[idx], labels[idx]) for name, idx in split.items()}, classes,
                        samples_per_shard)
