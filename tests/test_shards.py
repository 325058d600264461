"""Sharded data (`datamodule: wds`): the shard writers (`leanvit shard`, `export-data --format wds`) keep every
image and class exactly, the epoch plan gives every rank the same batches of disjoint samples, a resumed epoch
continues exactly, a missing or corrupt shard is one line, and fit runs on shards in 1 and 2 (DDP) processes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.embedded import load_embedded, split_indices
from datamodules.shards import ShardStream, eval_plan, read_info, resolve_split, train_plan

from helpers import FAST, check_success, leanvit, leanvit_subprocess

WDS = "digits/dense_wds.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits as shards of 200 samples (8 train shards, 2 val shards)."""
    out = tmp_path_factory.mktemp("wds") / "digits-wds"
    assert leanvit("export-data", str(out), "--format", "wds", "--samples-per-shard", "200") == 0
    return out


def tar_samples(path: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return list(samples.values())


def test_export_writes_timm_layout_with_every_image(shards: Path, capsys: pytest.CaptureFixture) -> None:
    info = json.loads((shards / "_info.json").read_text())
    images, labels = load_embedded("digits")
    split = split_indices(labels, 0.2, 0)
    for name in ("train", "val"):
        entry = info["splits"][name]
        assert entry["num_samples"] == len(split[name]) == sum(entry["shard_lengths"])
        assert all(f.startswith(f"{name}/") and f.endswith(".tar") for f in entry["filenames"])
        written = [s for f in entry["filenames"] for s in tar_samples(shards / f)]
        assert [len(tar_samples(shards / f)) for f in entry["filenames"]] == entry["shard_lengths"]
        expected = sorted((images[i].tobytes(), int(labels[i])) for i in split[name])
        got = sorted((np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes(), int(s["cls"])) for s in written)
        assert got == expected  # every image, lossless, with its class; none twice
    assert info["classes"] == [str(c) for c in range(10)] and info["num_classes"] == 10
    capsys.readouterr()
    assert leanvit("export-data", str(shards), "--format", "wds") == 2  # never overwrites
    assert "exists: leanvit writes shards into a new folder only" in capsys.readouterr().err


def test_shard_an_image_folder_keeps_the_files_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    assert leanvit("export-data", str(folder)) == 0
    assert leanvit("shard", str(folder), str(tmp_path / "out"), "--samples-per-shard", "500") == 0
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    classes = sorted(p.name for p in (folder / "train").iterdir())
    assert info["classes"] == classes
    for split in ("train", "val"):
        files = {(p.parent.name, p.read_bytes()) for p in (folder / split).glob("*/*.png")}
        written = [s for f in info["splits"][split]["filenames"] for s in tar_samples(tmp_path / "out" / f)]
        assert {(classes[int(s["cls"])], s["png"]) for s in written} == files and len(written) == len(files)


@pytest.mark.parametrize("repeats", [1, 3])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_the_epoch_plan_splits_samples_evenly_and_disjointly(world: int, workers: int, repeats: int) -> None:
    n, batch = 1438, 32
    plans = [train_plan(n, world=world, rank=r, workers=workers, batch_size=batch, repeats=repeats) for r in range(world)]
    assert len({batches for batches, _ in plans}) == 1  # every rank the same number of batches
    batches = plans[0][0]
    positions = []
    for _, slices in plans:
        assert sum(s.samples for s in slices) == batches * batch
        assert all(s.samples % batch == 0 for s in slices)  # whole batches per worker
        assert all(s.distinct * repeats >= s.samples for s in slices)
        positions += [p % n for s in slices for p in range(s.start, s.start + s.distinct)]
    if repeats == 1:
        assert len(positions) == len(set(positions))  # disjoint over ranks and workers
        assert n - len(positions) < world * batch  # all but what drop_last leaves out
    else:  # DeiT's epoch length: n // 256 * 256 samples over the ranks, about 1/3 of them distinct
        assert batches * batch * world <= n // 256 * 256 and len(set(positions)) >= batches * batch * world / repeats
    slices = [s for r in range(world) for s in eval_plan(n, world=world, rank=r, workers=workers, batch_size=batch)]
    assert sorted(p for s in slices for p in range(s.start, s.start + s.samples)) == list(range(n))


def streams(shards: Path, world: int, workers: int, **kwargs: object) -> list[list[ShardStream]]:
    info = read_info(str(shards))
    train = resolve_split(str(shards), "train", info, None)
    assert train is not None
    return [[ShardStream(train, lambda image: image, train=True, batch_size=32, world=world, rank=r, workers=workers,
                         seed=0, **kwargs) for _ in range(1)] for r in range(world)]


def test_ranks_and_workers_stream_disjoint_samples_and_epochs_differ(shards: Path) -> None:
    ids = {}
    for epoch in (0, 1):
        seen = []
        for rank, (stream,) in enumerate(streams(shards, 2, 2)):
            for worker in range(2):
                got = [sample_id for sample_id, _, _ in stream.raw(worker, epoch)]
                assert len(got) == stream.plan()[worker].samples
                seen += got
        assert len(seen) == len(set(seen)) and 1438 - len(seen) < 2 * 32
        ids[epoch] = seen
    assert ids[0] != ids[1] and set(ids[0]) != set(ids[1])  # another shard order and shuffle per epoch


def loader(shards: Path, workers: int, skip: int = 0, epoch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from datamodules.shards import ShardLoader, WdsDataModule

    dm = WdsDataModule(root=str(shards), img_size=32, batch_size=32, num_workers=workers, pin_memory=False,
                       auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, shuffle_buffer=64)
    dm.setup("fit")
    dl = dm.train_dataloader()
    assert isinstance(dl, ShardLoader)
    dl.epoch = lambda: epoch  # type: ignore[method-assign]
    if skip:
        dl.load_state_dict({"epoch": epoch, "batches": skip, "epoch_batches": len(dl), "world": 1,
                            "workers": max(workers, 1)})
    return list(dl)


def test_a_resumed_epoch_continues_exactly(shards: Path) -> None:
    """Workers 2: the batches after a mid-epoch resume (any position, either worker's turn) are the uninterrupted
    epoch's, pixel for pixel (random augmentations included), and no worker count changes the data either way."""
    full = loader(shards, workers=2)
    assert len(full) == 1438 // 32
    for skip in (5, 6):
        tail = loader(shards, workers=2, skip=skip)
        assert len(tail) == len(full) - skip
        for (a, ya), (b, yb) in zip(tail, full[skip:], strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)


def test_a_checkpoint_after_an_epochs_last_batch_resumes_with_the_next_epoch(shards: Path) -> None:
    """Written after the last training batch, before validation: the first iterator after the restore is the
    next epoch's, whole."""
    from datamodules.shards import WdsDataModule

    dm = WdsDataModule(root=str(shards), img_size=32, batch_size=32, num_workers=0, pin_memory=False, shuffle_buffer=64)
    dm.setup("fit")
    dl = dm.train_dataloader()
    dl.epoch = lambda: 0  # type: ignore[method-assign]
    dl.load_state_dict({"epoch": 0, "batches": len(dl), "epoch_batches": len(dl), "world": 1, "workers": 1})
    restored = torch.cat([y for _, y in dl])
    assert not torch.equal(torch.cat([y for _, y in dl]), restored)  # (the next one reads the trainer's epoch: 0)
    assert torch.equal(torch.cat([y for _, y in loader(shards, workers=0, epoch=1)]), restored)
    # a checkpoint of a completed epoch (the trainer resumes at the next one): that epoch, whole, whatever it says
    dl.epoch = lambda: 1  # type: ignore[method-assign]
    for batches in (0, 7, len(dl)):
        dl.load_state_dict({"epoch": 0, "batches": batches, "epoch_batches": len(dl), "world": 1, "workers": 1})
        assert torch.equal(torch.cat([y for _, y in dl]), restored)


def test_a_missing_or_corrupt_shard_is_one_line(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "train" / "train-000003.tar").unlink()
    assert leanvit("fit", WDS, *FAST, f"data.root={broken}", "trainer.max_epochs=1", f"runs_dir={tmp_path}/runs") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("leanvit: ") and "train-000003.tar does not exist" in err[-1]
    assert "Traceback" not in "".join(err)
    shutil.rmtree(broken)
    shutil.copytree(shards, broken)
    shard = broken / "train" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:30_000])  # cut off mid-file
    assert leanvit("fit", WDS, *FAST, f"data.root={broken}", "trainer.max_epochs=1", f"runs_dir={tmp_path}/runs2") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "train-000000.tar" in err[-1] and ("cannot read shard" in err[-1] or "holds" in err[-1]), err[-3:]


