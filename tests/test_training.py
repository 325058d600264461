"""End to end through the CLI: a tiny fit learns, checkpoints reload, W&B offline logs, distillation
keeps its teacher frozen and out of checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from helpers import FAST, QUICKSTART, column, leanvit, metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short quickstart run, shared by the tests that read its outputs."""
    import os

    cwd = Path.cwd()
    root = tmp_path_factory.mktemp("fit")
    os.chdir(root)
    try:
        assert leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=6", "logger.wandb.enabled=true") == 0
    finally:
        os.chdir(cwd)
    return root / "runs" / "digits" / "dense" / "version_0"


def test_fit_learns_and_writes_the_run_directory(trained: Path) -> None:
    assert (trained / "config.yaml").is_file() and (trained / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "checkpoints" / "best.ckpt").is_file()
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["model"]["backbone_kwargs"] == {"depth": 2} and config["trainer"]["max_epochs"] == 6
    assert config["data"]["seed"] == config["seed"] == 0  # interpolations are resolved
    rows = metrics(trained)
    losses = column(rows, "train/loss")
    acc = column(rows, "val/acc1")
    assert len(acc) == 6
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert acc[-1] > 35 and acc[-1] > acc[0] + 15  # 10 classes: chance is 10 %
    tokens = column(rows, "tokens/layer_0")
    assert tokens and all(t == 65 for t in tokens)  # dense: 64 patches + class token everywhere
    results = json.loads((trained / "results_fit.json").read_text())
    assert results["val/acc1"] == pytest.approx(acc[-1], abs=1e-4)


def test_best_checkpoint_reloads_through_weights(trained: Path, in_tmp: Path) -> None:
    best = trained / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)  # only plain containers in the checkpoint
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert leanvit("validate", QUICKSTART, *FAST, f"model.weights={best}") == 0
    validated = json.loads(next((in_tmp / "runs" / "digits" / "dense").glob("*/results_validate.json")).read_text())
    best_acc = max(column(metrics(trained), "val/acc1"))
    assert validated["val/acc1"] == pytest.approx(best_acc, abs=1e-3)


def wandb_records(path: Path) -> Iterator[Any]:
    """Read a `.wandb` file: W&B's record log (LevelDB log framing: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_config_and_metrics(trained: Path) -> None:
    config = yaml.safe_load((trained / "config.yaml").read_text())
    run_id = config["logger"]["wandb"]["id"]
    files = list(trained.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    logged_config: dict[str, Any] = {}
    history: dict[str, list[float]] = {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            logged_config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    assert logged_config["method"] == "dense"
    assert logged_config["model"]["backbone"] == "vit_micro_patch4_32"
    assert len(history["val/acc1"]) == 6
    assert history["val/acc1"][-1] == pytest.approx(column(metrics(trained), "val/acc1")[-1], abs=1e-4)
    assert "train/loss" in history and "train/lr" in history


def test_distillation_trains_with_a_frozen_teacher_kept_out_of_checkpoints(in_tmp: Path) -> None:
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model("vit_micro_patch4_32", num_classes=10)
    torch.save(teacher.state_dict(), in_tmp / "teacher.pth")
    for mode in ("soft", "hard"):
        assert leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=1",
                       "model.teacher=vit_micro_patch4_32", f"model.teacher_weights={in_tmp / 'teacher.pth'}",
                       f"model.distillation={mode}", f"experiment=distill_{mode}") == 0
        run = in_tmp / "runs" / f"distill_{mode}" / "version_0"
        rows = metrics(run)
        assert column(rows, "train/loss_distill") and column(rows, "train/loss_cls")
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    module_cls = __import__("lightning_modules").METHODS["dense"]
    module = module_cls.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.teacher is None  # built for training only
    module.setup("fit")
    assert module.teacher is not None and not module.teacher.training
    for name, value in module.teacher.state_dict().items():  # rebuilt from its config, not trained
        assert torch.equal(value, teacher.state_dict()[name])


def test_ema_tracks_the_student_and_is_evaluated(in_tmp: Path) -> None:
    module_cls = __import__("lightning_modules").METHODS["dense"]
    module = module_cls(backbone="vit_micro_patch4_32", num_classes=10, backbone_kwargs={"depth": 1}, ema_decay=0.75)
    ema_before = {k: v.clone() for k, v in module.student_ema.module.state_dict().items()}
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    module.optimizer_step(0, 0, torch.optim.SGD(module.student.parameters(), lr=0.0), None)  # EMA after each step
    for name, value in module.student_ema.module.state_dict().items():
        if value.is_floating_point():
            expected = 0.75 * ema_before[name] + 0.25 * module.student.state_dict()[name]
            torch.testing.assert_close(value, expected)
    assert leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=1", "trainer.limit_train_batches=5",
                   "model.ema_decay=0.9") == 0
    rows = metrics(in_tmp / "runs" / "digits" / "dense" / "version_0")
    assert column(rows, "val/ema_acc1")
