"""Speed where a model is deployed: ONNX Runtime, latency at batch 1 (eager, compiled, ONNX Runtime) and end to
end from JPEG bytes to logits - each reduced student timed side by side with its dense backbone on one machine -
and the pieces every benchmark shares (the dense twin, torch.compile as timed, A-ViT's halting calibration).

`leanvit benchmark CONFIG runtime=onnxruntime` and `end_to_end=true` (experiments/benchmark.py) use these; the
grids behind BENCHMARKS.md's deployment tables are `python -m experiments.benchmark onnx|latency|end_to_end`.
"""
from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from callbacks.throughput import Timing, dense_baseline, device_name, set_fused_attention, timing_of
from experiments.export import export_program, onnx_session, write_onnx
from lightning_modules.macs import count_macs


def calibrate_halting(student: torch.nn.Module, images: torch.Tensor, depth_fraction: float) -> float:
    """Set an A-ViT student's gate_center so its mean depth on `images` is `depth_fraction` of the blocks.
    Untrained (random) weights barely halt; this stands in for trained ones in a speed benchmark."""
    from lightning_modules.avit import average_depth

    low, high = -100.0, 300.0
    for _ in range(20):
        student.gate_center = (low + high) / 2
        with torch.inference_mode():
            _, trace = student.eval()(images, trace=True)
        depth = float(average_depth(trace).mean()) / student.depth
        low, high = (student.gate_center, high) if depth < depth_fraction else (low, student.gate_center)
    return student.gate_center


