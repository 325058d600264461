"""`make gpu-check`: the one script a short GPU loan runs, proven here on the CPU (DEVICE=cpu): its time box
stops the grid and says what it left out, its results land in the results folder, and it refuses a GPU run
without a GPU in one line."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from experiments import gpu_check
from lightning_modules import METHODS

from helpers import REPO, check_success, subprocess_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_run_without_a_gpu_is_one_line(capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "torch sees no GPU here; `make gpu-check DEVICE=cpu`" in capsys.readouterr().err


def test_the_time_box_stops_the_grid_and_names_what_it_left(tmp_path: Path) -> None:
    """A 1-second box: the first entry (already started) is measured, every later one is listed as not measured,
    in the JSON and under the table; nothing is written to BENCHMARKS.md on the CPU."""
    before = (REPO / "BENCHMARKS.md").read_text()
    assert gpu_check.main(["--device", "cpu", "--skip-tests", "--skip-profile", "--skip-export", "--budget", "1",
                           "--results", str(tmp_path), "--repeats", "1", "--warmup", "0"]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    entries = len(gpu_check.cpu_entries()[0][1]) * len(gpu_check.CPU_BATCHES)
    assert 1 <= len(summary["rows"]) < entries
    assert len(summary["rows"]) + len(summary["not_measured"]) == entries
    assert summary["rows"][0]["method"] == "dense" and summary["rows"][0]["images_per_sec"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| dense | vit_micro_patch4_32 | 1 |" in table and "not measured within the time box" in table
    assert (REPO / "BENCHMARKS.md").read_text() == before


def test_export_checks_round_trip_and_refuse_avit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loan's export step (here on the CPU, ONNX in the CPU provider): the exported logits are the eager ones,
    A-ViT is refused, no ONNX file is left in the results."""
    entries = [(label, build) for label, build in gpu_check.cpu_entries()[0][1] if label in ("evit", "avit")]
    monkeypatch.setattr(gpu_check, "cpu_entries", lambda: [("vit_micro_patch4_32", entries)])
    rows = gpu_check.export_checks("cpu", gpu_check.Clock(600), 600, tmp_path)
    evit, avit = rows
    assert evit["status"] == "ok" and evit["torch_export_max_diff"] < 1e-4
    assert evit["CPUExecutionProvider_max_diff"] < 1e-4 and evit["CPUExecutionProvider_median_ms"] > 0
    assert avit["status"].startswith("refused")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_make_gpu_check_on_the_cpu(tmp_path: Path) -> None:
    """The whole check as a GPU loan runs it, on the CPU: the GPU tests pass here, every method is profiled and
    every grid entry is measured."""
    env = subprocess_env() | {"OUT": str(tmp_path)}
    done = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    check_success(done)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["tests"]["exit_code"] == 0 and " passed" in summary["tests"]["summary"]
    assert not summary["not_measured"]
    profile = (tmp_path / "profile.txt").read_text()
    assert all(f"## {method}\nhost syncs per forward:" in profile for method in METHODS)
    assert {r["method"] for r in summary["rows"]} == set(METHODS)
    assert {r["method"] for r in summary["export"] if r["status"] == "ok"} == {m for m in METHODS if
                                                                              METHODS[m].static_shapes}
