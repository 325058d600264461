"""`leanvit report RUN_DIR... [out=DIR]`: accuracy against throughput and against GMACs, one marker per run,
and a Markdown table, the way the token-reduction papers report results. Reads only run directories
(config.yaml, logs/*/metrics.csv, results_*.json)."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


@dataclass
class RunSummary:
    run: str
    method: str
    backbone: str
    setting: str
    acc1: Optional[float]
    images_per_sec: Optional[float]
    dense_images_per_sec: Optional[float]
    gmacs: Optional[float]
    keep_on_foreground: Optional[float] = None  # where the data set knows its foreground (the canvas digits)
    keep_on_background: Optional[float] = None
    metric: str = "top-1"  # what `acc1` holds: top-1 accuracy, or mIoU for a segmentation run

    @property
    def label(self) -> str:
        """The method and its setting, per-block lists shortened to their ends (`[65..33]`) so a plot keeps room."""
        setting = re.sub(r"\[([^],\]]+),[^]]*,\s*([^],\]]+)\]", r"[\1..\2]", self.setting)
        return f"{self.method} {setting}".strip()


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def last(rows: list[dict[str, str]], key: str) -> Optional[float]:
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else None


def setting_keys(method: str) -> tuple[str, ...]:
    """The `model:` keys that label a run of this method (none for an unknown one)."""
    from lightning_modules import METHODS

    return METHODS[method].setting_keys if method in METHODS else ()


def method_default(method: str, key: str) -> Any:
    """A method's constructor default, for settings a run's config left implicit."""
    from experiments.config import signature_params
    from lightning_modules import METHODS

    return signature_params(METHODS[method])[key].default


def describe_backbone(model: dict[str, Any]) -> str:
    """The timm name with its architecture overrides (a 4-block and a 6-block micro ViT are different models)."""
    extra = " ".join(f"{k}={v}" for k, v in sorted((model.get("backbone_kwargs") or {}).items()))
    return f"{model.get('backbone', '?')} {extra}".strip()


def summarise_run(run_dir: Path) -> RunSummary:
    """Final validation accuracy (else test), the last throughput and MACs a run logged."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"report: {run_dir} is not a run directory (no config.yaml)")
    config = yaml.safe_load(config_path.read_text()) or {}
    model = config.get("model") or {}
    method = str(config.get("method", "?"))
    values = {k: model.get(k, method_default(method, k)) for k in setting_keys(method)}
    setting = " ".join(f"{k}={v}" for k, v in values.items() if v is not None)
    rows = read_metrics(run_dir)
    results: dict[str, Any] = {}
    for name in ("results_test.json", "results_validate.json", "results_fit.json"):
        if (run_dir / name).is_file():
            results = {**json.loads((run_dir / name).read_text()), **results}
    key = "miou" if config.get("task") == "segmentation" else "acc1"  # the run's quality metric
    acc1 = results.get(f"val/{key}", results.get(f"test/{key}", last(rows, f"val/{key}")))
    stage = "val" if f"val/{key}" in results or f"test/{key}" not in results else "test"
    keep = {name: results.get(f"{stage}/{name}", last(rows, f"{stage}/{name}"))
            for name in ("keep_on_foreground", "keep_on_background")}
    return RunSummary(
        run=str(run_dir), method=method, backbone=describe_backbone(model), setting=setting, acc1=acc1,
        images_per_sec=results.get("throughput/images_per_sec", last(rows, "throughput/images_per_sec")),
        dense_images_per_sec=results.get("throughput/dense_images_per_sec",
                                         last(rows, "throughput/dense_images_per_sec")),
        # the MACs of the images the accuracy is from (`flops/gmacs` holds the stage evaluated last: older runs)
        gmacs=results.get(f"{stage}/gmacs", last(rows, f"{stage}/gmacs") or results.get("flops/gmacs",
                                                                                      last(rows, "flops/gmacs"))),
        **keep, metric="mIoU" if key == "miou" else "top-1",
    )


