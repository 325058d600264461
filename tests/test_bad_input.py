"""Bad input costs one clear line (exit status 2), never a traceback, and never an earlier run.

One table per class of mistake a user makes - data, values the methods or the trainer cannot run with, devices,
the file system, the logger, weights, checkpoints, runs that exist. Every case runs the CLI, expects status 2 and
exactly one `leanvit: error:` line that names the key, file or value, and checks that the run made earlier in
the same folder is byte-identical afterwards and that no new run directory was left behind.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FAST, QUICKSTART, REPO, leanvit, leanvit_subprocess

BASE = REPO / "experiments" / "_base" / "default.yaml"
RUN = Path("runs") / "digits" / "dense" / "version_0"  # the earlier run every case must leave as it was
LIMITS = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2"]


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def image_tree(root: Path, splits: tuple[str, ...] = ("train", "val"), classes: int = 2, per_class: int = 4) -> Path:
    for split in splits:
        for c in range(classes):
            for i in range(per_class):
                write_png(root / split / f"c{c}" / f"{i}.png", 10 * c + i)
    return root


FOLDER_YAML = f"""defaults: [{BASE}]
method: dense
datamodule: imagenet
model: {{backbone: vit_micro_patch4_32, num_classes: 3, backbone_kwargs: {{depth: 1}}}}
data: {{root: folder, img_size: 32, batch_size: 2, num_workers: 0}}
trainer: {{precision: 32-true, enable_progress_bar: false, enable_model_summary: false, num_sanity_val_steps: 0}}
"""


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash and every folder (an empty run directory left behind counts)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with an earlier two-epoch run, an ImageNet-layout image tree and its YAML, and bad data trees."""
    import os

    root = tmp_path_factory.mktemp("bad_input")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                       "trainer.limit_val_batches=2") == 0
    finally:
        os.chdir(cwd)
    image_tree(root / "folder", classes=3)
    (root / "folder.yaml").write_text(FOLDER_YAML)
    image_tree(root / "no_val", splits=("train",))
    image_tree(root / "empty_class")
    (root / "empty_class" / "train" / "c2").mkdir()
    image_tree(root / "corrupt")
    for i, image in enumerate(sorted((root / "corrupt" / "train").glob("*/*.png"))):  # the first batch fails
        image.write_bytes(b"" if i % 2 else b"\x89PNG\r\n\x1a\n broken")  # zero bytes, or a cut-off PNG
    (root / "a_file").write_text("not a folder")
    torch.save(torch.nn.Linear(2, 2).state_dict(), root / "other_model.pth")
    return root


