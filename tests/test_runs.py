"""Runs that must survive the real world: a killed run resumes exactly, DDP on 2 processes, checkpoints
that a kill cannot corrupt. These start the CLI as subprocesses (DDP must never launch inside pytest)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import FAST, QUICKSTART, REPO, check_success, leanvit_subprocess, subprocess_env

# Everything that draws random numbers: mixup/cutmix, DropPath, RandAugment, random erasing, EMA.
RANDOM = ["trainer.max_epochs=3", "model.mixup=0.8", "model.cutmix=1.0", "model.drop_path_rate=0.1",
          "model.ema_decay=0.9", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25",
          "data.num_workers=1", "data.persistent_workers=true", "data.repeated_aug=3"]


def student_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.slow  # the mid-epoch kill tests (test_long_runs.py) cover it in make test
def test_killed_run_resumes_exactly(tmp_path: Path) -> None:
    check_success(leanvit_subprocess("fit", QUICKSTART, *FAST, *RANDOM, "runs_dir=uninterrupted", cwd=tmp_path))

    env = subprocess_env()
    args = [sys.executable, "-m", "experiments.cli", "fit", QUICKSTART, *FAST, *RANDOM, "runs_dir=killed",
            "logger.wandb.enabled=true"]
    victim = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "digits" / "dense" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # no chance to clean up: the run is cut after its first checkpoint
    victim.wait()
    assert last.exists()
    assert torch.load(last, weights_only=True)["epoch"] < 2, "killed too late to test a resume"

    resumed = leanvit_subprocess("fit", QUICKSTART, *FAST, *RANDOM, "runs_dir=killed", "logger.wandb.enabled=true",
                                 "resume=last", cwd=tmp_path)
    check_success(resumed)
    assert "resuming" in resumed.stdout
    run = tmp_path / "killed" / "digits" / "dense" / "version_0"
    assert not (tmp_path / "killed" / "digits" / "dense" / "version_1").exists()  # the same run directory

    expected = student_state(tmp_path / "uninterrupted" / "digits" / "dense" / "version_0" / "checkpoints" / "last.ckpt")
    got = student_state(run / "checkpoints" / "last.ckpt")
    assert expected.keys() == got.keys() and any(k.startswith("student_ema.") for k in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    a = json.loads((tmp_path / "uninterrupted" / "digits" / "dense" / "version_0" / "results_fit.json").read_text())
    b = json.loads((run / "results_fit.json").read_text())
    assert a["val/acc1"] == b["val/acc1"] and a["val/loss"] == b["val/loss"]
    # the same W&B run: both attempts wrote to one run id
    ids = {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")}
    assert len(list(run.glob("wandb/offline-run-*"))) == 2 and len(ids) == 1


@pytest.mark.slow  # the DDP matrix (test_ddp_matrix.py) covers it, for every method, in make test
def test_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    check_success(leanvit_subprocess("fit", QUICKSTART, *FAST, "trainer.max_epochs=2", "trainer.accelerator=cpu",
                                     "trainer.devices=2", "trainer.strategy=ddp", cwd=tmp_path))
    runs = list((tmp_path / "runs" / "digits" / "dense").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # both ranks agreed on one run directory
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * (1438 // 2 // 32)  # each rank saw half of the 1,438 training images
    results = json.loads((runs[0] / "results_fit.json").read_text())
    assert results["val/acc1"] > 10


WRITER = """
import sys, torch
from callbacks.checkpointing import AtomicCheckpointIO
io, k = AtomicCheckpointIO(), 0
while True:
    io.save_checkpoint({"k": k, "w": torch.full((8_000_000,), float(k))}, sys.argv[1])
    print(k, flush=True)
    k += 1
"""


def test_a_kill_during_a_checkpoint_write_never_corrupts_it(tmp_path: Path) -> None:
    """Writers (started together: their imports share the cores) are each killed at another point after their first
    complete checkpoint; every file left is a complete checkpoint."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    delays = (0.0, 0.029, 0.071)
    paths = [tmp_path / f"last_{i}.ckpt" for i in range(len(delays))]
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
               for path in paths]
    for writer, delay, path in zip(writers, delays, paths):
        assert writer.stdout is not None
        writer.stdout.readline()  # one complete checkpoint exists
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["w"].numel() == 8_000_000 and bool((ckpt["w"] == ckpt["k"]).all())
