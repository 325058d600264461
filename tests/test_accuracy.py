"""`make accuracy` end to end in miniature (one short epoch per run): every method fine-tunes from the dense
canvas checkpoint it trained, and the BENCHMARKS.md section is written once (and replaced, not repeated)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import EmbeddedDataModule
from datamodules.embedded import CANVAS_SIZE, load_embedded
from lightning_modules import METHODS

SMOKE = ["--set", "trainer.max_epochs=1", "--set", "trainer.limit_train_batches=2", "--set",
         "trainer.limit_val_batches=2", "--set", "callbacks.throughput={batch_size: 4, warmup: 1, repeats: 1}"]


def test_canvas_digits_keep_three_quarters_background_and_train_positions_vary() -> None:
    images, labels = load_embedded("mnist_canvas")
    assert images.shape == (5000, CANVAS_SIZE, CANVAS_SIZE) and len(labels) == 5000
    patches = images.reshape(5000, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(5000, 64, 16)
    empty = (patches.max(axis=2) == 0).mean()
    assert empty >= 0.7  # the 16 px digit covers at most 4 x 4 of the 8 x 8 patches
    dm = EmbeddedDataModule(dataset="mnist_canvas", batch_size=16, scale=(1.0, 1.0))
    first, _ = next(iter(dm.train_dataloader()))
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    second, _ = next(iter(loader))
    assert not torch.equal(first, second)  # a digit lands elsewhere in another epoch


def test_the_benchmarks_section_is_replaced_not_repeated(tmp_path: Path) -> None:
    from experiments.accuracy import BEGIN, END, write_section

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    write_section(out, f"{BEGIN}\nfirst\n{END}")
    write_section(out, f"{BEGIN}\nsecond\n{END}")
    text = out.read_text()
    assert "kept text" in text and "second" in text and "first" not in text and text.count(BEGIN) == 1


@pytest.mark.slow
def test_make_accuracy_in_miniature(in_tmp: Path) -> None:
    from experiments.accuracy import BEGIN, END, finetunes, main

    out = in_tmp / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    assert main(["--runs-dir", "runs", "--version", "a", "--output", str(out), "--docs", "docs", "--seeds", "2",
                 "--seed-recipes", "dense", *SMOKE]) == 0
    text = out.read_text()
    assert "kept text" in text and text.count(BEGIN) == 1 and text.count(END) == 1
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert {line.split("|")[1].strip().strip("*") for line in table} == set(METHODS)  # every registered method
    assert [line.split("|")[2].strip() for line in table] == finetunes()  # and every recipe, DiffRate's search too
    assert all("| x" in line for line in table)  # a measured speed-up in every row
    assert "(2 seeds)" in table[0] and "Seed spread: 1 recipes ran with 2 seeds" in text
    assert (in_tmp / "runs" / "canvas" / "dense" / "a_seed1").is_dir()
    assert all(0.0 <= float(line.split("|")[i]) <= 1.0 for line in table for i in (6, 7))  # kept digit/background
    assert (in_tmp / "docs" / "accuracy_vs_gmacs.png").is_file()
    weights = in_tmp / "runs" / "canvas" / "dense_scratch" / "a" / "checkpoints" / "best.ckpt"
    assert main(["--runs-dir", "runs", "--version", "b", "--weights", str(weights), "--output", str(out),
                 "--docs", "docs", "--seeds", "1", *SMOKE]) == 0
    assert out.read_text().count(BEGIN) == 1  # replaced, not appended
    assert not (in_tmp / "runs" / "canvas" / "dense_scratch" / "b").exists()
    assert np.isfinite(float(table[0].split("|")[4].split()[0]))
    # the same version again: every finished run is reused (an interrupted make accuracy continues), none refit
    finished = in_tmp / "runs" / "canvas" / "tome" / "b" / "results_fit.json"
    stamp = finished.stat().st_mtime_ns
    assert main(["--runs-dir", "runs", "--version", "b", "--weights", str(weights), "--output", str(out),
                 "--docs", "docs", "--seeds", "1", *SMOKE]) == 0
    assert finished.stat().st_mtime_ns == stamp


def test_every_registered_method_has_an_accuracy_row() -> None:
    """`make accuracy` runs `canvas/<method>.yaml` for every entry of METHODS (a new method needs one to register),
    and the variants of a method after it (DiffRate's rate search)."""
    from experiments.accuracy import SCRATCH, finetunes
    from experiments.build import load_checked

    configs = finetunes()
    assert [c for c in configs if c.count("_") == 0] == [f"canvas/{m}.yaml" for m in METHODS]
    assert configs.index("canvas/diffrate_search.yaml") == configs.index("canvas/diffrate.yaml") + 1
    assert SCRATCH not in configs
    for config in configs:
        cfg = load_checked(config, [])
        assert config.removeprefix("canvas/").startswith(cfg["method"]) and cfg["data"]["dataset"] == "mnist_canvas"


def test_seed_spread_by_hand() -> None:
    from experiments.accuracy import spread

    assert spread([1.0, 2.0, 3.0]) == (2.0, 1.0) and spread([5.0]) == (5.0, 0.0)
