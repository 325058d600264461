"""`make gpu-check [DEVICE=cuda|cpu]`: the whole GPU check as ONE time-boxed script, for a short loan of a GPU.

1. `tests/test_gpu.py` (what `make test-gpu` runs) on the device, its log kept;
2. a torch.profiler table per method (DeiT-S, batch 256, eager bf16: the costliest ops, host syncs per forward);
3. the GPU grid: DeiT-S, DeiT-B, DeiT-T x every method x batch 256, 1, 32 (in that order of priority), each
   student eager in fp32 and compiled in bf16-mixed (CUDA graphs at batch 1: `mode="reduce-overhead"`; A-ViT,
   whose shapes change per input, runs eager in bf16), each against its dense model timed both ways in the same
   run; entries past the time box are listed as not measured;
4. the GPU section of BENCHMARKS.md rewritten with the GPU named (the rows also as JSON);
before the grid, every fixed-shape method exported at batch 1 (`torch.export` on the device, and ONNX in ONNX
Runtime's TensorRT or CUDA provider where installed, with its batch-1 latency): the logit differences go into the
JSON (`export`).

DEVICE=cpu runs the same script on this machine at tiny sizes (micro ViTs, batch 1 and 4): the tests on the CPU
(`LEANVIT_TEST_DEVICE=cpu`), the grid with the same code path, the table written under the results folder (never
into BENCHMARKS.md), so the GPU call is a formality. Results land in `$OUT` when set (the device tool's folder),
else `runs/gpu_check/`.

On a machine without this project's virtual environment (the lent GPU: torch, timm and Lightning installed, no
internet): `make gpu-check NO_INSTALL=1 PY=python3`, with omegaconf and wandb carried as wheels.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
# backbone -> the grid entries (config, overrides) of the standard DeiT grid; DeiT-B at the same settings
GPU_GRID_ORDER = ("deit_small", "deit_base", "deit_tiny")
DEIT_BASE = [("deit_base/dense.yaml", []), ("deit_base/tome_r13.yaml", []), ("deit_base/evit_kr0.7.yaml", []),
             ("deit_base/dynamicvit_r0.7.yaml", []), ("deit_base/avit.yaml", ["avit_depth=0.78"]),
             ("deit_base/pitome_ratio0.9125.yaml", []), ("deit_base/diffrate_11.5g.yaml", [])]
GPU_BATCHES = (256, 1, 32)
CPU_BATCHES = (1, 4)


class Clock:
    """The time box: seconds left of the budget."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def results_dir(given: Optional[str]) -> Path:
    folder = Path(given or os.environ.get("OUT") or REPO / "runs" / "gpu_check")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_tests(device: str, timeout_s: float, log: Path) -> dict[str, Any]:
    """tests/test_gpu.py in a subprocess (its own interpreter: a crash or a hang cannot take the grid with it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), LEANVIT_TEST_DEVICE=device, HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--durations=10",
           str(REPO / "tests" / "test_gpu.py")]
    print(f"[gpu-check] {' '.join(cmd[2:])} (LEANVIT_TEST_DEVICE={device}, at most {timeout_s:.0f} s)", flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as stopped:
        output = (stopped.stdout or b"").decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        output, code = output + f"\n[gpu-check] stopped after {timeout_s:.0f} s", 124
    log.write_text(output)
    summary = next((line for line in reversed(output.splitlines()) if " passed" in line or " failed" in line
                    or " error" in line or "skipped" in line), output.strip().splitlines()[-1] if output.strip() else "")
    print(f"[gpu-check] tests: exit {code}: {summary} ({time.monotonic() - start:.0f} s; log: {log})", flush=True)
    return {"exit_code": code, "summary": summary.strip("= "), "seconds": round(time.monotonic() - start, 1)}


# ------------------------------------------------------------------------------------------------ the grid
Entry = tuple[str, Callable[[], tuple[Any, str, Optional[float]]]]


def gpu_entries() -> list[tuple[str, list[Entry]]]:
    """(backbone, [(label, build -> (module, method, A-ViT depth))]) in the order of priority."""
    from experiments.benchmark import DEIT_GRID, build_entry

    grids = dict(DEIT_GRID, deit_base=DEIT_BASE)

    def builder(config: str, overrides: list[str]) -> Callable[[], tuple[Any, str, Optional[float]]]:
        def build() -> tuple[Any, str, Optional[float]]:
            module, cfg = build_entry(config, overrides)
            return module, cfg["method"], cfg.get("avit_depth")
        return build

    return [(name, [(f"{config} {' '.join(o)}".strip(), builder(config, o)) for config, o in grids[name]])
            for name in GPU_GRID_ORDER]


def cpu_entries() -> list[tuple[str, list[Entry]]]:
    """Every method on a micro ViT (3 blocks, 32 px) at its demo settings: the GPU grid's code path, in seconds."""
    from lightning_modules import METHODS

    def builder(method: str) -> Callable[[], tuple[Any, str, Optional[float]]]:
        def build() -> tuple[Any, str, Optional[float]]:
            torch.manual_seed(0)
            module = METHODS[method](backbone="vit_micro_patch4_32", num_classes=10,
                                     backbone_kwargs={"depth": 3}, **METHODS[method].demo_settings)
            return module, method, None
        return build

    return [("vit_micro_patch4_32", [(method, builder(method)) for method in METHODS])]


