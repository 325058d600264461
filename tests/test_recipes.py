"""The recipe table in README.md matches what every shipped experiment YAML resolves to, and the YAMLs hold the
official commands' values (read from the official repositories' scripts and READMEs)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments.build import load_checked
from experiments.config import EXPERIMENTS_DIR
from experiments.recipes import COLUMNS, OFFICIAL_COLUMNS, effective, experiment_yamls, recipe_cells

from helpers import REPO, leanvit


def readme_table() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The '## Training recipes' table: headers and YAML -> {header: cell}."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Training recipes"):]
    body = section.splitlines()[1:]
    start = next(i for i, line in enumerate(body) if line.startswith("|"))
    lines = []
    for line in body[start:]:  # the first table of the section, up to its first non-table line
        if not line.startswith("|"):
            break
        lines.append(line)
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    headers = split(lines[0])
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(headers, split(line)))
        rows[cells["YAML"].strip("`")] = cells
    return headers, rows


def test_table_has_one_row_per_yaml_and_every_column() -> None:
    headers, rows = readme_table()
    assert set(headers) == {"YAML", *(h for h, _ in COLUMNS), *OFFICIAL_COLUMNS}
    assert set(rows) == {str(p.relative_to(EXPERIMENTS_DIR)) for p in experiment_yamls()}
    for name, cells in rows.items():
        assert cells["reproduces"] and cells["differs"], name
        if cells["GPUs"] != "-":
            assert int(cells["global batch"]) == int(cells["batch/GPU"]) * int(cells["GPUs"]), name


@pytest.mark.parametrize("path", experiment_yamls(), ids=lambda p: str(p.relative_to(EXPERIMENTS_DIR)))
def test_yaml_resolves_to_its_table_row(path: Path) -> None:
    _, rows = readme_table()
    row = rows[str(path.relative_to(EXPERIMENTS_DIR))]
    for header, value in recipe_cells(load_checked(str(path), [])).items():
        assert row[header] == value, f"{path.name}: {header} is {value!r} in the YAML, {row[header]!r} in README"


def resolved(name: str) -> dict:
    return effective(load_checked(name, []))


def test_official_values_the_drifts_broke() -> None:
    """Values read from the official commands; each line is a drift that was found (issue 11)."""
    for bb in ("deit_small", "deit_tiny"):  # DynamicViT README: no --drop_path, main.py's default is 0
        assert resolved(f"{bb}/dynamicvit_r0.7.yaml")["model"]["drop_path_rate"] == 0.0
    base = resolved("deit_base/dynamicvit_r0.7.yaml")  # DeiT-B 81.43 %: the current repo's main.py
    assert (base["model"]["warmup_epochs"], base["model"]["min_lr"], base["model"]["ema_decay"]) == (5, 1e-6, 0.9999)
    assert base["data"]["repeated_aug"] == 0 and base["model"]["drop_path_rate"] == 0.2
    assert base["model"]["optimizer_recipe"] == "main" and base["model"]["warmup_prefix"]
    small = resolved("deit_small/avit.yaml")  # A-ViT README small command: --lr 0.0003, 4 x 96
    assert small["model"]["lr"] == 3e-4 and small["model"]["lr_reference_batch"] == 512
    assert small["data"]["batch_size"] == 96
    for name in ("deit_small/evit_kr0.7.yaml", "deit_small/dense.yaml"):  # finetune.sh: eval-mode training
        assert resolved(name)["model"]["train_mode"] is False
    scratch = resolved("deit_small/evit_kr0.7_scratch.yaml")  # run_code.sh: 8 x 256, train mode
    assert scratch["data"]["batch_size"] == 256 and scratch["model"]["train_mode"] is True
    neurips = resolved("deit_small/dynamicvit_r0.7_neurips.yaml")  # main_dynamic_vit.py defaults
    assert neurips["model"]["optimizer_recipe"] == "neurips" and neurips["model"]["drop_path_rate"] == 0.1
    assert neurips["data"]["repeated_aug"] == 3 and neurips["model"]["ema_decay"] == 0.99996


def test_config_command_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert leanvit("config", "deit_small/dynamicvit_r0.7.yaml", "model.keep_rate=0.6") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "dynamicvit" and printed["model"]["keep_rate"] == 0.6
    assert printed["model"]["drop_path_rate"] == 0.0  # from the _base/ chain
    assert printed["model"]["betas"] == [0.9, 0.999]  # a constructor default the YAMLs never set
    assert printed["data"]["repeated_aug"] == 0 and printed["trainer"]["max_epochs"] == 30
    assert leanvit("config", "deit_small/dynamicvit_r0.7.yaml", "model.keep_rat=0.6") == 2
    assert re.search(r"model.keep_rat: unknown key .*did you mean 'keep_rate'", capsys.readouterr().err)
