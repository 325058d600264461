"""`leanvit benchmark CONFIG [batch_sizes=[1,32,256]] [precision=32|bf16-mixed|16-mixed] [compile=true]
[compile_mode=default|reduce-overhead|max-autotune|max-autotune-no-cudagraphs] [output=FILE.json]`: throughput of a
configured method next to its dense backbone, no data set needed.

`python -m experiments.benchmark grid [--grid deit|eva|all] [--output BENCHMARKS.md]` (`make benchmark`) runs the
standard grids on the machine it is on and rewrites that device's tables in BENCHMARKS.md;
`python -m experiments.benchmark compile` (`make benchmark-compile`) times every fixed-shape method of DeiT-S eager
and under torch.compile, each against the dense model both ways, and rewrites that device's compile table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from callbacks.throughput import ROW_KEYS, dense_baseline, measure, set_fused_attention, time_model
from experiments.deployment import calibrate_halting, compiled, dense_twin

# Top-level keys `leanvit benchmark` accepts besides an experiment's own.
BENCHMARK_KEYS: dict[str, Any] = {
    "batch_sizes": list[int],
    "precision": str,
    "compile": bool,
    "compile_mode": str,
    "output": Optional[str],
    "warmup": int,
    "repeats": int,
    "device": str,
    "avit_depth": Optional[float],
    "runtime": str,
    "end_to_end": bool,
}
RUNTIMES = ("torch", "onnxruntime")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_device(device: str = "auto") -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))


def grid_compile_mode(batch_size: int) -> str:
    """The grids' compile mode: CUDA graphs for the latency case (batch 1 on a GPU), else inductor's default."""
    return "reduce-overhead" if batch_size == 1 and torch.cuda.is_available() else "default"


def benchmark_module(module: Any, method: str, batch_sizes: list[int], *, precision: str = "32",
                     compile: bool = False, warmup: int = 3, repeats: int = 10, device: str = "auto",
                     avit_depth: Optional[float] = None, compile_mode: str = "default") -> list[dict[str, Any]]:
    """Rows (ROW_KEYS) for one module at several batch sizes; the dense baseline is timed in the same run (with
    `compile`, compiled the same way: the row's speed-up is compiled against compiled)."""
    dev = resolve_device(device)
    module = module.to(dev).eval()
    size = module.student.vit.patch_embed.img_size
    rows = []
    for batch_size in batch_sizes:
        print(f"leanvit benchmark: {method} {module.hparams.backbone} batch {batch_size} {precision} "
              f"(and its dense model) ...", file=sys.stderr, flush=True)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, *size, generator=generator).to(dev)
        if method == "avit" and avit_depth is not None:
            calibrate_halting(module.student, images, avit_depth)
        dense = dense_baseline(module, images, precision, warmup, repeats)
        timed = None
        static = type(module).static_shapes  # torch.compile-able: fixed shapes per batch size
        if compile and static:
            timed = compiled(module.student, compile_mode)
        elif compile:
            print(f"leanvit benchmark: {method} changes shapes per input; timed without torch.compile", file=sys.stderr)
        row = measure(module, images, dense, precision=precision, warmup=warmup, repeats=repeats, model=timed)
        row["method"] = method
        if compile and static:  # compare compiled with compiled
            twin = dense_twin(module, dev)
            set_fused_attention(twin, dense.fused)
            dense_ips = time_model(compiled(twin, compile_mode), images, precision, warmup, repeats).images_per_sec
            row.update(dense_images_per_sec=dense_ips, speedup=row["images_per_sec"] / dense_ips)
            row["efficiency"] = row["speedup"] / row["mac_ratio"]
        print(f"leanvit benchmark:   {row['images_per_sec']:.1f} img/s, x{row['speedup']:.2f} the dense model",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ eager vs compiled
COMPARE_KEYS = ("method", "backbone", "batch_size", "eager_precision", "eager_images_per_sec", "precision",
                "compile_mode", "images_per_sec", "dense_eager_images_per_sec", "dense_images_per_sec", "mac_ratio",
                "speedup", "efficiency", "device")


def compare_compiled(module: Any, method: str, batch_sizes: list[int], *, eager_precision: str = "32",
                     precision: str = "32", warmup: int = 3, repeats: int = 10, device: str = "auto",
                     avit_depth: Optional[float] = None, dense_cache: Optional[dict[tuple, tuple]] = None,
                     mode_for: Optional[Callable[[int], str]] = None) -> list[dict[str, Any]]:
    """Rows (COMPARE_KEYS) for one module: its student eager at `eager_precision` and compiled at `precision`
    (a method whose shapes change per input runs eager there too: compile_mode "eager"), and the dense model both
    ways. speed-up: the compiled student against the FASTEST dense (eager at its best attention path, or
    compiled); efficiency: speed-up / MAC ratio. `dense_cache` shares the dense timings between the methods of a
    grid; `mode_for(batch_size)` picks the compile mode (default: "default")."""
    dev = resolve_device(device)
    module = module.to(dev).eval()
    size = module.student.vit.patch_embed.img_size
    # (backbone, kwargs, batch, precisions, mode) -> (dense eager img/s, dense compiled img/s, its DenseBaseline)
    cache: dict[tuple, tuple] = {} if dense_cache is None else dense_cache
    rows = []
    for batch_size in batch_sizes:
        mode = mode_for(batch_size) if mode_for is not None else "default"
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, *size, generator=generator).to(dev)
        if method == "avit" and avit_depth is not None:
            calibrate_halting(module.student, images, avit_depth)
        key = (module.hparams.backbone, str(module.hparams.backbone_kwargs), batch_size, eager_precision, precision,
               mode)
        if key not in cache:
            print(f"leanvit benchmark: dense {module.hparams.backbone} batch {batch_size}: eager {eager_precision}, "
                  f"compiled {precision} ({mode}) ...", file=sys.stderr, flush=True)
            dense = dense_baseline(module, images, eager_precision, warmup, repeats)
            twin = dense_twin(module, dev)
            set_fused_attention(twin, dense.fused)
            compiled_ips = time_model(compiled(twin, mode), images, precision, warmup, repeats).images_per_sec
            cache[key] = (dense.timing.images_per_sec, compiled_ips, dense)
        dense_eager, dense_compiled, dense = cache[key]
        print(f"leanvit benchmark: {method} {module.hparams.backbone} batch {batch_size}: eager {eager_precision}, "
              f"compiled {precision} ({mode}) ...", file=sys.stderr, flush=True)
        row = measure(module, images, dense, precision=eager_precision, warmup=warmup, repeats=repeats)
        static = type(module).static_shapes
        timed = compiled(module.student, mode) if static else module.student
        ips = time_model(timed, images, precision, warmup, repeats).images_per_sec
        speedup = ips / max(dense_eager, dense_compiled)
        rows.append(dict(method=method, backbone=module.hparams.backbone, batch_size=batch_size,
                         eager_precision=eager_precision, eager_images_per_sec=row["images_per_sec"],
                         precision=precision, compile_mode=mode if static else "eager",
                         images_per_sec=ips, dense_eager_images_per_sec=dense_eager,
                         dense_images_per_sec=dense_compiled, mac_ratio=row["mac_ratio"], speedup=speedup,
                         efficiency=speedup / row["mac_ratio"], device=row["device"]))
        print(f"leanvit benchmark:   eager {row['images_per_sec']:.1f} img/s, compiled {ips:.1f} img/s, x{speedup:.2f} "
              f"the fastest dense model", file=sys.stderr, flush=True)
    return rows


