"""Throughput measured the same way for every method and its dense baseline, in the same run.

Eval mode, inference mode, a fixed batch, warm-up iterations thrown away, the device synchronised around
every timed call (CUDA events on a GPU), the median of several repeats. The dense model of the same
backbone is timed at its fastest attention path on that device (timm's fused SDPA or the explicit
matmul-softmax path), once, and cached.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from lightning_modules import method_name
from lightning_modules.base import ReductionModule
from lightning_modules.vit import ViTStudent, create_vit

ROW_KEYS = ("method", "backbone", "batch_size", "precision", "images_per_sec", "dense_images_per_sec", "speedup",
            "gmacs", "dense_gmacs", "mac_ratio", "efficiency", "peak_memory_mb", "device")


@dataclass
class Timing:
    images_per_sec: float
    peak_memory_mb: Optional[float]  # CUDA only: the CPU allocator keeps no per-call peak
    median_ms: float = 0.0  # latency of one call (the whole batch)
    p90_ms: float = 0.0


def timing_of(times: list[float], batch_size: int, peak: Optional[float] = None) -> Timing:
    """Seconds per call -> images/s at the median call, and the median and 90th-percentile latency."""
    median = statistics.median(times)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    return Timing(batch_size / median, peak, median * 1000, p90 * 1000)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Lightning's precision names: 32 / 32-true run as is; bf16-mixed / 16-mixed under autocast."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        yield


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """timm's per-module switch between fused SDPA and the explicit attention path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", fused)  # timm's switch (a Final in its type, set per module)


def time_model(model: nn.Module, images: Tensor, precision: str = "32", warmup: int = 3,
               repeats: int = 10) -> Timing:
    """Median images/s of `model(images)` in eval and inference mode, and on CUDA the peak memory the timed
    calls allocated (None on CPU, where no allocator statistics exist)."""
    device = images.device
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    times = []
    try:
        with torch.inference_mode(), autocast(precision, device):
            for _ in range(warmup):
                model(images)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(images)
                    end.record()
                    torch.cuda.synchronize(device)
                    times.append(start.elapsed_time(end) / 1000.0)
                else:
                    t0 = time.perf_counter()
                    model(images)
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return timing_of(times, images.shape[0], peak)


def fastest_dense(dense: nn.Module, images: Tensor, precision: str, warmup: int, repeats: int) -> tuple[Timing, bool]:
    """Time the dense model with fused and with explicit attention; return the faster and whether it was fused."""
    timings = {}
    for fused in (True, False):
        set_fused_attention(dense, fused)
        timings[fused] = time_model(dense, images, precision, warmup, repeats)
    fused = timings[True].images_per_sec >= timings[False].images_per_sec
    set_fused_attention(dense, fused)
    return timings[fused], fused


@dataclass
class DenseBaseline:
    timing: Timing
    gmacs: float
    fused: bool  # whether fused SDPA was the faster attention path


def dense_baseline(module: ReductionModule, images: Tensor, precision: str = "32", warmup: int = 3,
                   repeats: int = 10) -> DenseBaseline:
    """Time the dense ViT of a module's backbone (random weights: its speed does not depend on them) at its
    fastest attention path, and count its MACs."""
    hp = module.hp
    vit = create_vit(hp.backbone, num_classes=hp.num_classes, img_size=hp.img_size, **(hp.backbone_kwargs or {}))
    student = ViTStudent(vit).eval().to(images.device)
    dense = module.inference_model(student).eval().to(images.device)  # with a segmentation module's decode head
    with torch.inference_mode():
        _, trace = student(images, trace=True)
    timing, fused = fastest_dense(dense, images, precision, warmup, repeats)
    return DenseBaseline(timing, float(module.inference_macs(student, trace).mean()) / 1e9, fused)


def measure(module: ReductionModule, images: Tensor, dense: DenseBaseline, *, precision: str = "32", warmup: int = 3,
            repeats: int = 10, gmacs: Optional[float] = None, model: Optional[nn.Module] = None) -> dict[str, Any]:
    """One benchmark row (ROW_KEYS) for a module's student on `images` against a dense baseline. `gmacs`
    overrides the MACs of the timed batch (e.g. a validation average); `model` is what gets timed
    (default the student; e.g. its torch.compile'd version)."""
    student = module.student
    was_training = student.training
    with torch.inference_mode():
        _, trace = student.eval()(images, trace=True)
    student.train(was_training)
    gmacs = float(module.inference_macs(student, trace).mean()) / 1e9 if gmacs is None else gmacs
    timed = model if model is not None else module.inference_model(student)
    timing = time_model(timed, images, precision, warmup, repeats)
    speedup = timing.images_per_sec / dense.timing.images_per_sec
    mac_ratio = dense.gmacs / gmacs
    return dict(method=method_name(module), backbone=module.hp.backbone,
                batch_size=images.shape[0], precision=str(precision), images_per_sec=timing.images_per_sec,
                dense_images_per_sec=dense.timing.images_per_sec, speedup=speedup, gmacs=gmacs,
                dense_gmacs=dense.gmacs, mac_ratio=mac_ratio, efficiency=speedup / mac_ratio,
                peak_memory_mb=timing.peak_memory_mb, device=device_name(images.device))


