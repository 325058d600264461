"""Every `leanvit` command in README.md's shell blocks works as written: its config resolves and passes every
check `fit` runs before any work (keys, types, values, the method and DataModule arguments), its command and
options exist. The commands on ImageNet or hub weights stop at that point here; the embedded-data ones are the
commands the other tests run for real."""
from __future__ import annotations

import re
import shlex

import pytest

from helpers import REPO

COMMANDS = ("fit", "validate", "test", "config", "benchmark", "export", "visualize", "report", "export-data", "shard")


def readme_commands() -> list[list[str]]:
    """The argument lists after `leanvit` (or `-m experiments.cli`) in README's ```bash blocks, and in the
    examples `leanvit --help` prints."""
    from experiments.cli import EXAMPLES

    text = (REPO / "README.md").read_text()
    commands = []
    for block in [*re.findall(r"```bash\n(.*?)```", text, flags=re.S), EXAMPLES]:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for marker in ("leanvit", "experiments.cli"):
                if marker in words:
                    commands.append(words[words.index(marker) + 1:])
                    break
    return commands


def test_the_readme_has_the_commands_a_newcomer_runs() -> None:
    names = {c[0] for c in readme_commands() if c}
    assert {"fit", "validate", "benchmark", "visualize", "report", "export-data", "--help"} <= names


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_readme_command_is_valid(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.benchmark import BENCHMARK_KEYS, check_benchmark_options
    from experiments.build import load_checked
    from experiments.cli import main
    from experiments.commands import VISUALIZE_KEYS
    from experiments.export import EXPORT_KEYS, check_export_options

    if args[0] in ("--help", "-h") or args[1:2] == ["--help"]:
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0 and "shipped experiments" in capsys.readouterr().out
        return
    assert args[0] in COMMANDS, args
    if args[0] in ("report", "export-data", "shard"):
        assert len(args) >= 2 + (args[0] == "shard"), args
        return
    config, overrides = args[1], args[2:]
    extra = {"benchmark": BENCHMARK_KEYS, "visualize": VISUALIZE_KEYS, "export": EXPORT_KEYS}.get(args[0])
    cfg = load_checked(config, overrides, extra)
    if args[0] == "export":
        check_export_options(cfg)
    if args[0] == "benchmark":
        if "device=cuda" not in overrides:
            check_benchmark_options(cfg)


def test_the_layout_names_every_module() -> None:
    """README's Layout section is the map: every module of the four packages is named there."""
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout"):].split("```")[1]
    modules = [p for pkg in ("lightning_modules", "datamodules", "callbacks", "experiments")
               for p in sorted((REPO / pkg).glob("*.py")) if p.name != "__init__.py"]
    missing = [f"{p.parent.name}/{p.name}" for p in modules if p.name not in layout]
    assert not missing, f"README's Layout does not name {missing}"
    assert "diffrate_compression_rate.json" in layout


def test_the_repository_cites_nothing_outside_itself() -> None:
    """A user who clones leanvit has only the repository: no file may point at design notes that live beside it."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"DESIGN\.md|METHODS\.md|ENVIRONMENT\.md|\.\./shared")
    citing = [f for f in files if (REPO / f).is_file() and f != "tests/test_readme.py"
              and outside.search((REPO / f).read_text(errors="ignore"))]
    assert not citing, f"{citing} cite files outside the repository"


def test_base_pieces_inherit_only_from_base_pieces() -> None:
    """`_base/` holds the pieces experiments are built from; a piece inheriting from an experiment would change
    whenever that experiment does."""
    import yaml

    base = REPO / "experiments" / "_base"
    for piece in sorted(base.glob("*.yaml")):
        for parent in yaml.safe_load(piece.read_text()).get("defaults") or []:
            assert (piece.parent / parent).resolve().parent == base, f"{piece.name} inherits from {parent}"