# (id, command line, the error line must match this)
CASES = [
    # --- data: found when the data set is read, before any work
    ("data root missing", ["fit", "folder.yaml", "data.root=nowhere"], r"data\.root: nowhere does not exist: expected"),
    ("train without val", ["fit", "folder.yaml", "data.root=no_val"], r"no_val/val does not exist"),
    ("empty class folder", ["fit", "folder.yaml", "data.root=empty_class"], r"class folder .*c2 holds no images"),
    ("corrupt image in a worker", ["fit", "folder.yaml", "data.root=corrupt", "data.num_workers=1", *LIMITS],
     r"data: cannot read image corrupt/train/c\d/\d\.png: .*data\.skip_unreadable=true"),
    ("batch size 0", ["fit", QUICKSTART, "data.batch_size=0"], r"data\.batch_size: expected a positive number .* got 0"),
    ("batch size negative", ["fit", QUICKSTART, "data.batch_size=-4"], r"data\.batch_size: .* got -4"),
    ("batch larger than the training set", ["fit", "folder.yaml", "data.batch_size=64"],
     r"data\.batch_size: 64 is more than the 12 training samples .*use data\.batch_size <= 12"),
    ("fewer classes than the data", ["fit", "folder.yaml", "model.num_classes=2"],
     r"model\.num_classes: 2, but the data has 3 classes"),
    ("data and model image sizes differ", ["fit", QUICKSTART, "data.img_size=48"],
     r"data\.img_size: 48 px images for a model built for 32 px"),
    ("re_prob outside [0, 1]", ["fit", QUICKSTART, "data.re_prob=1.5"], r"data\.re_prob: expected a probability"),
    # --- values a method or the trainer cannot run with
    ("ToMe r negative", ["fit", QUICKSTART, "method=tome", "model.r=-2"], r"model\.r: expected .* >= 0, got -2"),
    ("A-ViT eps outside (0, 1)", ["fit", QUICKSTART, "method=avit", "model.eps=1.5"], r"model\.eps: expected a value in \(0, 1\)"),
    ("patch size does not divide img_size", ["fit", QUICKSTART, "model.img_size=30", "data.img_size=30"],
     r"model\.img_size: 30 is not a multiple of vit_micro_patch4_32's patch size 4"),
    ("num_classes 1", ["fit", QUICKSTART, "model.num_classes=1"], r"model\.num_classes: expected 2 classes or more"),
    ("ema_decay above 1", ["fit", QUICKSTART, "model.ema_decay=1.5"], r"model\.ema_decay: expected a decay in \(0, 1\)"),
    ("max_epochs negative", ["fit", QUICKSTART, "trainer.max_epochs=-3"], r"trainer: `max_epochs` must be .* -3"),
    ("checkpoint monitor that is not logged", ["fit", QUICKSTART, "checkpoint.monitor=val/nope", *LIMITS],
     r"checkpoint\.monitor: 'val/nope' is not a metric this run logs; logged: .*val/acc1"),
    ("benchmark precision fp8", ["benchmark", QUICKSTART, "precision=fp8"], r"precision: expected one of 32, .* got 'fp8'"),
    # --- files and runs
    ("runs_dir under a file", ["fit", QUICKSTART, "runs_dir=a_file/runs"], r"runs_dir: cannot create or write .*a_file/runs"),
    ("fit into an existing version", ["fit", QUICKSTART, "version=version_0"],
     r"version: runs/digits/dense/version_0 holds a run already .*resume=runs/digits/dense/version_0"),
    ("resume with another method", ["fit", QUICKSTART, "method=tome", f"resume={RUN}"],
     r"resume: runs/digits/dense/version_0 trained another model \(method 'dense' -> 'tome'\)"),
    ("resume with another architecture", ["fit", QUICKSTART, "model.backbone_kwargs.depth=3", "resume=last"],
     r"trained another model \(model\.backbone_kwargs\.depth 2 -> 3\)"),
    ("resume a truncated checkpoint", ["fit", QUICKSTART, "resume=truncated.ckpt"],
     r"resume: cannot read truncated\.ckpt \(truncated or not a checkpoint"),
    ("resume a missing checkpoint", ["fit", QUICKSTART, "resume=missing.ckpt"], r"resume: no such checkpoint 'missing\.ckpt'"),
    ("validate resume=auto", ["validate", QUICKSTART, "resume=auto"], r"resume=auto: only for fit"),
    ("validate a run as another architecture", ["validate", QUICKSTART, "model.backbone_kwargs.depth=3", f"resume={RUN}"],
     r"resume: runs/digits/dense/version_0 trained another model \(model\.backbone_kwargs\.depth 2 -> 3\)"),
    ("weights of another model", ["validate", QUICKSTART, "model.weights=other_model.pth", "model.pretrained=true"],
     r"weights: 'other_model\.pth' does not match the model"),
]