def due_after_validation(trainer: pl.Trainer, every_n_epochs: int, at_fit_end: bool = True) -> bool:
    """During fit: after every n-th epoch's validation (0: none) and, with at_fit_end, after the last."""
    last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
    periodic = every_n_epochs > 0 and (trainer.current_epoch + 1) % every_n_epochs == 0
    return periodic or (last and at_fit_end)


class ThroughputCallback(Callback):
    """Measure img/s, speed-up over the dense backbone and MACs after validation, on global rank 0.

    every_n_epochs: during fit, after every n-th validation (0: only at fit end). at_fit_end /
    at_validate_end / at_test_end: also at those points. The timed batch is the first validation batch
    (tiled to `batch_size`; fixed across epochs, and real images, which matters for A-ViT whose depth
    depends on the input), or a seeded random batch when there is none. MACs for the MAC ratio are the
    average the module logged over the images of the stage just run (`val/gmacs`, `test/gmacs`), else those of
    the timed batch.
    Logs throughput/images_per_sec, throughput/dense_images_per_sec, throughput/speedup, flops/dense_gmacs,
    flops/mac_ratio, throughput/efficiency, throughput/peak_memory_mb, throughput/dense_fused_attn, and a
    W&B table.
    """

    def __init__(self, batch_size: int = 32, warmup: int = 3, repeats: int = 10, every_n_epochs: int = 1,
                 at_fit_end: bool = True, at_validate_end: bool = True, at_test_end: bool = True) -> None:
        self.batch_size = batch_size
        self.warmup = warmup
        self.repeats = repeats
        self.every_n_epochs = every_n_epochs
        self.at_fit_end = at_fit_end
        self.at_validate_end = at_validate_end
        self.at_test_end = at_test_end
        self.images: Optional[Tensor] = None
        self.dense: Optional[DenseBaseline] = None
        self.last_row: Optional[dict[str, Any]] = None
        self._measured_step: Optional[int] = None

    def _keep_batch(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self.images is None and batch_idx == 0 and dataloader_idx == 0:
            images = batch[0]
            reps = -(-self.batch_size // images.shape[0])
            self.images = images.repeat(reps, 1, 1, 1)[: self.batch_size].detach().clone()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep_batch(batch, batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep_batch(batch, batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            if due_after_validation(trainer, self.every_n_epochs, self.at_fit_end):
                self.run(trainer, pl_module)
        elif self.at_validate_end:
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_test_end:
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ReductionModule), "the throughput callback measures leanvit's method modules"
        if self._measured_step == trainer.global_step and trainer.state.fn == "fit":
            return
        self._measured_step = trainer.global_step
        if trainer.is_global_zero:
            self.last_row = self.measure(trainer, pl_module)
            assert self.dense is not None  # measured with the first row
            metrics = {
                "throughput/images_per_sec": self.last_row["images_per_sec"],
                "throughput/dense_images_per_sec": self.last_row["dense_images_per_sec"],
                "throughput/speedup": self.last_row["speedup"],
                "flops/dense_gmacs": self.last_row["dense_gmacs"],
                "flops/mac_ratio": self.last_row["mac_ratio"],
                "throughput/efficiency": self.last_row["efficiency"],
                "throughput/dense_fused_attn": float(self.dense.fused),
            }
            if self.last_row["peak_memory_mb"] is not None:
                metrics["throughput/peak_memory_mb"] = self.last_row["peak_memory_mb"]
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                if hasattr(logger, "log_table"):  # W&B
                    logger.log_table(key="throughput/table", columns=list(ROW_KEYS),
                                     data=[[self.last_row[k] for k in ROW_KEYS]])
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        trainer.strategy.barrier("throughput")

    def measure(self, trainer: pl.Trainer, pl_module: ReductionModule) -> dict[str, Any]:
        device = pl_module.device
        if self.images is None:
            vit: Any = pl_module.student.vit
            size = vit.patch_embed.img_size  # (H, W) the backbone was built for
            generator = torch.Generator().manual_seed(0)
            self.images = torch.randn(self.batch_size, 3, *size, generator=generator)
        images = self.images.to(device)
        precision = str(trainer.precision)
        stage = "test" if trainer.state.fn == "test" else "val"
        logged = trainer.callback_metrics.get(f"{stage}/gmacs")  # the average over this stage's images
        if self.dense is None:
            self.dense = dense_baseline(pl_module, images, precision, self.warmup, self.repeats)
        return measure(pl_module, images, self.dense, precision=precision, warmup=self.warmup, repeats=self.repeats,
                       gmacs=float(logged) if logged is not None else None)
