"""DataModules: the ImageNet folder layout (generated from the embedded digits), its errors, and sampling
that does not depend on workers or restarts."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import EmbeddedDataModule, ImageNetDataModule, export_image_folder
from datamodules.embedded import load_embedded, split_indices
from datamodules.imagenet import UnreadableImageError
from datamodules.sampling import EpochSampler


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_image_folder(tmp_path_factory.mktemp("digits"), "digits")


def imagenet(root: Path, **kwargs: object) -> ImageNetDataModule:
    settings = dict(root=str(root), img_size=32, batch_size=16, num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    return ImageNetDataModule(**(settings | kwargs))


def test_embedded_digits_are_real_and_split_by_class() -> None:
    images, labels = load_embedded("digits")
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    split = split_indices(labels, 0.2, seed=0)
    assert not set(split["train"]) & set(split["val"]) and len(split["train"]) + len(split["val"]) == 1797
    per_class = np.bincount(labels[split["val"]], minlength=10) / np.bincount(labels, minlength=10)
    assert np.allclose(per_class, 0.2, atol=0.01)


def test_export_and_imagenet_datamodule_agree_with_embedded(tree: Path) -> None:
    assert sorted(p.name for p in (tree / "train").iterdir()) == [str(c) for c in range(10)]
    folder = imagenet(tree, auto_augment=None, crop_pct=1.0)
    folder.setup()
    embedded = EmbeddedDataModule()
    embedded.setup()
    assert folder.num_classes == embedded.num_classes == 10
    assert len(folder.datasets["train"]) == len(embedded.datasets["train"]) == 1438
    # the validation images are the same pixels through the same eval transform (PNG is lossless)
    _, labels = load_embedded("digits")
    val_indices = list(split_indices(labels, 0.2, seed=0)["val"])
    for position in (0, 100, 358):
        path, target = folder.datasets["val"].samples[position]
        original = int(Path(path).stem)
        x_folder, y_folder = folder.datasets["val"][position]
        x_embed, y_embed = embedded.datasets["val"][val_indices.index(original)]
        assert y_folder == y_embed == target
        torch.testing.assert_close(x_folder, x_embed)
    x, y = next(iter(folder.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


def test_deit_train_transform_is_timms(tree: Path) -> None:
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    dm = ImageNetDataModule(root=str(tree))
    steps = dm.train_transform().transforms
    assert any(isinstance(t, RandAugment) for t in steps) and any(isinstance(t, RandomErasing) for t in steps)
    rand_erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert rand_erasing.probability == 0.25 and rand_erasing.mode == "pixel"
    eval_steps = [type(t).__name__ for t in dm.eval_transform().transforms]
    assert eval_steps[:2] == ["Resize", "CenterCrop"] and dm.eval_transform().transforms[0].size == 256  # 224/0.875


def test_randaugment_posterize_at_full_magnitude_does_not_crash() -> None:
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    # DeiT's rand-m9-mstd0.5 reaches magnitude 10, where the increasing posterize keeps 0 bits
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(Image.new("RGB", (8, 8), (200, 100, 50))).getpixel((0, 0)) == (0, 0, 0)


def test_missing_root_and_wrong_layouts(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.root: .*nowhere does not exist: expected .*/train/<class>/<image>"):
        imagenet(tmp_path / "nowhere").setup()
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    shutil.copy(next((tree / "train" / "3").iterdir()), flat / "train" / "a.png")
    with pytest.raises(ValueError, match=r"images lie directly in .*flat/train \(a.png"):
        imagenet(flat).setup()
    empty = tmp_path / "empty"
    shutil.copytree(tree, empty)
    for png in (empty / "train" / "7").iterdir():
        png.unlink()
    with pytest.raises(ValueError, match=r"class folder .*empty/train/7 holds no images"):
        imagenet(empty).setup()
    noval = tmp_path / "noval"
    shutil.copytree(tree / "train", noval / "train")
    with pytest.raises(FileNotFoundError, match=r"noval/val does not exist"):
        imagenet(noval).setup()


def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path: Path, tree: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    bad = sorted((broken / "val" / "0").iterdir())[0]
    bad.write_bytes(b"not an image at all")
    dm = imagenet(broken)
    dm.setup()
    with pytest.raises(UnreadableImageError, match=str(bad)):
        next(iter(dm.val_dataloader()))
    skipping = imagenet(broken, skip_unreadable=True)
    skipping.setup()
    with pytest.warns(UserWarning, match=f"skipping unreadable image {bad}"):
        x, y = next(iter(skipping.val_dataloader()))
    assert x.shape[0] == 16 and skipping.skipped_images == 1


def test_epoch_sampler_shards_and_reshuffles() -> None:
    data = list(range(10))
    ranks = [list(EpochSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert all(epoch == 0 and copy == 0 for part in ranks for epoch, _, copy in part)
    assert sorted(i for part in ranks for _, i, _ in part) == data  # the ranks split the data set
    sampler = EpochSampler(data, seed=3)
    first = [i for _, i, _ in sampler]
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _, _ in second} == {1} and [i for _, i, _ in second] != first
    repeated = EpochSampler(list(range(512)), num_replicas=2, rank=0, seed=0, repeats=3)
    assert len(list(repeated)) == len(repeated) == 256


def deit_ra_reference(n: int, epoch: int, num_replicas: int, rank: int, repeats: int = 3) -> list[int]:
    """DeiT's RASampler, written out from facebookresearch/deit samplers.py (indices only)."""
    import math

    g = torch.Generator()
    g.manual_seed(epoch)
    indices = torch.repeat_interleave(torch.randperm(n, generator=g), repeats=repeats).tolist()
    num_samples = math.ceil(n * repeats / num_replicas)
    indices += indices[:num_samples * num_replicas - len(indices)]
    selected = int(math.floor(n // 256 * 256 / num_replicas))
    return indices[rank:num_samples * num_replicas:num_replicas][:selected]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_repeated_augmentation_order_is_deits_and_every_copy_is_distinct(world: int) -> None:
    n = 700
    keys = [list(EpochSampler(list(range(n)), num_replicas=world, rank=r, seed=0, repeats=3)) for r in range(world)]
    for rank, part in enumerate(keys):  # the images each rank sees are DeiT's RASampler's (seed 0 + epoch 0)
        assert [i for _, i, _ in part] == deit_ra_reference(n, 0, world, rank)
    everything = [(i, c) for part in keys for _, i, c in part]
    assert len(everything) == len(set(everything))  # no (image, copy) appears twice, on any rank


def test_repeated_augmentation_gives_each_copy_its_own_view() -> None:
    """The bug: every copy of an image was reseeded alike, so a repeated-augmentation batch held 3 identical views."""
    dm = EmbeddedDataModule(batch_size=48, repeated_aug=3, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5-inc1",
                            re_prob=0.25)
    images, labels = next(iter(dm.train_dataloader()))
    keys = list(dm.train_dataloader().sampler)[:48]
    flat = images.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 48  # no two images of the batch are identical
    by_index: dict[int, list[int]] = {}
    for position, (_, index, _) in enumerate(keys):
        by_index.setdefault(index, []).append(position)
    copies = [positions for positions in by_index.values() if len(positions) > 1]
    assert copies and all(len(p) == 3 for p in copies)  # consecutive copies of one image on one device
    for positions in copies:
        assert len({int(labels[p]) for p in positions}) == 1  # ... share their label
    # and a copy's view is still a pure function of (seed, epoch, index, copy): the same key, the same pixels
    again = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(images, again)


def test_augmentation_depends_on_epoch_and_index_not_on_workers() -> None:
    def batches(num_workers: int, epoch: int) -> list[torch.Tensor]:
        dm = EmbeddedDataModule(batch_size=32, num_workers=num_workers, persistent_workers=True, scale=(0.3, 1.0),
                                auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        return [next(it)[0] for _ in range(2)]

    main_process = batches(0, epoch=1)
    workers = batches(2, epoch=1)
    for a, b in zip(main_process, workers):
        assert torch.equal(a, b)
    assert not torch.equal(batches(0, epoch=2)[0], main_process[0])


def test_num_classes_reads_no_data_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for the class count never scans the data behind the caller's back: before `setup()` it says so."""
    dm = EmbeddedDataModule()

    def scanned() -> None:
        raise AssertionError("num_classes read the data set")

    monkeypatch.setattr(dm, "build_splits", scanned)
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        _ = dm.num_classes
    monkeypatch.undo()
    dm.setup()
    assert dm.num_classes == 10