def run_grid(device: str, clock: Clock, warmup: int, repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The grid until the time box runs out; returns the rows and the entries not measured."""
    from experiments.benchmark import compare_compiled, grid_compile_mode

    gpu = device == "cuda"
    entries, batches = (gpu_entries(), GPU_BATCHES) if gpu else (cpu_entries(), CPU_BATCHES)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    cache: dict[Any, Any] = {}
    for backbone, items in entries:
        for batch in batches:
            for label, build in items:
                if clock.left() <= 0:
                    skipped.append(f"{label} batch {batch}")
                    continue
                module, method, depth = build()
                try:
                    rows += compare_compiled(module, method, [batch], eager_precision="32", precision="bf16-mixed",
                                             warmup=warmup, repeats=repeats, device=device, avit_depth=depth,
                                             dense_cache=cache,
                                             mode_for=grid_compile_mode if gpu else None)
                except Exception as error:  # one entry's failure must not cost the rest of the loan
                    print(f"[gpu-check] {label} batch {batch}: {type(error).__name__}: {error}", flush=True)
                    skipped.append(f"{label} batch {batch} (failed: {type(error).__name__}: {str(error)[:200]})")
                finally:
                    del module
                    if gpu:
                        torch.cuda.empty_cache()
    return rows, skipped


SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize",
            "cudaDeviceSynchronize")


def profile_methods(device: str, clock: Clock, path: Path, seconds: float = 60.0) -> None:
    """torch.profiler over each method of the grid's first backbone, eager under bf16 autocast at the largest batch:
    the ops that cost the most device (or CPU) time and the host syncs per forward, into `path`, for the session
    that removes what costs time."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device == "cuda"
    entries = (gpu_entries() if gpu else cpu_entries())[0][1]
    batch = max(GPU_BATCHES if gpu else CPU_BATCHES)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    stop = clock.elapsed() + seconds
    lines = [f"# torch.profiler, eager bf16-mixed, batch {batch}, 3 forwards after 2 warm-up ones; sorted by {sort}"]
    for label, build in entries:
        if clock.elapsed() > stop or clock.left() <= 0:
            lines.append(f"\n## {label}: not profiled within the time box")
            continue
        module, _, depth = build()
        student = module.student.to(device).eval()
        size = student.vit.patch_embed.img_size
        images = torch.randn(batch, 3, *size, device=device)
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            for _ in range(2):
                student(images)
            with profile(activities=activities) as prof:
                for _ in range(3):
                    student(images)
                if gpu:
                    torch.cuda.synchronize()
        events = prof.key_averages()
        syncs = {e.key: e.count // 3 for e in events if e.key in SYNC_OPS}
        lines += [f"\n## {label}", f"host syncs per forward: {syncs or 'none'}",
                  events.table(sort_by=sort, row_limit=12, max_name_column_width=60)]
        del module, student
    path.write_text("\n".join(lines) + "\n")
    print(f"[gpu-check] profile written to {path}", flush=True)


def export_checks(device: str, clock: Clock, seconds: float, folder: Path) -> list[dict[str, Any]]:
    """Every fixed-shape method of the grid's first backbone exported (`torch.export`, batch 1, on the device) and
    run back: the largest logit difference to eager (fp32), and - where this ONNX Runtime has the CUDA or TensorRT
    provider - the same through ONNX (`leanvit export`'s graph) in that provider, with its batch-1 latency."""
    from experiments.export import export_program, write_onnx

    gpu = device == "cuda"
    entries = (gpu_entries() if gpu else cpu_entries())[0][1]
    try:
        import onnxruntime as ort

        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in
                     ort.get_available_providers()] if gpu else ["CPUExecutionProvider"]
    except ImportError:
        ort, providers = None, []
    stop = clock.elapsed() + seconds
    rows: list[dict[str, Any]] = []
    for label, build in entries:
        if clock.elapsed() > stop or clock.left() <= 0:
            rows.append({"entry": label, "status": "not checked within the time box"})
            continue
        module, method, _ = build()
        if not type(module).static_shapes:
            rows.append({"entry": label, "status": "refused: data-dependent shapes"})
            continue
        student = module.student.to(device).eval()
        images = torch.randn(1, 3, *student.vit.patch_embed.img_size, device=device)
        row: dict[str, Any] = {"entry": label, "method": method}
        try:
            with torch.no_grad():
                expected = student(images)
                program = export_program(student, images)
                row["torch_export_max_diff"] = float((program.module()(images) - expected).abs().max())
            for provider in providers[:1]:
                path = folder / f"{method}_b1.onnx"
                write_onnx(export_program(student, images, fused=False), path, {}, 20)
                session = ort.InferenceSession(str(path), providers=[provider])
                feed = {"images": images.cpu().numpy()}
                (logits,) = session.run(["logits"], feed)
                row[f"{provider}_max_diff"] = float((torch.from_numpy(logits) - expected.cpu()).abs().max())
                for _ in range(5):
                    session.run(None, feed)
                times = []
                for _ in range(20):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times.append(time.perf_counter() - start)
                row[f"{provider}_median_ms"] = 1000 * sorted(times)[len(times) // 2]
                path.unlink(missing_ok=True)
            row["status"] = "ok"
        except Exception as error:  # one method's failure must not cost the rest of the loan
            row["status"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        print(f"[gpu-check] export {label}: {row}", flush=True)
        rows.append(row)
        del module, student
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 420 on a GPU: it fits one 10-minute device call "
                             "with the start; 900 on the CPU)")
    parser.add_argument("--tests-budget", type=float, default=None, help="seconds for the tests (default 40 %%)")
    parser.add_argument("--output", default=None,
                        help="the markdown file whose GPU section is rewritten (default: BENCHMARKS.md on a GPU, "
                             "the results folder's gpu_check.md on the CPU)")
    parser.add_argument("--results", default=None, help="results folder (default $OUT, else runs/gpu_check)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("gpu-check: --device cuda, but torch sees no GPU here; `make gpu-check DEVICE=cpu` runs the check on "
              "the CPU", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (420.0 if gpu else 900.0)
    clock = Clock(budget)
    out = results_dir(args.results)
    from callbacks.throughput import device_name

    name = device_name(torch.device(args.device))
    print(f"[gpu-check] {name}; torch {torch.__version__}; budget {budget:.0f} s; results in {out}", flush=True)
    summary: dict[str, Any] = {"device": name, "torch": torch.__version__, "budget_s": budget}
    if not args.skip_tests:
        tests_budget = args.tests_budget if args.tests_budget is not None else 0.4 * budget
        summary["tests"] = run_tests(args.device, min(tests_budget, clock.left()), out / "test_gpu.log")
    if not args.skip_profile:
        profile_methods(args.device, clock, out / "profile.txt", seconds=0.1 * budget)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    repeats = args.repeats if args.repeats is not None else (20 if gpu else 2)
    if not args.skip_export:
        summary["export"] = export_checks(args.device, clock, seconds=0.1 * budget, folder=out)
    rows, skipped = run_grid(args.device, clock, warmup, repeats)
    summary.update(rows=rows, not_measured=skipped, seconds=round(clock.elapsed(), 1))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    if rows:
        from experiments.benchmark import format_compare_table, write_section

        markdown = Path(args.output) if args.output else (REPO / "BENCHMARKS.md" if gpu else out / "gpu_check.md")
        note = ("each student eager in fp32 and compiled (inductor) in bf16-mixed, CUDA graphs (mode reduce-overhead) "
                "at batch 1, A-ViT eager in bf16 (its shapes change per input); speed-up: the compiled student "
                "against the faster of the dense model eager in fp32 at its fastest attention path and compiled in "
                "bf16; random weights, A-ViT's gate set to the papers' mean depth"
                + (f"; not measured within the time box: {', '.join(skipped)}" if skipped else "") + ".")
        write_section(markdown, rows, "gpu", note, table=format_compare_table(rows),
                      command="`make gpu-check` (`python -m experiments.gpu_check`)")
        print(format_compare_table(rows))
        print(f"[gpu-check] table written to {markdown}", flush=True)
    print(f"[gpu-check] done in {clock.elapsed():.0f} s; {len(rows)} rows, {len(skipped)} not measured", flush=True)
    tests_ok = args.skip_tests or summary["tests"]["exit_code"] == 0
    return 0 if tests_ok and rows else 1


if __name__ == "__main__":
    sys.exit(main())
