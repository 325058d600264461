"""The command surface: how a config names its runs, what a failed checkpoint write leaves behind, and what a
refused launch prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import FAST, QUICKSTART, REPO, leanvit


def test_experiment_is_not_inherited_through_defaults(tmp_path: Path) -> None:
    """A child of a YAML that names its `experiment` runs under its own name, never in the parent's run folder
    (where `resume=last` would then pick the parent's checkpoint)."""
    from experiments.build import load_checked
    from experiments.rundirs import experiment_name

    quickstart = REPO / "experiments" / "quickstart" / "dense.yaml"
    (tmp_path / "child.yaml").write_text(f"defaults: [{quickstart}]\nmodel:\n  lr: 2.0e-3\n")
    assert experiment_name(load_checked(str(quickstart), [])) == "quickstart/dense"
    assert experiment_name(load_checked(str(tmp_path / "child.yaml"), [])) == "child"
    (tmp_path / "named.yaml").write_text(f"defaults: [{quickstart}]\nexperiment: mine/lr2\n")
    assert experiment_name(load_checked(str(tmp_path / "named.yaml"), [])) == "mine/lr2"
    assert experiment_name(load_checked(str(tmp_path / "child.yaml"), ["experiment=x"])) == "x"


def _failing_save(monkeypatch: pytest.MonkeyPatch, error: Exception, after: int) -> None:
    """torch.save in the checkpoint IO writes `after` files, then raises `error`."""
    import torch

    import callbacks.checkpointing as checkpointing

    writes: list[int] = []
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        writes.append(1)
        if len(writes) > after:
            raise error
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", save)


def test_a_failed_first_checkpoint_keeps_the_logs_and_progress(
        in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Disk full before the first checkpoint: one line, exit 2 - and the CSV logs and progress.json of the epoch
    that trained stay (the write failed, the input was fine)."""
    _failing_save(monkeypatch, OSError(28, "No space left on device"), after=0)
    status = leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                     "trainer.limit_val_batches=2")
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint: cannot write" in err[0]
    run = in_tmp / "runs" / "digits" / "dense" / "version_0"
    assert (run / "progress.json").is_file() and list(run.glob("logs/*/metrics.csv"))


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    # a file-size limit or quota that torch's zip writer reports as a RuntimeError (`ulimit -f` gives this one)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 960"), "unexpected pos")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(
        error: Exception, reason: str, in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """last.ckpt and best.ckpt of epoch 0 are written, then the file system refuses: one line naming the file and
    why, exit 2, the previous checkpoint intact and no temporary file left."""
    import torch

    _failing_save(monkeypatch, error, after=2)
    status = leanvit("fit", QUICKSTART, *FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                     "trainer.limit_val_batches=2")
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint: cannot write" in err[0] and reason in err[0]
    checkpoints = in_tmp / "runs" / "digits" / "dense" / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not list(checkpoints.glob(".*tmp*"))


def test_report_takes_the_macs_of_the_stage_its_accuracy_comes_from(tmp_path: Path) -> None:
    """`leanvit validate` then `leanvit test` on one run: the report's accuracy is the validation one, and so must
    its MACs be (an A-ViT's differ per image set), not the test run's that were logged under the same key."""
    from experiments.report import summarise_run

    (tmp_path / "config.yaml").write_text("method: avit\nmodel:\n  backbone: vit_micro_patch4_32\n")
    (tmp_path / "results_validate.json").write_text('{"val/acc1": 90.0, "val/gmacs": 0.01, "flops/gmacs": 0.01}')
    (tmp_path / "results_test.json").write_text('{"test/acc1": 80.0, "test/gmacs": 0.02, "flops/gmacs": 0.02}')
    summary = summarise_run(tmp_path)
    assert (summary.acc1, summary.gmacs) == (90.0, 0.01)


@pytest.mark.parametrize("rank_env", [{"RANK": "1", "LOCAL_RANK": "1"}, {"LOCAL_RANK": "1"}, {"NODE_RANK": "1"}])
def test_a_refused_launch_prints_its_error_on_rank_zero_only(
        rank_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun / SLURM / Lightning's launcher start every rank with the same bad config: every rank exits 2, and
    the one-line error is printed once (by rank 0), not once per rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in rank_env.items():
        monkeypatch.setenv(name, value)
    assert leanvit("fit", QUICKSTART, "model.lr=-1") == 2
    assert capsys.readouterr().err == ""
    for name, value in rank_env.items():
        monkeypatch.setenv(name, "0")
    assert leanvit("fit", QUICKSTART, "model.lr=-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leanvit: error: model.lr")


def test_the_summary_line_shows_macs_with_four_significant_digits() -> None:
    """A micro ViT's 0.0122 and 0.0137 GMACs must not both print as 0.01, whichever stage logged them."""
    from experiments.commands import format_metric

    assert [format_metric(k, 0.012213) for k in ("flops/gmacs", "val/gmacs", "test/gmacs")] == ["0.01221"] * 3
    assert format_metric("val/acc1", 78.2) == "78.20"
