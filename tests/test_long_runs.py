"""Long runs on shared clusters: step checkpoints and an exact mid-epoch resume (SIGKILL, SIGTERM, 1 process and
2-process DDP), resume=auto, the non-finite-loss guard and checkpoint write failures. The CLI runs in
subprocesses where a process is killed or DDP is used."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from callbacks.checkpointing import AtomicCheckpointIO, NonFiniteCheckpointError

from helpers import (
    DDP,
    FAST,
    QUICKSTART,
    RANDOM,
    STEPS_PER_EPOCH,
    assert_same_weights,
    check_success,
    leanvit,
    leanvit_subprocess,
    subprocess_env,
    weights,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference runs, on 1 process and on 2-process DDP."""
    root = tmp_path_factory.mktemp("reference")
    check_success(leanvit_subprocess("fit", QUICKSTART, *RANDOM, "runs_dir=single", cwd=root))
    check_success(leanvit_subprocess("fit", QUICKSTART, *RANDOM, *DDP, "runs_dir=ddp", cwd=root))
    return {"single": root / "single" / "digits" / "dense" / "version_0",
            "ddp": root / "ddp" / "digits" / "dense" / "version_0"}


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_ranks() -> Any:
    """Whatever a test leaves running (a hung rank after a failure) is killed with its process group."""
    yield
    while STARTED:
        victim = STARTED.pop()
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.communicate()


def start(cwd: Path, *args: str) -> subprocess.Popen:
    STARTED.append(subprocess.Popen([sys.executable, "-m", "experiments.cli", "fit", QUICKSTART, *args], cwd=cwd,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True))  # its own process group: the DDP ranks die together
    return STARTED[-1]


def wait_for_step_checkpoint(victim: subprocess.Popen, last: Path, timeout: float = 300) -> None:
    """Until a mid-epoch last.ckpt exists (the first step checkpoint of epoch 0)."""
    deadline = time.time() + timeout
    while not last.exists():
        if victim.poll() is not None or time.time() > deadline:
            out, err = victim.communicate()
            pytest.fail(f"no step checkpoint appeared (exit {victim.returncode})\n{out}\n{err}", pytrace=False)
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["single", pytest.param("ddp", marks=pytest.mark.slow)])  # DDP: SIGTERM below
def test_killed_mid_epoch_resumes_exactly(mode: str, tmp_path: Path, uninterrupted: dict[str, Path]) -> None:
    args = [*RANDOM, *(DDP if mode == "ddp" else [])]
    victim = start(tmp_path, *args)
    run = tmp_path / "runs" / "digits" / "dense" / "version_0"
    wait_for_step_checkpoint(victim, run / "checkpoints" / "last.ckpt")
    os.killpg(victim.pid, signal.SIGKILL)  # no chance to clean up, every rank at once (a node lost)
    victim.communicate()
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < STEPS_PER_EPOCH, "not a mid-epoch checkpoint"
    resumed = check_success(leanvit_subprocess("fit", QUICKSTART, *args, "resume=auto", cwd=tmp_path))
    assert f"at step {step} (epoch 0)" in resumed.stdout
    assert not (run.parent / "version_1").exists()
    assert_same_weights(weights(uninterrupted[mode]), weights(run))


# single: the SIGKILL test above resumes a single process mid-epoch exactly; make test keeps DDP's SIGTERM (rank 0 only
# gets the signal), the harder case
@pytest.mark.parametrize("mode", [pytest.param("single", marks=pytest.mark.slow), "ddp"])
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(mode: str, tmp_path: Path,
                                                                       uninterrupted: dict[str, Path]) -> None:
    args = [*RANDOM, *(DDP if mode == "ddp" else [])]
    victim = start(tmp_path, *args)
    run = tmp_path / "runs" / "digits" / "dense" / "version_0"
    wait_for_step_checkpoint(victim, run / "checkpoints" / "last.ckpt")
    victim.send_signal(signal.SIGTERM)  # a scheduler preempting the job (DDP: only rank 0 gets it)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 75, err  # EX_TEMPFAIL: run me again
    lines = [line for line in err.splitlines() if line.startswith("leanvit:")]
    assert len(lines) == 1 and "preempted by SIGTERM: stopped at step" in lines[0] and "Traceback" not in err
    stopped = int(lines[0].split("stopped at step ")[1].split()[0])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == stopped and 0 < stopped < STEPS_PER_EPOCH  # the checkpoint is at that step
    resumed = check_success(leanvit_subprocess("fit", QUICKSTART, *args, "resume=auto", cwd=tmp_path))
    assert f"at step {stopped} (epoch 0)" in resumed.stdout
    assert_same_weights(weights(uninterrupted[mode]), weights(run))


