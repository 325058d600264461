"""Config loading: defaults inheritance, overrides, and one-line errors that name the key and the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.config import ConfigError, check_config, load_config, to_plain, type_matches

from helpers import leanvit


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def checked(path: Path, overrides: list[str] = ()) -> dict:
    import pytorch_lightning as pl

    from callbacks import CALLBACKS
    from datamodules import DATAMODULES
    from lightning_modules import task_methods

    cfg, origins = load_config(path, list(overrides))
    plain = to_plain(cfg, origins)
    check_config(plain, origins, methods=task_methods(plain.get("task", "classification")), datamodules=DATAMODULES,
                 callbacks=CALLBACKS, trainer_cls=pl.Trainer)
    return plain


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    write(tmp_path / "_base" / "a.yaml", "seed: 1\nmethod: dense\nmodel:\n  backbone: vit_micro_patch4_32\n  lr: 0.1\n"
          "trainer:\n  max_epochs: 3\n")
    write(tmp_path / "_base" / "b.yaml", "model:\n  lr: 0.2\n  num_classes: 10\ndata:\n  seed: ${seed}\n")
    write(tmp_path / "exp.yaml", "defaults: [_base/a.yaml, _base/b.yaml]\nmodel:\n  weight_decay: 0.5\n")
    return tmp_path


def test_defaults_merge_in_order_under_the_file_then_overrides(configs: Path) -> None:
    cfg = checked(configs / "exp.yaml", ["model.lr=0.3", "seed=7"])
    assert cfg["model"] == {"backbone": "vit_micro_patch4_32", "lr": 0.3, "num_classes": 10, "weight_decay": 0.5}
    assert cfg["trainer"]["max_epochs"] == 3
    assert cfg["data"]["seed"] == 7  # interpolation resolved after the override
    assert "defaults" not in cfg
    cfg = checked(configs / "exp.yaml")
    assert cfg["model"]["lr"] == 0.2  # the later default wins over the earlier one


def test_unknown_key_names_path_and_file_and_suggests(configs: Path) -> None:
    write(configs / "typo.yaml", "defaults: [_base/a.yaml]\nmodel:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError) as err:
        checked(configs / "typo.yaml")
    message = str(err.value)
    assert message.startswith("model.weight_decy: unknown key")
    assert "typo.yaml" in message and "did you mean 'weight_decay'" in message


def test_unknown_key_from_command_line(configs: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.max_epoch: unknown key \(set in the command line\)"):
        checked(configs / "exp.yaml", ["trainer.max_epoch=4"])


def test_wrong_type_names_expected_type_and_file(configs: Path) -> None:
    write(configs / "bad.yaml", "defaults: [_base/a.yaml]\nmodel:\n  drop_path_rate: lots\n")
    with pytest.raises(ConfigError) as err:
        checked(configs / "bad.yaml")
    assert "model.drop_path_rate: expected float, got 'lots' (str)" in str(err.value)
    assert "bad.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="trainer.max_epochs: expected"):
        checked(configs / "exp.yaml", ["trainer.max_epochs=1.5"])


def test_missing_required_value(configs: Path) -> None:
    write(configs / "missing.yaml", "method: dense\nmodel:\n  backbone: ???\n")
    with pytest.raises(ConfigError, match=r"model.backbone: missing required value"):
        checked(configs / "missing.yaml")
    write(configs / "nomethod.yaml", "model: {}\n")
    with pytest.raises(ConfigError, match=r"method: missing required value"):
        checked(configs / "nomethod.yaml")


def test_unknown_method_and_datamodule(configs: Path) -> None:
    with pytest.raises(ConfigError, match=r"method: unknown method 'evitt'.*choose from dense"):
        checked(configs / "exp.yaml", ["method=evitt"])
    with pytest.raises(ConfigError, match=r"datamodule: unknown datamodule 'cifar'"):
        checked(configs / "exp.yaml", ["datamodule=cifar"])


def test_missing_default_file_and_cycle(configs: Path) -> None:
    write(configs / "nobase.yaml", "defaults: [nothere.yaml]\nmethod: dense\n")
    with pytest.raises(ConfigError, match=r"defaults: no such file 'nothere.yaml' \(set in .*nobase.yaml\)"):
        load_config(configs / "nobase.yaml")
    write(configs / "loop.yaml", "defaults: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(configs / "loop.yaml")


def test_type_matching_rules() -> None:
    from typing import Literal, Optional, Union

    assert type_matches(1, float) and not type_matches(True, float) and not type_matches(1.5, int)
    assert type_matches(None, Optional[int]) and not type_matches("x", Optional[int])
    assert type_matches([0.08, 1.0], tuple[float, float]) and not type_matches([1.0], tuple[float, float])
    assert type_matches("bf16-mixed", Union[Literal[32, 16], Literal["bf16-mixed"], None])
    assert not type_matches("fp8", Union[Literal[32, 16], Literal["bf16-mixed"], None])
    assert type_matches({"depth": 2}, Optional[dict[str, object]])


def test_cli_reports_one_line_and_exit_code_2(configs: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(configs)
    assert leanvit("fit", str(configs / "exp.yaml"), "model.lrr=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("leanvit: error: model.lrr: unknown key (set in the command line); did you mean 'lr'?")
    assert not (configs / "runs").exists()  # nothing started
    assert leanvit("fit", "no/such.yaml") == 2
    assert "config: no such file 'no/such.yaml'" in capsys.readouterr().err


def test_every_shipped_experiment_is_valid() -> None:
    from experiments.config import EXPERIMENTS_DIR

    shipped = [p for p in EXPERIMENTS_DIR.rglob("*.yaml") if "_base" not in p.parts]
    assert len(shipped) >= 4
    for path in shipped:
        checked(path)


def test_null_removes_a_key_an_inherited_yaml_set(tmp_path: Path) -> None:
    """digits/dense.yaml sets data.dataset (the embedded set's key); a YAML switching to the folder DataModule
    removes it with `dataset: null`, while a real value for a key the class does not take stays an error."""
    from experiments.build import load_checked

    cfg = load_checked("digits/folder.yaml", [])
    assert cfg["datamodule"] == "imagenet" and "dataset" not in cfg["data"]
    assert "dataset" not in load_checked("digits/dense.yaml", ["datamodule=imagenet", "data.dataset=null"])["data"]
    with pytest.raises(ConfigError, match="data.dataset: unknown key"):
        load_checked("digits/dense.yaml", ["datamodule=imagenet"])