def run_case(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    status = leanvit(*args[:2], *FAST, *args[2:])  # an uncaught exception (a traceback) fails the test here
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("leanvit: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_costs_nothing(case: tuple[str, list[str], str], workdir: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    name, args, pattern = case
    monkeypatch.chdir(workdir)
    if "truncated" in name:
        (workdir / "truncated.ckpt").write_bytes((workdir / RUN / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    before = snapshot(workdir / "runs")
    line = run_case(args, capsys)
    assert re.search(pattern, line), line
    assert snapshot(workdir / "runs") == before  # the earlier run is untouched, and no run directory was left


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("args, pattern", [
    (["fit", QUICKSTART, "trainer.accelerator=gpu"], r"trainer\.accelerator: gpu, but torch sees no GPU"),
    (["benchmark", QUICKSTART, "device=cuda", "batch_sizes=[1]"], r"device: cuda, but torch sees no GPU"),
], ids=["trainer gpu", "benchmark cuda"])
def test_a_device_that_is_not_there(args: list[str], pattern: str, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    before = snapshot(workdir / "runs")
    assert re.search(pattern, run_case(args, capsys))
    assert snapshot(workdir / "runs") == before


def test_wandb_without_an_api_key(workdir: Path, tmp_path: Path) -> None:
    """In a fresh process: W&B keeps its settings for the life of a process."""
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb")}
    before = snapshot(workdir / "runs")
    done = leanvit_subprocess("fit", QUICKSTART, *FAST, "logger.wandb.enabled=true", cwd=workdir, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("leanvit: error:")]
    assert len(errors) == 1 and "logger.wandb:" in errors[0] and "WANDB_MODE=offline" in errors[0], done.stderr
    assert snapshot(workdir / "runs") == before


def test_torchrun_without_a_rendezvous_id(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Two torchrun launches without --rdzv-id would share runs/<exp>/job_none; the second replaced the first."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert "--rdzv-id" in run_case(["fit", QUICKSTART], capsys)
    assert not (workdir / "runs" / "digits" / "dense" / "job_none").exists()


def test_offline_hub_weights_name_the_model_and_the_way_out(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "empty_cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(workdir / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = run_case(["validate", "deit_tiny/dense.yaml", "data.batch_size=2"], capsys)
    assert "model.pretrained: the weights of deit_tiny_patch16_224" in line and "model.weights=FILE" in line, line


def test_a_worker_error_in_a_fresh_process_prints_one_line(workdir: Path) -> None:
    """The same corrupt image through the real command line: stderr holds the line and no traceback."""
    done = leanvit_subprocess("fit", "folder.yaml", "data.root=corrupt", "data.num_workers=1", *LIMITS, cwd=workdir)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "cannot read image corrupt/train/c" in done.stderr, done.stderr
    assert not (workdir / "runs" / "folder").exists()


def test_resuming_a_finished_run_changes_nothing(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    before = snapshot(workdir / "runs")
    assert leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=2", "resume=last") == 0
    assert "had finished" in capsys.readouterr().out
    assert snapshot(workdir / "runs") == before


def test_last_checkpoint_holds_the_current_best(workdir: Path) -> None:
    """last.ckpt carries the best-checkpoint tracker: written after it, it must hold this epoch's best."""
    ckpts = workdir / RUN / "checkpoints"
    last, best = (torch.load(ckpts / f"{n}.ckpt", weights_only=True) for n in ("last", "best"))
    tracker = next(v for k, v in last["callbacks"].items() if "'monitor': 'val/acc1'" in k)
    best_tracker = next(v for k, v in best["callbacks"].items() if "'monitor': 'val/acc1'" in k)
    assert tracker["best_model_path"].endswith("best.ckpt")
    assert float(tracker["best_model_score"]) == float(best_tracker["current_score"])


def test_validate_resume_evaluates_the_runs_checkpoint(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    before = snapshot(workdir / RUN)
    assert leanvit("validate", QUICKSTART, *FAST, f"resume={RUN}", "version=validated",
                   "trainer.limit_val_batches=2") == 0
    assert f"evaluating {RUN}/checkpoints/last.ckpt" in capsys.readouterr().out
    got = json.loads((workdir / RUN.parent / "validated" / "results_validate.json").read_text())
    trained = json.loads((workdir / RUN / "results_fit.json").read_text())
    assert got["val/acc1"] == pytest.approx(trained["val/acc1"], abs=1e-4)  # the trained model, not a random one
    assert snapshot(workdir / RUN) == before


def test_resume_with_a_changed_key_keeps_the_config_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [QUICKSTART, *FAST, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    assert leanvit("fit", *args, "trainer.max_epochs=1") == 0
    run = tmp_path / RUN
    first = (run / "config.yaml").read_text()
    assert leanvit("fit", *args, "trainer.max_epochs=2", "resume=last") == 0
    assert (run / "config_history" / "1.yaml").read_text() == first
    assert "max_epochs: 2" in (run / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------------ images
def test_every_image_mode_loads_as_the_rgb_it_shows(tmp_path: Path) -> None:
    from datamodules.imagenet import load_rgb

    ramp16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024 + 512)  # 16-bit grey levels 512..65024
    Image.fromarray(ramp16).save(tmp_path / "grey16.png")
    got = np.asarray(load_rgb(tmp_path / "grey16.png")).astype(int)
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp16.astype(float) * 255 / 65535).astype(int))  # rescaled, not clipped
    assert len(np.unique(got)) == 64

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under full transparency ...
    rgba[:2, :, 3] = 255  # ... shown in the top half only
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert (got[:2] == [200, 0, 0]).all() and (got[2:] == 255).all()  # transparent -> white background

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "palette.png"))[0], [[0, 0, 255], [0, 255, 0]])

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(np.asarray(load_rgb(tmp_path / "cmyk.jpg")).astype(int) - [255, 0, 0]).max() < 8

    grey = Image.fromarray(np.full((4, 4), 77, dtype=np.uint8), "L")
    grey.save(tmp_path / "grey.png")
    assert (np.asarray(load_rgb(tmp_path / "grey.png")) == 77).all()