def test_resume_auto_starts_a_run_then_continues_it(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    short = [*FAST, "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
    assert leanvit("fit", QUICKSTART, *short, "trainer.max_epochs=1", "resume=auto") == 0
    assert "resuming" not in capsys.readouterr().out
    assert leanvit("fit", QUICKSTART, *short, "trainer.max_epochs=2", "resume=auto") == 0
    assert "resuming" in capsys.readouterr().out
    runs = sorted(p.name for p in (in_tmp / "runs" / "digits" / "dense").iterdir())
    assert runs == ["version_0"]
    assert torch.load(in_tmp / "runs" / "digits" / "dense" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)["epoch"] == 1


def nan_at(step: int) -> Any:
    from lightning_modules import METHODS

    original = METHODS["dense"].loss_terms

    def loss_terms(self: Any, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = original(self, images, targets)
        if self.global_step == step:
            terms["cls"] = terms["cls"] * float("nan")
        return terms

    return loss_terms


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_good_checkpoints(
        in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_modules import METHODS

    limit = 8
    monkeypatch.setattr(METHODS["dense"], "loss_terms", nan_at(limit + 3))  # epoch 1, after a step checkpoint
    status = leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=3", f"trainer.limit_train_batches={limit}",
                     "trainer.limit_val_batches=2", "checkpoint.every_n_train_steps=2")
    assert status == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"non-finite loss at step {limit + 3} (epoch 1, batch 4)" in err[0]
    assert "loss_cls=nan" in err[0]
    run = in_tmp / "runs" / "digits" / "dense" / "version_0" / "checkpoints"
    last = torch.load(run / "last.ckpt", weights_only=True)
    assert last["global_step"] == limit + 2  # the last step checkpoint before the NaN
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert torch.load(run / "best.ckpt", weights_only=True)["epoch"] == 0


def test_weights_with_nan_never_replace_a_checkpoint(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(NonFiniteCheckpointError, match="non-finite weights in w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 0.0])}, "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_resume_reports_the_lost_work(tmp_path: Path) -> None:
    from callbacks.preemption import lost_work

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    written = ckpt.stat().st_mtime
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps({"global_step": 130, "epoch": 3, "time": written + 150}))
    assert lost_work(progress, {"global_step": 100}, ckpt) == (30, pytest.approx(2.5))
    assert lost_work(tmp_path / "missing.json", {"global_step": 100}, ckpt) is None


def test_resume_auto_in_a_job_continues_that_jobs_run_only(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = [*FAST, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    runs = in_tmp / "runs" / "digits" / "dense"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert leanvit("fit", QUICKSTART, *short, "trainer.max_epochs=1", "resume=auto") == 0
    monkeypatch.setenv("SLURM_JOB_ID", "124")  # another job of the same experiment starts its own run
    assert leanvit("fit", QUICKSTART, *short, "trainer.max_epochs=1", "resume=auto") == 0
    assert torch.load(runs / "job_124" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    monkeypatch.setenv("SLURM_JOB_ID", "123")  # job 123 requeued: it continues job_123, not the newer job_124
    assert leanvit("fit", QUICKSTART, *short, "trainer.max_epochs=2", "resume=auto") == 0
    assert torch.load(runs / "job_123" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load(runs / "job_124" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in runs.iterdir()) == ["job_123", "job_124"]


def signal_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """As if SIGTERM arrived right after optimiser step `step` (the flag the signal handler sets)."""
    import callbacks.preemption as preemption
    from lightning_modules import METHODS

    original = METHODS["dense"].optimizer_step

    def optimizer_step(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.global_step == step:
            preemption._received[0] = signal.SIGTERM

    monkeypatch.setattr(METHODS["dense"], "optimizer_step", optimizer_step)


def test_preempted_at_an_epochs_last_batch_then_mid_epoch_resumes_exactly(in_tmp: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug: a checkpoint taken after an epoch's last batch (before its validation) made Lightning skip the
    next epoch's start bookkeeping, so a later mid-epoch checkpoint of that epoch resumed at its first batch."""
    batches = 8
    args = [*FAST, "trainer.max_epochs=3", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=2",
            "checkpoint.every_n_train_steps=3", "model.mixup=0.8", "model.cutmix=1.0", "model.drop_path_rate=0.1"]
    assert leanvit("fit", QUICKSTART, *args, "version=reference") == 0
    runs = in_tmp / "runs" / "digits" / "dense"
    for stop in (batches - 1, batches + 1):  # flagged at the last batch of epoch 0, then at batch 2 of epoch 1
        with monkeypatch.context() as patch:
            signal_after_step(patch, stop)
            assert leanvit("fit", QUICKSTART, *args, "version=preempted", "resume=auto") == 75
    assert torch.load(runs / "preempted" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == batches + 2
    assert leanvit("fit", QUICKSTART, *args, "version=preempted", "resume=auto") == 0
    reference, preempted = weights(runs / "reference"), weights(runs / "preempted")
    assert all(torch.equal(reference[k], preempted[k]) for k in reference)