def compiled(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """torch.compile as the benchmark uses it (the modes recording CUDA graphs are for a GPU). Dynamo's caches are
    cleared first: a grid compiles the same `forward` for many models, and past dynamo's recompile limit (8 in some
    torch releases) it would silently run the later ones eager."""
    torch._dynamo.reset()
    return torch.compile(model, mode=None if mode == "default" else mode)


def dense_twin(module: Any, device: torch.device) -> torch.nn.Module:
    """A dense student of the module's backbone (random weights: its speed does not depend on them)."""
    from lightning_modules.vit import ViTStudent, create_vit

    hp = module.hparams
    vit = create_vit(hp.backbone, num_classes=hp.num_classes, img_size=hp.img_size, **(hp.backbone_kwargs or {}))
    return ViTStudent(vit).eval().to(device)


def mean_gmacs(student: nn.Module, images: Tensor) -> float:
    with torch.inference_mode():
        _, trace = student.eval()(images, trace=True)
    return float(count_macs(student, trace).mean()) / 1e9


def onnx_runtime_name(threads: Optional[int] = None) -> str:
    import onnxruntime as ort

    cpu = device_name(torch.device("cpu")).rsplit(",", 1)[0]
    return f"ONNX Runtime {ort.__version__} ({cpu}, {threads or torch.get_num_threads()} intra-op threads)"


def to_onnx(student: nn.Module, images: Tensor, path: Path) -> Path:
    """The student as ONNX (opset default), for timing: no check (the export tests and `leanvit export` check)."""
    from experiments.export import ONNX_OPSET

    write_onnx(export_program(student.eval(), images, fused=False), path, {}, ONNX_OPSET)
    return path


def onnx_rows(module: Any, method: str, batch_sizes: list[int], *, warmup: int = 3, repeats: int = 10,
              dense_cache: Optional[dict[tuple, Any]] = None) -> list[dict[str, Any]]:
    """Rows (ROW_KEYS) for a module's student and its dense backbone, both exported to ONNX and timed side by side
    in ONNX Runtime on this CPU (fp32); `dense_cache` keeps the dense sessions of a grid; dense and student are called in turn."""
    from experiments.export import refuse_adaptive

    refuse_adaptive(type(module), method)
    module = module.cpu().eval()
    size = module.student.vit.patch_embed.img_size
    dense = dense_twin(module, torch.device("cpu"))
    rows = []
    for batch_size in batch_sizes:
        print(f"leanvit benchmark: {method} {module.hparams.backbone} batch {batch_size} in ONNX Runtime (and its "
              f"dense model) ...", file=sys.stderr, flush=True)
        images = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
        key = (module.hparams.backbone, str(module.hparams.backbone_kwargs), batch_size)
        cache = {} if dense_cache is None else dense_cache
        if key not in cache:
            cache[key] = student_runner(dense, images, "onnxruntime")
        t = time_interleaved({"dense": cache[key], "student": student_runner(module.student, images, "onnxruntime")},
                             warmup, repeats)
        dense_timing, timing = t["dense"], t["student"]
        gmacs, dense_gmacs = mean_gmacs(module.student, images), mean_gmacs(dense, images)
        speedup = timing.images_per_sec / dense_timing.images_per_sec
        rows.append(dict(method=method, backbone=module.hparams.backbone, batch_size=batch_size, precision="32",
                         images_per_sec=timing.images_per_sec, dense_images_per_sec=dense_timing.images_per_sec,
                         speedup=speedup, gmacs=gmacs, dense_gmacs=dense_gmacs, mac_ratio=dense_gmacs / gmacs,
                         efficiency=speedup * gmacs / dense_gmacs, peak_memory_mb=None,
                         device=onnx_runtime_name()))
        print(f"leanvit benchmark:   {timing.images_per_sec:.1f} img/s, x{speedup:.2f} the dense model",
              file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ batch-1 latency
LATENCY_KEYS = ("method", "backbone", "path", "batch_size", "median_ms", "p90_ms", "dense_median_ms", "dense_p90_ms",
                "speedup", "mac_ratio", "efficiency", "device")
PATHS = ("eager", "compiled", "onnxruntime")


def latency_rows(module: Any, method: str, *, paths: tuple[str, ...] = PATHS, batch_size: int = 1, warmup: int = 5,
                 repeats: int = 30, dense_cache: Optional[dict[tuple, Callable[[], Any]]] = None,
                 avit_depth: Optional[float] = None) -> list[dict[str, Any]]:
    """Latency (median and 90th percentile, ms) of a module's student at `batch_size` next to its dense backbone,
    on each deployment path: eager (the dense model at its fastest attention path), torch.compile (inductor,
    default mode; a method with per-image shapes runs eager there) and ONNX Runtime (fixed-shape methods only).
    The dense model and the student are called in turn (`time_interleaved`: a drifting machine slows both alike;
    `dense_cache` keeps the built, compiled or exported dense models of a grid). Speed-up: the dense median over the
    student's, on the same path."""
    module = module.cpu().eval()
    size = module.student.vit.patch_embed.img_size
    images = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    if method == "avit" and avit_depth is not None:
        calibrate_halting(module.student, images, avit_depth)
    static = type(module).static_shapes
    cache: dict[tuple, Callable[[], Any]] = {} if dense_cache is None else dense_cache
    gmacs = mean_gmacs(module.student, images)
    dense_gmacs = mean_gmacs(dense_twin(module, images.device), images)
    rows = []
    for path in paths:
        if path == "onnxruntime" and not static:
            continue
        print(f"leanvit benchmark: {method} {module.hparams.backbone} batch {batch_size} latency, {path} ...",
              file=sys.stderr, flush=True)
        key = (module.hparams.backbone, str(module.hparams.backbone_kwargs), batch_size, path)
        if key not in cache:
            cache[key] = dense_runner(module, images, path)
        run = student_runner(module.student, images, path if static or path != "compiled" else "eager", compiled)
        t = time_interleaved({"dense": cache[key], "student": run}, warmup, repeats)
        dense, timing = t["dense"], t["student"]
        speedup = dense.median_ms / timing.median_ms
        rows.append(dict(method=method, backbone=module.hparams.backbone, path=path if static or path == "eager"
                         else "compiled (runs eager)", batch_size=batch_size, median_ms=timing.median_ms,
                         p90_ms=timing.p90_ms, dense_median_ms=dense.median_ms, dense_p90_ms=dense.p90_ms,
                         speedup=speedup, mac_ratio=dense_gmacs / gmacs, efficiency=speedup * gmacs / dense_gmacs,
                         device=onnx_runtime_name() if path == "onnxruntime" else device_name(images.device)))
        print(f"leanvit benchmark:   {timing.median_ms:.1f} ms, x{speedup:.2f} the dense model", file=sys.stderr,
              flush=True)
    return rows


def dense_runner(module: Any, images: Tensor, path: str) -> Callable[[], Any]:
    """The dense backbone built once for a path - eager at its faster attention path, compiled, or exported into an
    ONNX Runtime session - as a call on `images`."""
    dense = dense_twin(module, images.device)
    set_fused_attention(dense, dense_baseline(module, images, "32", 1, 3).fused)
    return student_runner(dense, images, path)


def student_runner(student: nn.Module, images: Tensor, path: str,
                   compile_fn: Optional[Callable[[nn.Module], nn.Module]] = None) -> Callable[[], Any]:
    """A student as a call on `images` on a path: eager, torch.compile'd, or exported into an ONNX Runtime session."""
    student.eval()
    if path == "onnxruntime":
        with tempfile.TemporaryDirectory() as tmp:
            session = onnx_session(to_onnx(student, images, Path(tmp) / "model.onnx"))  # loaded: the file may go
        feed = {"images": images.cpu().numpy()}
        return lambda: session.run(None, feed)[0]
    model = (compile_fn or compiled)(student) if path == "compiled" else student
    return lambda: model(images)


def format_latency_table(rows: list[dict[str, Any]]) -> str:
    header = ("| method | backbone | path | batch | median ms | p90 ms | dense median ms | dense p90 ms | speed-up | "
              "MAC ratio | efficiency |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backbone']} | {r['path']} | {r['batch_size']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['dense_median_ms']:.1f} | {r['dense_p90_ms']:.1f} | x{r['speedup']:.2f} | "
                     f"{r['mac_ratio']:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ end to end
def synthetic_jpegs(count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs (ImageNet's typical 500 x 375, quality 90): smooth colour gradients with noise, so the
    decoder does the work of a natural image rather than of a flat one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    out = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.sin(6 * x + 4 * y + p) for p in phase], axis=-1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class JpegPreprocess:
    """JPEG bytes -> a normalised batch, as the eval transform does: decode (torchvision, libjpeg-turbo), resize
    the shorter side to size / crop_pct (bicubic, antialiased), centre crop, scale to [0, 1], normalise."""

    def __init__(self, size: int, crop_pct: float = 0.875, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> None:
        self.size, self.resize = size, int(size / crop_pct)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, jpegs: list[bytes]) -> Tensor:
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import functional as F

        decoded = decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs])
        crops = [F.center_crop(F.resize(image, self.resize, interpolation=F.InterpolationMode.BICUBIC,
                                        antialias=True), [self.size]) for image in decoded]
        batch = torch.stack(crops).float().div_(255)
        return (batch - self.mean) / self.std


def time_interleaved(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, Timing]:
    """Time several calls in turn, round after round (a drifting machine slows them all alike), in inference mode;
    the images per call come from each call's first result row count."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    sizes: dict[str, int] = {}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                out = call()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
                sizes[name] = out.shape[0]
    return {name: timing_of(t, sizes[name]) for name, t in times.items()}


END_TO_END_KEYS = ("method", "backbone", "batch_size", "images_per_sec", "dense_images_per_sec", "speedup",
                   "model_speedup", "preprocess_share", "mac_ratio", "device")


def end_to_end_rows(module: Any, method: str, batch_sizes: list[int], *, warmup: int = 2, repeats: int = 8,
                    avit_depth: Optional[float] = None) -> list[dict[str, Any]]:
    """Rows (END_TO_END_KEYS): a student and its dense backbone from JPEG bytes to logits (decode, resize, crop,
    normalise, forward; one batch per call), and the models alone on the preprocessed batch (`model_speedup`), all
    timed in turn; `preprocess_share`: the share of the dense model's end-to-end time spent before the model."""
    module = module.cpu().eval()
    student = module.student
    size = student.vit.patch_embed.img_size[0]
    hp = module.hparams
    preprocess = JpegPreprocess(size)
    dense = dense_twin(module, torch.device("cpu"))
    rows = []
    for batch_size in batch_sizes:
        print(f"leanvit benchmark: {method} {hp.backbone} batch {batch_size} end to end (and its dense model) ...",
              file=sys.stderr, flush=True)
        jpegs = synthetic_jpegs(batch_size)
        images = preprocess(jpegs)
        if method == "avit" and avit_depth is not None:
            calibrate_halting(student, images, avit_depth)
        base = dense_baseline(module, images, "32", 1, 3)  # the dense model's faster attention path, its MACs
        set_fused_attention(dense, base.fused)
        t = time_interleaved({"preprocess": lambda: preprocess(jpegs),
                              "dense end to end": lambda: dense(preprocess(jpegs)),
                              "end to end": lambda: student(preprocess(jpegs)),
                              "dense": lambda: dense(images), "model": lambda: student(images)}, warmup, repeats)
        gmacs = mean_gmacs(student, images)
        rows.append(dict(method=method, backbone=hp.backbone, batch_size=batch_size,
                         images_per_sec=t["end to end"].images_per_sec,
                         dense_images_per_sec=t["dense end to end"].images_per_sec,
                         speedup=t["dense end to end"].median_ms / t["end to end"].median_ms,
                         model_speedup=t["dense"].median_ms / t["model"].median_ms,
                         preprocess_share=t["preprocess"].median_ms / t["dense end to end"].median_ms,
                         mac_ratio=base.gmacs / gmacs, device=device_name(torch.device("cpu"))))
        print(f"leanvit benchmark:   {rows[-1]['images_per_sec']:.1f} img/s end to end, x{rows[-1]['speedup']:.2f} "
              f"the dense model (model alone x{rows[-1]['model_speedup']:.2f})", file=sys.stderr, flush=True)
    return rows


def format_end_to_end_table(rows: list[dict[str, Any]]) -> str:
    header = ("| method | backbone | batch | end-to-end img/s | dense end-to-end img/s | end-to-end speed-up | "
              "model-only speed-up | preprocessing share (dense) | MAC ratio |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backbone']} | {r['batch_size']} | {r['images_per_sec']:.1f} | "
                     f"{r['dense_images_per_sec']:.1f} | x{r['speedup']:.2f} | x{r['model_speedup']:.2f} | "
                     f"{100 * r['preprocess_share']:.0f} % | {r['mac_ratio']:.2f} |")
    return "\n".join(lines)