def format_compare_table(rows: list[dict[str, Any]]) -> str:
    header = ("| method | backbone | batch | eager img/s | compiled img/s | compile gain | dense eager img/s | "
              "dense compiled img/s | speed-up vs fastest dense | MAC ratio | efficiency |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        eager = f"{r['eager_images_per_sec']:.1f}" + ("" if r["eager_precision"] == r["precision"]
                                                       else f" ({r['eager_precision']})")
        mode = "" if r["compile_mode"] == "default" else f" ({r['compile_mode']})"
        lines.append(f"| {r['method']} | {r['backbone']} | {r['batch_size']} | {eager} | "
                     f"{r['images_per_sec']:.1f}{mode} | x{r['images_per_sec'] / r['eager_images_per_sec']:.2f} | "
                     f"{r['dense_eager_images_per_sec']:.1f} | {r['dense_images_per_sec']:.1f} | x{r['speedup']:.2f} | "
                     f"{r['mac_ratio']:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines)


def _gmacs(value: float) -> str:
    """Two decimals, or three significant digits below 0.1 (a micro ViT's 0.0118 vs 0.0226 must differ)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("| method | backbone | batch | precision | img/s | dense img/s | speed-up | GMACs | dense GMACs | "
              "MAC ratio | efficiency | peak memory (MB) |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backbone']} | {r['batch_size']} | {r['precision']} | "
                     f"{r['images_per_sec']:.1f} | {r['dense_images_per_sec']:.1f} | x{r['speedup']:.2f} | "
                     f"{_gmacs(r['gmacs'])} | {_gmacs(r['dense_gmacs'])} | {r['mac_ratio']:.2f} | {r['efficiency']:.2f} | "
                     f"{'n/a' if r['peak_memory_mb'] is None else format(r['peak_memory_mb'], '.0f')} |")
    return "\n".join(lines)


PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")  # what `autocast` (callbacks/throughput.py) runs
DEVICES = ("auto", "cpu", "cuda")


def check_benchmark_options(cfg: dict[str, Any]) -> None:
    """The benchmark's own options -> one line naming the bad one."""
    from experiments.config import ConfigError

    precision = str(cfg.get("precision") or "32")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}")
    device = str(cfg.get("device") or "auto")
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no GPU on this machine (torch.cuda.is_available() is False)")
    for key, low in (("batch_sizes", 1), ("warmup", 0), ("repeats", 1)):
        values = cfg.get(key)
        values = values if isinstance(values, list) else [values]
        bad = [v for v in values if v is not None and v < low]
        if bad or (key == "batch_sizes" and cfg.get(key) == []):
            raise ConfigError(f"{key}: expected {'sizes' if key == 'batch_sizes' else 'a count'} >= {low}, "
                              f"got {cfg.get(key)!r}")
    mode = str(cfg.get("compile_mode") or "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode in ("reduce-overhead", "max-autotune") and resolve_device(device).type != "cuda":
        raise ConfigError(f"compile_mode: {mode} records CUDA graphs, which need a GPU; on the CPU use default or "
                          f"max-autotune-no-cudagraphs")
    depth = cfg.get("avit_depth")
    if depth is not None and not 0 < depth <= 1:
        raise ConfigError(f"avit_depth: expected a fraction of the blocks in (0, 1], got {depth!r}")
    runtime = str(cfg.get("runtime") or "torch")
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime" or cfg.get("end_to_end"):
        what = "runtime: onnxruntime" if runtime == "onnxruntime" else "end_to_end: true"
        if cfg.get("compile") or precision not in ("32", "32-true") or resolve_device(device).type != "cpu":
            raise ConfigError(f"{what} times fp32 on the CPU; drop compile, precision and device")
        if runtime == "onnxruntime" and cfg.get("end_to_end"):
            raise ConfigError("end_to_end: true times the torch model; drop runtime=onnxruntime")


def benchmark_command(config: str, overrides: list[str]) -> int:
    """The `leanvit benchmark` command."""
    from experiments.build import build_objects, load_checked

    cfg = load_checked(config, overrides, BENCHMARK_KEYS)
    check_benchmark_options(cfg)
    cfg["model"] = dict(cfg.get("model") or {}, pretrained=False)  # speed needs no hub weights
    torch.manual_seed(cfg.get("seed", 0))
    module, _ = build_objects(cfg, resuming=False, command="benchmark")
    if cfg.get("runtime") == "onnxruntime" or cfg.get("end_to_end"):
        return deployment_benchmark(cfg, module)
    rows = benchmark_module(
        module, cfg["method"], list(cfg.get("batch_sizes") or [1, 32]), precision=str(cfg.get("precision") or "32"),
        compile=bool(cfg.get("compile")), warmup=int(cfg.get("warmup") or 3), repeats=int(cfg.get("repeats") or 10),
        device=str(cfg.get("device") or "auto"), avit_depth=cfg.get("avit_depth"),
        compile_mode=str(cfg.get("compile_mode") or "default"))
    print(format_table(rows))
    print(f"device: {rows[0]['device']}")
    if cfg.get("output"):
        Path(cfg["output"]).write_text(json.dumps([{k: r[k] for k in ROW_KEYS} for r in rows], indent=2))
    return 0


def deployment_benchmark(cfg: dict[str, Any], module: Any) -> int:
    """`runtime=onnxruntime` (exported student and dense model in ONNX Runtime) or `end_to_end=true` (JPEG bytes
    to logits)."""
    from experiments.deployment import END_TO_END_KEYS, end_to_end_rows, format_end_to_end_table, onnx_rows
    from experiments.export import require_onnx

    batch_sizes = list(cfg.get("batch_sizes") or [1, 32])
    warmup, repeats = int(cfg.get("warmup") or 3), int(cfg.get("repeats") or 10)
    if cfg.get("end_to_end"):
        rows = end_to_end_rows(module, cfg["method"], batch_sizes, warmup=warmup, repeats=repeats,
                               avit_depth=cfg.get("avit_depth"))
        table, keys = format_end_to_end_table(rows), END_TO_END_KEYS
    else:
        require_onnx("runtime: onnxruntime")
        rows = onnx_rows(module, cfg["method"], batch_sizes, warmup=warmup, repeats=repeats)
        table, keys = format_table(rows), ROW_KEYS
    print(table)
    print(f"device: {rows[0]['device']}")
    if cfg.get("output"):
        Path(cfg["output"]).write_text(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
    return 0


# ------------------------------------------------------------------------------------------------ the grid
# (config, overrides, A-ViT mean depth standing in for trained weights: the papers' MAC ratios)
DEIT_GRID = {
    "deit_tiny": [("deit_tiny/dense.yaml", []), ("deit_tiny/tome_r12.yaml", ["model.r=13"]),
                  ("deit_tiny/evit_kr0.7.yaml", []), ("deit_tiny/dynamicvit_r0.7.yaml", []),
                  ("deit_tiny/avit.yaml", ["avit_depth=0.63"]), ("deit_tiny/pitome_ratio0.9125.yaml", []),
                  ("deit_tiny/diffrate_0.9g.yaml", []), ("deit_tiny/mctf_r16.yaml", []), ("deit_tiny/mctf_fast.yaml", []),
                  ("deit_tiny/atc_kr0.7.yaml", [])],
    "deit_small": [("deit_small/dense.yaml", []), ("deit_small/tome_r13.yaml", []),
                   ("deit_small/evit_kr0.7.yaml", []), ("deit_small/dynamicvit_r0.7.yaml", []),
                   ("deit_small/avit.yaml", ["avit_depth=0.78"]), ("deit_small/pitome_ratio0.9125.yaml", []),
                   ("deit_small/diffrate_2.9g.yaml", []), ("deit_small/mctf_r16.yaml", []),
                   ("deit_small/mctf_fast.yaml", []), ("deit_small/atc_kr0.7.yaml", [])],
}
# DiffRate's official DeiT-S 2.9 G counts (class token included), applied as they are to the Eva backbones
_DIFFRATE = ["model.prune_kept_num=[197,196,190,168,150,139,129,117,99,78,58,3]",
             "model.merge_kept_num=[197,194,176,156,141,133,121,107,88,64,56,3]"]


def _eva_rows(config: str, r: int, extra: list[str]) -> list[tuple[str, list[str]]]:
    """Every method on one Eva backbone at the DeiT-S settings (ToMe at the r of DeiT-S r=13's MAC ratio)."""
    return [(config, extra), (config, ["method=tome", f"model.r={r}", *extra]), (config, ["method=evit", *extra]),
            (config, ["method=dynamicvit", *extra]), (config, ["method=avit", "avit_depth=0.78", *extra]),
            (config, ["method=pitome", *extra]), (config, ["method=diffrate", *_DIFFRATE, *extra]),
            (config, ["method=mctf", *extra]), (config, ["method=atc", "model.keep_rate=0.7", *extra])]


# timm's Eva backbones (RoPE) at 224 px, with each method at DeiT-S's settings
EVA_GRID = {
    "dinov3_vit_s16": _eva_rows("dinov3_vit_s16/dense.yaml", 13, []),
    "dinov3_vit_b16": _eva_rows("dinov3_vit_b16/dense.yaml", 13, []),
    "eva02_vit_b14": _eva_rows("eva02_vit_b14/dense.yaml", 17, ["model.img_size=224"]),
}
# ATC's clustering against ToMe's matching, at the same blocks and kept counts (DeiT: 196 -> 137 -> 96 -> 67 patches)
CLUSTERING_GRID = {
    backbone: [(f"{backbone}/dense.yaml", []), *((f"{backbone}/atc_kr0.7.yaml", [f"model.linkage={linkage}"])
                                                 for linkage in ("complete", "average", "single")),
               (f"{backbone}/tome_r16.yaml", ["model.r=[0,0,0,59,0,0,41,0,0,29]"])]
    for backbone in ("deit_tiny", "deit_small")
}
# Segmentation at 512 px (1,024 patches): every method's encoder with Segmenter's mask transformer against the dense
# encoder with the same head; DeiT-S as Segmenter's recipe, DINOv3-S (RoPE, registers) at the same settings
def _segmentation_rows(folder: str, extra: list[str]) -> list[tuple[str, list[str]]]:
    """Every method's YAML of a segmentation recipe folder (dense first; A-ViT at the papers' mean depth 0.78)."""
    from experiments.config import EXPERIMENTS_DIR

    names = sorted((p.stem for p in (EXPERIMENTS_DIR / folder).glob("*.yaml")), key=lambda n: (n != "dense", n))
    return [(f"{folder}/{n}.yaml", [*(["avit_depth=0.78"] if n == "avit" else []), *extra]) for n in names]


SEGMENTATION_GRID = {
    "ade20k_deit_s16": _segmentation_rows("ade20k_deit_s16", []),
    "ade20k_dinov3_s16": _segmentation_rows("ade20k_deit_s16", ["model.backbone=vit_small_patch16_dinov3",
                                                                "model.teacher_weights=null"]),
}
# name -> (grid, CPU batch sizes, the note under its table)
GRIDS: dict[str, tuple[dict[str, list[tuple[str, list[str]]]], list[int], str]] = {
    "deit": (DEIT_GRID, [1, 32], "A-ViT rows use random weights with the halting gate set to the papers' mean depth "
                                 "(DeiT-T 0.63, DeiT-S 0.78 of the blocks)."),
    "eva": (EVA_GRID, [32], "timm's Eva backbones with RoPE at 224 px (EVA-02 B/14: 256 patches), random weights, every "
                            "method at its DeiT-S setting: ToMe at the r of DeiT-S r=13's MAC ratio (DINOv3 13, EVA-02 17), "
                            "EViT/DynamicViT 0.7, A-ViT at mean depth 0.78, PiToMe 0.9125, DiffRate DeiT-S's 2.9 G counts, "
                            "MCTF r 16, ATC 0.7 (complete linkage)."),
    "clustering": (CLUSTERING_GRID, [32], "ATC's clustering against ToMe's matching at the same kept counts: both reduce at blocks 3, 6, "
                            "9 only, to 137, 96 and 67 patch tokens (ATC keep rate 0.7; ToMe r = 59, 41, 29 there). "
                            "Random weights."),
    "segmentation": (SEGMENTATION_GRID, [1, 8], "Semantic segmentation at 512 px (1,024 patches), random weights: each "
                     "method's encoder with Segmenter's 2-block mask transformer (150 classes) on its restored dense "
                     "output, against the dense encoder with the same head; MACs include the head (6.65 G). Settings "
                     "from `experiments/ade20k_deit_s16/` (MAC ratio about 1.5 each: ToMe r 64, EViT / DynamicViT / ATC "
                     "0.7, PiToMe 0.925, DiffRate ToMe r 64's counts, MCTF r 64, A-ViT at mean depth 0.78), DINOv3-S "
                     "(RoPE, 4 registers) at the same settings."),
}
# grids whose rows are named by their settings (several rows of one method)
LABELLED = {"clustering"}
# a grid's batch sizes on a GPU, where they differ from [1, 32, 256] (bf16)
GPU_BATCHES = {"segmentation": [1, 8, 32]}


def run_grid(markdown: Path, warmup: int, repeats: int, name: str = "deit") -> list[dict[str, Any]]:
    """Run one standard grid here and rewrite this device's section of it in BENCHMARKS.md."""
    grid, cpu_batches, note = GRIDS[name]
    gpu = torch.cuda.is_available()
    batch_sizes, precision = (GPU_BATCHES.get(name, [1, 32, 256]), "bf16-mixed") if gpu else (cpu_batches, "32")
    rows = []
    for backbone, entries in grid.items():
        for module, cfg, label in labelled_entries(entries, by_settings=name in LABELLED):
            rows += benchmark_module(module, label, batch_sizes, precision=precision, warmup=warmup,
                                     repeats=repeats, avit_depth=cfg.get("avit_depth"))
    write_section(markdown, rows, "" if name == "deit" else name, note)
    return rows


def labelled_entries(entries: list[tuple[str, list[str]]],
                     by_settings: bool = False) -> list[tuple[Any, dict[str, Any], str]]:
    """A grid backbone's entries built (module, config) with their row labels: the method, or - for a method with
    several rows there (MCTF and MCTF-Fast), or with `by_settings` - the method and its settings."""
    built = [build_entry(config, overrides) for config, overrides in entries]
    methods = [cfg["method"] for _, cfg in built]
    return [(module, cfg, setting_label(cfg) if by_settings or methods.count(cfg["method"]) > 1 else cfg["method"])
            for module, cfg in built]


def setting_label(cfg: dict[str, Any]) -> str:
    """A row's method with the settings that label its runs (`setting_keys`), e.g. `atc keep_rate 0.7, linkage single`."""
    from lightning_modules import METHODS

    keys = [key for key in METHODS[cfg["method"]].setting_keys if cfg["model"].get(key) is not None]
    settings = ", ".join(f"{key} {cfg['model'][key]}".replace(" ", "") if key == "r" else f"{key} {cfg['model'][key]}"
                         for key in keys)
    return f"{cfg['method']} {settings}".strip()


def build_entry(config: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """A grid entry's module (random weights, seed 0) and its checked config."""
    from experiments.build import build_objects, load_checked

    cfg = load_checked(config, overrides, BENCHMARK_KEYS)
    cfg["model"] = dict(cfg["model"], pretrained=False)
    torch.manual_seed(0)
    module, _ = build_objects(cfg, resuming=False, command="benchmark")
    print(f"[grid] {config} {' '.join(overrides)}", file=sys.stderr, flush=True)
    return module, cfg


def run_compile_grid(markdown: Path, warmup: int, repeats: int, backbone: str = "deit_small") -> list[dict[str, Any]]:
    """Every fixed-shape method of a DeiT (and its dense model) eager and compiled, batch 1 and 32 (on a GPU:
    compiled in bf16, CUDA graphs at batch 1); rewrites this device's compile section of BENCHMARKS.md."""
    gpu = torch.cuda.is_available()
    batch_sizes, precision = ([1, 32, 256], "bf16-mixed") if gpu else ([1, 32], "32")
    rows: list[dict[str, Any]] = []
    cache: dict[Any, Any] = {}
    for config, overrides in DEIT_GRID[backbone]:
        module, cfg = build_entry(config, overrides)
        if not type(module).static_shapes:
            continue
        rows += compare_compiled(module, cfg["method"], batch_sizes, precision=precision, warmup=warmup,
                                 repeats=repeats, dense_cache=cache,
                                 mode_for=grid_compile_mode)
    note = ("eager and `torch.compile`d (inductor, mode default) student and dense model, random weights, timed side "
            "by side; speed-up against the faster of the eager dense model (at its fastest attention path) and the "
            "compiled one.")
    write_section(markdown, rows, "compile", note, table=format_compare_table(rows),
                  command="`make benchmark-compile` (`python -m experiments.benchmark compile`)")
    return rows


def write_section(markdown: Path, rows: list[dict[str, Any]], grid: str = "", note: str = "",
                  table: Optional[str] = None,
                  command: str = "`make benchmark` (`python -m experiments.benchmark grid`)") -> None:
    """Replace (or append) the section of BENCHMARKS.md for the device (and grid) the rows were measured on."""
    device = rows[0]["device"]
    key = f"{device} {grid}".strip()
    begin, end = f"<!-- grid: {key} -->", f"<!-- end grid: {key} -->"
    title = device if not grid else f"{device}: {grid} grid"
    body = f"{begin}\n### {title}\n\n{table or format_table(rows)}\n\nMeasured by {command}; {note}\n{end}"
    text = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    markdown.write_text(text)


# ------------------------------------------------------------------------------------------------ deployment grids
def run_onnx_grid(markdown: Path, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Every fixed-shape method of DeiT-T/S exported to ONNX and timed in ONNX Runtime against the exported dense
    model, batch 1 and 32."""
    from experiments.deployment import onnx_rows

    rows: list[dict[str, Any]] = []
    cache: dict[tuple, Any] = {}
    for backbone, entries in DEIT_GRID.items():
        for module, cfg, label in labelled_entries(entries):
            if type(module).static_shapes and cfg["method"] != "dense":
                rows += onnx_rows(module, label, [1, 32], warmup=warmup, repeats=repeats, dense_cache=cache)
    write_section(markdown, rows, "onnxruntime", "each student and its dense backbone exported by `leanvit export`'s "
                  "path (torch.export -> ONNX, opset 20), fp32, random weights, timed side by side in an ONNX Runtime "
                  "CPU session (intra-op threads as stated, inter-op 1); A-ViT's shapes depend on the image: not "
                  "exported.", command="`make benchmark-deploy` (`python -m experiments.benchmark onnx`)")
    return rows


def run_latency_grid(markdown: Path, warmup: int, repeats: int, backbone: str = "deit_small") -> list[dict[str, Any]]:
    """Batch-1 latency of every method of a backbone: eager, torch.compile'd and in ONNX Runtime."""
    from experiments.deployment import format_latency_table, latency_rows

    rows: list[dict[str, Any]] = []
    cache: dict[tuple, Any] = {}
    for module, cfg, label in labelled_entries(DEIT_GRID[backbone]):
        rows += latency_rows(module, label, warmup=warmup, repeats=repeats, dense_cache=cache,
                             avit_depth=cfg.get("avit_depth"))
    write_section(markdown, rows, "latency", "batch 1, fp32, random weights (A-ViT halting at the papers' mean "
                  "depth); each path's student against the dense model on the same path: eager (dense at its faster "
                  "attention path), torch.compile (inductor, default mode), ONNX Runtime (the exported graphs); "
                  "median and 90th percentile of the calls.", table=format_latency_table(rows),
                  command="`make benchmark-deploy` (`python -m experiments.benchmark latency`)")
    return rows


def run_end_to_end_grid(markdown: Path, warmup: int, repeats: int, backbone: str = "deit_small") -> list[dict[str, Any]]:
    """Every method from JPEG bytes to logits next to the dense model, batch 32."""
    from experiments.deployment import end_to_end_rows, format_end_to_end_table

    rows: list[dict[str, Any]] = []
    for module, cfg, label in labelled_entries(DEIT_GRID[backbone]):
        rows += end_to_end_rows(module, label, [32], warmup=warmup, repeats=repeats, avit_depth=cfg.get("avit_depth"))
    write_section(markdown, rows, "end to end", "32 synthetic 500 x 375 JPEGs (quality 90) per call, decoded by "
                  "torchvision (libjpeg-turbo), resized (bicubic, antialiased) and centre-cropped to 224 px, normalised, "
                  "then the model, fp32, random weights, in one process on the same 2 threads; model-only speed-up: "
                  "the same models on the preprocessed batch.", table=format_end_to_end_table(rows),
                  command="`make benchmark-deploy` (`python -m experiments.benchmark end_to_end`)")
    return rows


DEPLOYMENT_GRIDS = {"onnx": run_onnx_grid, "latency": run_latency_grid, "end_to_end": run_end_to_end_grid}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark")
    parser.add_argument("command", choices=["grid", "compile", *DEPLOYMENT_GRIDS],
                        help="grid: the standard grids; compile: eager vs torch.compile; onnx: ONNX Runtime; "
                             "latency: batch 1 eager, compiled and in ONNX Runtime; end_to_end: from JPEG bytes")
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--grid", choices=[*GRIDS, "all"], default="all",
                        help="deit: DeiT-T/S; eva: DINOv3 S/B and EVA-02 B (RoPE); clustering: ATC's clustering "
                             "against ToMe at the same kept counts; segmentation: DeiT-S and DINOv3-S at 512 px with "
                             "Segmenter's head; all: every grid")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(format_compare_table(run_compile_grid(Path(args.output), args.warmup, args.repeats)))
        return 0
    if args.command in DEPLOYMENT_GRIDS:
        DEPLOYMENT_GRIDS[args.command](Path(args.output), args.warmup, args.repeats)
        return 0
    for name in GRIDS if args.grid == "all" else [args.grid]:
        print(format_table(run_grid(Path(args.output), args.warmup, args.repeats, name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
