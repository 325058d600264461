"""The `leanvit` command line: parsing, dispatch to the commands (`experiments/commands.py`), and the one place
where an exception becomes an exit status and a message.

Flow of `leanvit fit|validate|test CONFIG.yaml [key.path=value ...]`: load + merge the YAML (defaults, overrides) ->
check every key -> run directory (`rundirs.py`) -> seed -> `METHODS[method](**model)` ->
`DATAMODULES[datamodule](**data)` -> Trainer(**trainer, loggers, callbacks) (`trainer.py`) -> fit/validate/test.
Config problems and bad files are reported as one line, before any work starts.

This module imports only the standard library and the config loader at its top: `leanvit --help` and a
preemption signal during start-up (noted before torch and Lightning load, see `main`) must not wait for them
(the commands pull in torch, Lightning, timm and torchmetrics: ~5 s on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

from experiments.config import ConfigError

_EARLY_SIGNALS: list[int] = []  # SIGTERM/SIGUSR1 that reached `fit` before its heavy imports (see main)

# Exception type -> exit status; the message is the exception's one line. Statuses a command decides itself
# (preempted 75, diverged 3, a checkpoint that could not be written 2) come back as its return value.
EXIT_STATUS: dict[type[Exception], int] = {ConfigError: 2}


def _note_early_signal(signum: int, frame: Any) -> None:
    _EARLY_SIGNALS.append(signum)


def launched_rank_zero() -> bool:
    """This process is rank 0 of its launch, or not launched as one rank of several (torchrun sets RANK and
    LOCAL_RANK, SLURM SLURM_PROCID, Lightning's launcher LOCAL_RANK and NODE_RANK in the ranks it starts)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _error(message: str, status: int = 2) -> int:
    """One line on stderr and the exit status; every rank of a launch gets the same bad input, rank 0 says it."""
    if launched_rank_zero():
        print(f"leanvit: error: {message}", file=sys.stderr)
    return status


EXAMPLES = """examples:
  leanvit fit digits/dense.yaml                                 # a micro ViT on the embedded digits, a few minutes on a CPU
  leanvit fit deit_small/evit_kr0.7.yaml data.root=/data/imagenet trainer.devices=8 trainer.strategy=ddp
  leanvit validate deit_small/tome_r13.yaml model.weights=deit_small_patch16_224.pth data.root=/data/imagenet"""


def help_epilog() -> str:
    """Methods (the METHODS registry), the shipped experiments and examples: only built when help is asked for
    (listing the methods imports torch)."""
    import textwrap

    from experiments.config import EXPERIMENTS_DIR
    from experiments.recipes import experiment_yamls  # (imports METHODS: torch and timm, only for --help)
    from lightning_modules import METHODS

    experiments = [str(p.relative_to(EXPERIMENTS_DIR)) for p in experiment_yamls()]
    wrap = lambda text: textwrap.fill(text, 110, initial_indent="  ", subsequent_indent="  ")  # noqa: E731
    return (f"methods (method: NAME):\n{wrap(', '.join(METHODS))}\n\nshipped experiments (CONFIG, relative to "
            f"{EXPERIMENTS_DIR}):\n{wrap(', '.join(experiments))}\n\n{EXAMPLES}")


def main(argv: Optional[list[str]] = None) -> int:
    asked = sys.argv[1:] if argv is None else argv
    epilog = help_epilog() if any(a in ("-h", "--help") for a in asked) else None
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="leanvit", description="Token-reduction Vision Transformers: train, evaluate and benchmark from YAML.",
        epilog=epilog, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("fit", "train (and validate) a model"), ("validate", "evaluate on the validation split"),
                            ("test", "evaluate on the test split")):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, formatter_class=formatter)
        p.add_argument("config", help="experiment YAML (a path, or relative to the experiments folder)")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="omegaconf dotlist overrides")
    p = sub.add_parser("config", help="print the resolved, checked config (defaults filled in) that fit would run")
    p.add_argument("config", help="experiment YAML (a path, or relative to the experiments folder)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="omegaconf dotlist overrides")
    p = sub.add_parser("benchmark", help="throughput and MACs of a configured method next to its dense backbone")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides, and batch_sizes=[1,32] precision=32|bf16-mixed|16-mixed compile=true "
                        "output=FILE.json warmup=N repeats=N device=cpu|cuda avit_depth=FRACTION")
    p = sub.add_parser("export", help="the student as an ONNX model or a torch.export program, checked against eager")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides, and format=onnx|torch-export batch_size=N output=PATH dynamic_batch=true "
                        "resume=RUN_DIR|last|FILE.ckpt (or model.weights=FILE) opset=N atol=X rtol=X")
    p = sub.add_parser("visualize", help="token maps (kept, merged, pruned, halted patches) for any images")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides, and images=PATH_OR_GLOB out=DIR layers=[3,6,9,12]")
    p = sub.add_parser("report", help="accuracy vs throughput and vs GMACs plots and a table for run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p = sub.add_parser("export-data", help="write the embedded data set as an ImageNet-style folder tree")
    p.add_argument("out", help="output folder")
    p.add_argument("--dataset", default="digits", choices=["digits", "digits_canvas", "mnist"])
    p.add_argument("--format", default="folder", choices=["folder", "wds"],
                   help="folder: OUT/{train,val}/<class>/*.png; wds: tar shards OUT/{train,val}/*.tar + _info.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p = sub.add_parser("shard", help="write an ImageNet-style folder (SOURCE/{train,val}/<class>/<image>) as tar "
                                     "shards for `datamodule: wds`")
    p.add_argument("source", help="the image folder")
    p.add_argument("out", help="a new folder for the shards")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the training samples' shuffle before sharding")
    args = parser.parse_args(argv)
    previous: dict[int, Any] = {}
    if args.command == "fit":
        # a preemption signal during the imports and set-up must not kill a run before it can checkpoint: note
        # it here (stdlib only), `fit` stops at its first step boundary (callbacks/preemption.py)
        _EARLY_SIGNALS.clear()
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, _note_early_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return run_command(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def run_command(args: argparse.Namespace) -> int:
    """Dispatch to the command; an exception of EXIT_STATUS's types -> its status and one line."""
    # imported here, not at the top: they load torch, Lightning and timm (see the module docstring)
    from experiments.benchmark import benchmark_command
    from experiments.commands import (
        config_command,
        export_data,
        report_command,
        run_trainer_command,
        shard_command,
        visualize_command,
    )
    from experiments.export import export_command

    early = _EARLY_SIGNALS[-1] if _EARLY_SIGNALS else 0
    commands: dict[str, Callable[[], int]] = {
        "fit": lambda: run_trainer_command("fit", args.config, args.overrides, early),
        "validate": lambda: run_trainer_command("validate", args.config, args.overrides),
        "test": lambda: run_trainer_command("test", args.config, args.overrides),
        "export-data": lambda: export_data(args.out, args.dataset, args.format, args.samples_per_shard),
        "shard": lambda: shard_command(args.source, args.out, args.samples_per_shard, args.seed),
        "benchmark": lambda: benchmark_command(args.config, args.overrides),
        "export": lambda: export_command(args.config, args.overrides),
        "config": lambda: config_command(args.config, args.overrides),
        "visualize": lambda: visualize_command(args.config, args.overrides),
        "report": lambda: report_command([r for r in args.runs if not r.startswith("out=")],
                                         next((r[4:] for r in args.runs if r.startswith("out=")), "report")),
    }
    try:
        return commands[args.command]()
    except tuple(EXIT_STATUS) as err:
        if os.environ.get("LEANVIT_TRACEBACK"):
            raise
        return _error(str(err), next(status for kind, status in EXIT_STATUS.items() if isinstance(err, kind)))


if __name__ == "__main__":
    sys.exit(main())

