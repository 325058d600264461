"""The DDP matrix: every method fits 2 short epochs on 2 CPU processes (gloo) with its recipe's training
features on - a teacher where the recipe has one, EMA, mixup/cutmix, repeated augmentation, the keep-rate
schedule - and ends with one run directory, ranks that loaded disjoint samples, and validation metrics equal
to a single-process `validate` of the saved checkpoint. The CLI runs in subprocesses (never DDP in pytest)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from helpers import FAST, QUICKSTART, REPO, check_success, leanvit, leanvit_subprocess

EPOCHS, BATCHES, BATCH = 2, 4, 16
COMMON = [*FAST, f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}", "trainer.accelerator=cpu",
          "model.mixup=0.8", "model.cutmix=1.0", "model.ema_decay=0.99", "data.repeated_aug=3",
          f"data.batch_size={BATCH}"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
# Each method with what its recipe trains with (at micro scale); {weights}/{teacher}: see the fixture.
RECIPES = {
    "dense": ["model.teacher=vit_micro_patch4_32", "model.teacher_weights={teacher}", "model.distillation=hard"],
    "tome": ["method=tome", "model.r=4"],
    "evit": ["method=evit", "model.keep_rate=0.5", "model.reduction_layers=[1]",
             "model.reduction_schedule={start_epoch: 0, shrink_epochs: 1}"],
    "dynamicvit": ["method=dynamicvit", "model.keep_rate=0.6", "model.reduction_layers=[1]", "model.weights={weights}",
                   "model.backbone_freeze_epochs=1"],
    "avit": ["method=avit", "model.gate_center=3.0", "model.reduction_schedule={start_epoch: 0, shrink_epochs: 1}"],
}




def recipe_args(method: str) -> list[str]:
    """The method's arguments: its recipe above, else its `demo_settings` (a method gets a DDP run by registering)."""
    if method in RECIPES:
        return RECIPES[method]
    from lightning_modules import METHODS

    return [f"method={method}", *(f"model.{k}={v}" for k, v in METHODS[method].demo_settings.items())]


# `make test` runs these (a teacher with distillation, EMA and mixup; a teacher and a frozen backbone; the reduction
# schedule); every other method, with its recipe or its `demo_settings`, runs with `make test-slow`.
IN_MAKE_TEST = ("dense", "dynamicvit", "avit")


def all_methods() -> list[Any]:
    from lightning_modules import METHODS

    return [m if m in IN_MAKE_TEST else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


@pytest.fixture(scope="module")
def dense_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{weights}: a dense micro ViT of the student's depth; {teacher}: the named teacher as timm builds it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    files = {"weights": folder / "micro.pth", "teacher": folder / "teacher.pth"}
    torch.save(timm.create_model("vit_micro_patch4_32", num_classes=10, depth=2).state_dict(), files["weights"])
    torch.save(timm.create_model("vit_micro_patch4_32", num_classes=10).state_dict(), files["teacher"])
    return files


def loaded_samples(log_dir: Path) -> dict[int, set[tuple[int, int, int]]]:
    """rank -> the (epoch, index, copy) keys it loaded (tests/sample_probe.py)."""
    by_rank: dict[int, set[tuple[int, int, int]]] = defaultdict(set)
    for path in log_dir.glob("*.txt"):
        for line in path.read_text().splitlines():
            rank, epoch, index, copy = map(int, line.split())
            by_rank[rank].add((epoch, index, copy))
    return by_rank


@pytest.mark.parametrize("method", all_methods())
def test_ddp_fit_matches_single_process_validation(method: str, tmp_path: Path, dense_weights: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = [a.replace("{weights}", str(dense_weights["weights"])).replace("{teacher}", str(dense_weights["teacher"]))
              for a in recipe_args(method)]
    log_dir = tmp_path / "samples"
    log_dir.mkdir()
    # a named version: the rank rank 0 launches must not take the directory rank 0 just created for an earlier run
    named = ["version=named"] if method == "dense" else []
    fit = leanvit_subprocess("fit", QUICKSTART, *COMMON, *DDP, *recipe, *named, f"experiment={method}", cwd=tmp_path,
                             script=REPO / "tests" / "sample_probe.py", env={"LEANVIT_SAMPLE_LOG": str(log_dir)})
    check_success(fit)
    runs = sorted((tmp_path / "runs" / method).iterdir())
    assert [r.name for r in runs] == ["named" if named else "version_0"]  # both ranks agreed on one run directory
    run = runs[0]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == EPOCHS * BATCHES
    assert any(k.startswith("student_ema.") for k in ckpt["state_dict"])

    samples = loaded_samples(log_dir)
    assert sorted(samples) == [0, 1]
    assert not samples[0] & samples[1]  # no (epoch, image, copy) was loaded by both ranks
    for keys in samples.values():
        for epoch in range(EPOCHS):
            assert len({k for k in keys if k[0] == epoch}) >= BATCHES * BATCH
    copies = defaultdict(set)  # repeated augmentation: an image's copies, on either rank, are distinct views
    for keys in samples.values():
        for epoch, index, copy in keys:
            copies[(epoch, index)].add(copy)
    assert max(len(c) for c in copies.values()) > 1

    fitted = json.loads((run / "results_fit.json").read_text())
    monkeypatch.chdir(tmp_path)  # single-process validation runs in this process (no DDP here)
    assert leanvit("validate", QUICKSTART, *COMMON, *recipe, f"experiment={method}_single",
                   f"model.weights={run / 'checkpoints' / 'last.ckpt'}") == 0
    single = json.loads(next((tmp_path / "runs" / f"{method}_single").glob("*/results_validate.json")).read_text())
    # every validation image counted once on one of the ranks: the gathered metrics are the single-process ones
    assert fitted["val/acc1"] == pytest.approx(single["val/acc1"], abs=1e-6)
    assert fitted["val/acc5"] == pytest.approx(single["val/acc5"], abs=1e-6)
    assert fitted["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