def test_fit_on_shards_two_ddp_processes(shards: Path, tmp_path: Path) -> None:
    """2-process DDP on the shards: one run directory, every rank the same number of steps (none hangs at the
    epoch end), a model that learns."""
    check_success(leanvit_subprocess("fit", WDS, *FAST, f"data.root={shards}", "trainer.max_epochs=2",
                                     "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                                     "data.num_workers=1", cwd=tmp_path))
    runs = list((tmp_path / "runs" / "digits" / "dense_wds").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * (-(-1438 // 2) // 32)
    results = json.loads((runs[0] / "results_fit.json").read_text())
    assert results["val/acc1"] > 10


@pytest.mark.slow  # make test: the loader-level resume tests above and the mid-epoch kill on folders (test_long_runs)
@pytest.mark.parametrize("mode", ["single", "ddp"])
def test_preempted_mid_epoch_on_shards_resumes_exactly(mode: str, shards: Path, tmp_path: Path) -> None:
    """SIGTERM mid-epoch (2 persistent loader workers, random augmentations, a step checkpoint every 5 steps),
    then resume=auto: the same weights as the uninterrupted run (1 process, and 2-process DDP)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_long_runs import assert_same_weights, weights

    from helpers import subprocess_env

    args = [*FAST, f"data.root={shards}", "trainer.max_epochs=2", "model.mixup=0.8", "model.cutmix=1.0",
            "model.drop_path_rate=0.1", "model.ema_decay=0.9", "data.auto_augment=rand-m9-mstd0.5-inc1",
            "data.re_prob=0.25", "data.num_workers=2", "data.persistent_workers=true", "checkpoint.every_n_train_steps=5"]
    if mode == "ddp":
        args += ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    check_success(leanvit_subprocess("fit", WDS, *args, "runs_dir=reference", cwd=tmp_path))
    victim = subprocess.Popen([sys.executable, "-m", "experiments.cli", "fit", WDS, *args], cwd=tmp_path,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    run = tmp_path / "runs" / "digits" / "dense_wds" / "version_0"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        if victim.poll() is not None or time.time() > deadline:
            os.killpg(victim.pid, signal.SIGKILL)
            out, err = victim.communicate()
            pytest.fail(f"no step checkpoint appeared (exit {victim.returncode})\n{out}\n{err}", pytrace=False)
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 75, err
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 1438 // 32 // (2 if mode == "ddp" else 1), "not a mid-epoch checkpoint"
    resumed = check_success(leanvit_subprocess("fit", WDS, *args, "resume=auto", cwd=tmp_path))
    assert f"at step {step} (epoch 0)" in resumed.stdout
    assert_same_weights(weights(tmp_path / "reference" / "digits" / "dense_wds" / "version_0"), weights(run))


def test_shards_from_a_url_and_a_pipe(shards: Path) -> None:
    """Object storage goes through fsspec (its in-memory file system stands in for s3:// here: the same opener),
    `pipe:CMD` through webdataset's gopen; both stream the local shards' samples."""
    import fsspec

    from datamodules.shards import WdsDataModule

    memory = fsspec.filesystem("memory")
    for path in shards.rglob("*"):
        if path.is_file():
            memory.pipe(f"/bucket/{path.relative_to(shards)}", path.read_bytes())
    expected = None
    for root in ("memory://bucket", f"pipe:cat {shards}", str(shards)):
        dm = WdsDataModule(root=root, img_size=32, batch_size=32, num_workers=0, pin_memory=False, shuffle_buffer=64)
        dm.setup("validate")
        assert dm.shards["train"].num_samples == 1438 and dm.classes == [str(c) for c in range(10)]
        labels = torch.cat([y for _, y in dm.val_dataloader()])
        expected = labels if expected is None else expected
        assert torch.equal(labels, expected) and len(labels) == 359
    memory.rm("/bucket", recursive=True)


def test_a_mid_epoch_resume_with_other_workers_is_refused_in_one_line(shards: Path) -> None:
    from datamodules.imagenet import DataError
    from datamodules.shards import WdsDataModule

    dm = WdsDataModule(root=str(shards), img_size=32, batch_size=32, num_workers=2, pin_memory=False)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"^data\.num_workers: the checkpoint's shard stream ran with 3 loader workers, "
                                        r"this run has 2"):
        dm.train_dataloader().load_state_dict({"epoch": 0, "batches": 3, "epoch_batches": 44, "world": 1, "workers": 3})
