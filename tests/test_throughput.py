"""MACs from the token trace against hand counts and torch.utils.flop_counter; the throughput callback and
the benchmark command produce their keys (speed itself is measured in BENCHMARKS.md, never asserted)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules import METHODS
from lightning_modules.macs import count_macs

from helpers import FAST, QUICKSTART, column, leanvit, metrics

C, HEAD_DIM, PATCHES = 384, 64, 196  # DeiT-S


def block(n: float, m: float, c: int = C) -> float:
    """A ViT block by hand: qkv + proj (4 C^2 per token), q k^T and attn v (2 N^2 C), MLP (8 C^2 per token)."""
    return n * 4 * c * c + 2 * n * n * c + m * 8 * c * c


def embed_and_head(c: int = C, classes: int = 1000) -> float:
    return PATCHES * (3 * 16 * 16) * c + c * classes


def hand_dense() -> float:
    return 12 * block(197, 197) + embed_and_head()


def hand_tome(r: int = 13) -> float:
    total, n = embed_and_head(), 197
    for _ in range(12):
        merged = n - min(r, (n - 1) // 2)
        total += block(n, merged) + math.ceil(n / 2) * (n // 2) * HEAD_DIM  # the matching's similarity matmul
        n = merged
    return total


def hand_evit(keep_rate: float = 0.7) -> float:
    total, n = embed_and_head(), 197
    for layer in range(12):
        if layer in (3, 6, 9):
            kept = 1 + math.ceil(keep_rate * (n - 1)) + 1  # class token, kept tokens, fused token
            total += block(n, kept) + n * C + (n - 1) * C  # the class-attention row and the fused sum
            n = kept
        else:
            total += block(n, n)
    return total


def hand_dynamicvit(rho: float = 0.7) -> float:
    predictor = C * C + C * (C // 2) + (C // 2) * (C // 4) + (C // 4) * 2
    total, n, patches = embed_and_head(), 197, 196
    for layer in range(12):
        if layer in (3, 6, 9):
            total += patches * predictor
            patches = int(196 * rho ** ((3, 6, 9).index(layer) + 1))
            n = patches + 1
        total += block(n, n)
    return total


def hand_mctf(r: float = 16, layers: tuple[int, ...] = tuple(range(1, 12))) -> float:
    """q, k on the T entering tokens, v, proj and the MLP on the T' fused ones, QK^T and the attention times the
    values on T (the one-step-ahead attention is never built), the pair scores on the block's input tokens."""
    total, n = embed_and_head(), 197
    for layer in range(12):
        if layer not in layers:
            total += block(n, n)
            continue
        merged = n - (min(int(r), (n - 1) // 2) if r >= 1 else min(int((n - 1) * r), (n - 1) // 2))
        total += n * 2 * C * C + merged * 2 * C * C + 2 * n * n * C + merged * 8 * C * C
        total += math.ceil(n / 2) * (n // 2) * C  # the similarity of every (A, B) pair
        n = merged
    return total


@pytest.mark.parametrize("method,kwargs,hand,published", [
    # MCTF's README (fvcore): 2.60 G, Fast 2.76 G
    ("mctf", {"r": 16}, hand_mctf, 2.6), ("mctf", {"r": 0.35, "reduction_layers": [3, 6, 9]},
                                           lambda: hand_mctf(0.35, (3, 6, 9)), 2.8),
    ("dense", {}, hand_dense, 4.6), ("tome", {"r": 13}, hand_tome, 2.7), ("evit", {"keep_rate": 0.7}, hand_evit, 3.0),
    # the paper's 2.9 G leaves the predictors out: 2.88 G for the backbone, 0.10 G for the predictors
    ("dynamicvit", {"keep_rate": 0.7}, hand_dynamicvit, 3.0),
])
def test_deit_small_macs_by_hand_and_by_flop_counter(method: str, kwargs: dict, hand, published: float) -> None:
    module = METHODS[method](backbone="deit_small_patch16_224", **kwargs).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _, trace = module.student(images, trace=True)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            module.student(images)
    macs = float(count_macs(module.student, trace)[0])
    assert macs == pytest.approx(hand(), rel=1e-9)
    assert macs == counter.get_total_flops() / 2  # flop_counter counts 2 FLOPs per MAC
    assert round(macs / 1e9, 1) == published


@pytest.mark.parametrize("backbone,gmacs", [("deit_tiny_patch16_224", 1.26), ("deit_base_patch16_224", 17.58)])
def test_dense_deit_tiny_and_base(backbone: str, gmacs: float) -> None:
    module = METHODS["dense"](backbone=backbone).eval()
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, 224, 224), trace=True)
    assert float(count_macs(module.student, trace)[0]) / 1e9 == pytest.approx(gmacs, abs=0.02)


def test_adaptive_macs_are_per_image() -> None:
    module = METHODS["avit"](backbone="vit_micro_patch4_32", num_classes=10, gate_center=3.0).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, trace = module.student(images, trace=True)
    macs = count_macs(module.student, trace)
    assert macs.shape == (4,) and len(set(macs.tolist())) > 1
    dense = METHODS["avit"](backbone="vit_micro_patch4_32", num_classes=10, gate_center=1e4).eval()
    with torch.no_grad():
        _, full = dense.student(images[:1], trace=True)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            dense.student(images[:1])
    assert (macs < count_macs(dense.student, full)[0]).all()
    assert float(count_macs(dense.student, full)[0]) == counter.get_total_flops() / 2


KEYS = ("throughput/images_per_sec", "throughput/dense_images_per_sec", "throughput/speedup", "flops/gmacs",
        "flops/dense_gmacs", "flops/mac_ratio", "throughput/efficiency", "throughput/dense_fused_attn")
# throughput/peak_memory_mb is logged on CUDA only


def test_callback_logs_its_keys(in_tmp: Path) -> None:
    assert leanvit("fit", QUICKSTART, *FAST, "method=evit", "model.reduction_layers=[0]", "trainer.max_epochs=2",
                   "trainer.limit_train_batches=3", "callbacks.throughput={batch_size: 8, warmup: 1, repeats: 2}") == 0
    rows = metrics(in_tmp / "runs" / "digits" / "dense" / "version_0")
    for key in KEYS:
        assert len(column(rows, key)) == 2, key  # after each validation
    ratio = column(rows, "flops/mac_ratio")[-1]
    assert ratio == pytest.approx(column(rows, "flops/dense_gmacs")[-1] / column(rows, "flops/gmacs")[-1], rel=1e-4)
    assert ratio > 1  # EViT at 0.7 in block 0 of 2
    speedup, efficiency = column(rows, "throughput/speedup")[-1], column(rows, "throughput/efficiency")[-1]
    assert efficiency == pytest.approx(speedup / ratio, rel=1e-4)


def test_benchmark_command_writes_json(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = in_tmp / "rows.json"
    assert leanvit("benchmark", QUICKSTART, "method=tome", "model.r=4", "model.backbone_kwargs.depth=2",
                   "batch_sizes=[1,4]", "warmup=1", "repeats=2", f"output={out}") == 0
    rows = json.loads(out.read_text())
    assert [r["batch_size"] for r in rows] == [1, 4]
    for row in rows:
        assert list(row) == ["method", "backbone", "batch_size", "precision", "images_per_sec",
                             "dense_images_per_sec", "speedup", "gmacs", "dense_gmacs", "mac_ratio", "efficiency",
                             "peak_memory_mb", "device"]
        assert row["method"] == "tome" and row["images_per_sec"] > 0 and row["device"]
        assert row["mac_ratio"] == pytest.approx(row["dense_gmacs"] / row["gmacs"])
    assert "| tome | vit_micro_patch4_32 | 4 |" in capsys.readouterr().out
    assert leanvit("benchmark", QUICKSTART, "batch_size=[1]") == 2  # a typo is still one clear line


@pytest.mark.parametrize("method", ["dense", "tome", "evit", "dynamicvit"])
def test_a_compiled_student_is_timed(method: str) -> None:
    """`benchmark compile=true` passed the torch.compile'd student to `measure`, whose `model or student` asked
    the compiled module for its truth value - len() of a ViT - and crashed for every method. The eager backend
    gives the same OptimizedModule without a compiler run."""
    from callbacks.throughput import dense_baseline, measure

    torch.manual_seed(0)
    settings = {"tome": {"r": 4}, "evit": {"reduction_layers": [1]}, "dynamicvit": {"reduction_layers": [1]}}
    module = METHODS[method](backbone="vit_micro_patch4_32", num_classes=10, backbone_kwargs={"depth": 2},
                             **settings.get(method, {})).eval()
    images = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(module.student, backend="eager")
    row = measure(module, images, dense_baseline(module, images, warmup=1, repeats=1), warmup=1, repeats=1,
                  model=compiled)
    assert row["images_per_sec"] > 0
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images), module.student(images))  # the compiled student's logits
