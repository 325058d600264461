"""The kill soak (`make test-slow`): a multi-epoch run with step checkpoints is killed again and again at random
moments - SIGKILL and SIGTERM in turn - and restarted each time with the same command and `resume=auto`, until it
finishes. Every resume must find a loadable checkpoint, lose at most one checkpoint interval, and the final
weights must equal an uninterrupted run's bit for bit."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (
    QUICKSTART,
    RANDOM,
    STEPS_PER_EPOCH,
    assert_same_weights,
    check_success,
    leanvit_subprocess,
    subprocess_env,
    weights,
)

INTERVAL, EPOCHS = 4, 4
SOAK = [*RANDOM, f"trainer.max_epochs={EPOCHS}", f"checkpoint.every_n_train_steps={INTERVAL}",
        "checkpoint.progress_interval=0"]


@pytest.mark.slow
def test_kill_soak(tmp_path: Path) -> None:
    check_success(leanvit_subprocess("fit", QUICKSTART, *SOAK, "runs_dir=reference", cwd=tmp_path))
    experiment = tmp_path / "runs" / "digits" / "dense"

    def current_run() -> Path:  # a run killed before its first checkpoint is left behind; the next starts anew
        return max(experiment.iterdir(), key=lambda p: p.stat().st_mtime)

    rng = random.Random(0)
    stats = {"kills": 0, "resumes": 0, "corrupt": 0, "max_lost_steps": 0}
    for attempt in range(40):
        victim = subprocess.Popen([sys.executable, "-m", "experiments.cli", "fit", QUICKSTART, *SOAK, "resume=auto"],
                                  cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        try:
            out, err = victim.communicate(timeout=rng.uniform(8, 20))
        except subprocess.TimeoutExpired:
            kill = signal.SIGKILL if stats["kills"] % 2 == 0 else signal.SIGTERM
            run = current_run()
            progress = run / "progress.json"
            if kill == signal.SIGKILL:
                os.killpg(victim.pid, kill)
            else:
                victim.send_signal(kill)
            out, err = victim.communicate(timeout=300)
            stats["kills"] += 1
            last = run / "checkpoints" / "last.ckpt"
            if not last.exists():
                continue  # killed before its first checkpoint: nothing to resume, nothing lost but start-up
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:
                stats["corrupt"] += 1
                continue
            if kill == signal.SIGKILL:
                if progress.is_file():
                    lost = json.loads(progress.read_text())["global_step"] - step
                    stats["max_lost_steps"] = max(stats["max_lost_steps"], lost)
            elif step < EPOCHS * STEPS_PER_EPOCH:  # stopped at a step with a checkpoint; after the last step a
                assert victim.returncode == 75, err  # SIGTERM in the final clean-up just ends the finished run
            continue
        check_success(subprocess.CompletedProcess(victim.args, victim.returncode, out, err))
        stats["resumes"] = attempt
        break
    print(f"soak: {stats}")
    assert stats["kills"] >= 3 and stats["corrupt"] == 0 and stats["max_lost_steps"] <= INTERVAL
    assert_same_weights(weights(tmp_path / "reference" / "digits" / "dense" / "version_0"), weights(current_run()))