def metric_label(runs: list[RunSummary]) -> str:
    """The quality axis and column: top-1 accuracy, mIoU, or both when a report mixes the tasks."""
    return " / ".join(sorted({r.metric for r in runs}, reverse=True))


def _plot(runs: list[RunSummary], x_attr: str, xlabel: str, path: Path) -> None:
    fig = Figure(figsize=(5.5, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    placed = sorted((r for r in runs if getattr(r, x_attr) is not None and r.acc1 is not None),
                    key=lambda r: getattr(r, x_attr))
    for i, run in enumerate(placed):
        x, y = getattr(run, x_attr), run.acc1
        dense = run.method == "dense"
        ax.scatter([x], [y], marker="*" if dense else "o", s=160 if dense else 45,
                   color="black" if dense else None, zorder=3, label=run.label)
        # labels alternate above and below their marker, so neighbours along x do not overprint each other
        ax.annotate(run.label, (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -12), fontsize=8,
                    fontweight="bold" if dense else "normal")
    ax.margins(x=0.3, y=0.2)  # room for the labels of the outermost markers
    if any(r.method == "dense" for r in placed):
        ax.legend(handles=[Line2D([], [], marker="*", color="black", linestyle="", markersize=11,
                                  label="dense baseline")], fontsize=8, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_label(runs)} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_report(run_dirs: list[Path], out: Path) -> list[Path]:
    """Both plots and a Markdown table for the given runs; returns the files written."""
    runs = [summarise_run(Path(d)) for d in run_dirs]
    for run in runs:  # a dense run without its own timing: the dense speed its reduced runs measured beside them
        if run.method == "dense" and run.images_per_sec is None:
            beside = [r.dense_images_per_sec for r in runs if r.backbone == run.backbone and r.dense_images_per_sec]
            run.images_per_sec = beside[-1] if beside else None
            run.dense_images_per_sec = run.images_per_sec
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "accuracy_vs_throughput.png", out / "accuracy_vs_gmacs.png", out / "report.md"]
    _plot(runs, "images_per_sec", "throughput (images / s, measured beside the dense model)", written[0])
    _plot(runs, "gmacs", "GMACs per image", written[1])
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    foreground = any(r.keep_on_foreground is not None for r in runs)  # the data set knows its foreground
    lines = [f"| run | method | setting | backbone | {metric_label(runs)} (%) | img/s | speed-up vs dense | GMACs |"
             + (" kept on foreground | kept on background |" if foreground else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if foreground else "")]
    for r in sorted(runs, key=lambda r: (r.method != "dense", -(r.acc1 or 0))):
        speedup = (None if r.method == "dense" or r.images_per_sec is None or not r.dense_images_per_sec
                   else r.images_per_sec / r.dense_images_per_sec)  # the dense row is the baseline itself
        lines.append(f"| {r.run} | {'**dense**' if r.method == 'dense' else r.method} | {r.setting or '-'} | "
                     f"{r.backbone} | {fmt(r.acc1, '.2f')} | {fmt(r.images_per_sec, '.1f')} | "
                     f"{'-' if speedup is None else f'x{speedup:.2f}'} | {fmt(r.gmacs, '.4g')} |"
                     + (f" {fmt(r.keep_on_foreground, '.3f')} | {fmt(r.keep_on_background, '.3f')} |" if foreground else ""))
    note = ("\n\nkept on foreground / background: the share of (patch, block) pairs where a foreground (background) "
            "patch still has its own token - not pruned, halted, merged or fused (1 for a dense ViT)." if foreground else "")
    written[2].write_text("# leanvit report\n\n" + "\n".join(lines) + note + "\n\n![accuracy vs throughput]"
                          "(accuracy_vs_throughput.png)\n![accuracy vs GMACs](accuracy_vs_gmacs.png)\n")
    return written
