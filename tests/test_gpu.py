"""The GPU path (`make test-gpu`): every method trains a step in bf16-mixed, infers the CPU's logits and token
decisions, agrees between fused (flash / memory-efficient) and math attention, compiles to the eager logits, and
A-ViT's packed inference equals its masked path without a host sync beyond two per block.

Skipped without a GPU. `LEANVIT_TEST_DEVICE=cpu` (what `make gpu-check DEVICE=cpu` sets) runs the same tests on the
CPU, so they are proven before a GPU is at hand; the CUDA-only checks (real sync counts, CUDA graphs, CUDA events)
then skip.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_modules import METHODS

from helpers import HostSyncCounter, build

pytestmark = pytest.mark.gpu
STATIC = [name for name, cls in METHODS.items() if cls.static_shapes]
FAMILIES = ["DeiT", "DINOv3"]  # timm's VisionTransformer and an Eva with RoPE


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("LEANVIT_TEST_DEVICE") == "cpu":
        return torch.device("cpu")
    pytest.skip("no GPU (LEANVIT_TEST_DEVICE=cpu runs these tests on the CPU)")


@pytest.fixture(autouse=True)
def exact_fp32() -> Any:
    """fp32 means fp32: no TF32 matmuls (Ampere+ would otherwise round the CUDA side to 10 bits)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def bf16(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_bf16_mixed_training_step(method: str, family: str, device: torch.device, tmp_path: Any) -> None:
    weights = tmp_path / "micro.pth"
    torch.save(build("dense", family).student.vit.state_dict(), weights)
    module = build(method, family, teacher_weights=str(weights), mixup=0.0, cutmix=0.0)
    if module.needs_teacher():
        module.prepare_teacher()
    module = module.to(device).train()
    with bf16(device):
        terms = module.loss_terms(images().to(device), torch.tensor([0, 1, 2, 3], device=device))
        loss = sum(module.loss_weights()[k] * v for k, v in terms.items())
    assert torch.isfinite(loss), terms
    loss.backward()
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_inference_on_the_device_gives_the_cpu_logits_and_decisions(method: str, family: str,
                                                                     device: torch.device) -> None:
    """fp32: the CPU's logits (1e-4) and the same token decisions. bf16-mixed: the fp32 logits within bf16's
    precision (8 bits of mantissa), where it makes the fp32 decisions; the random micro models rank tokens on near
    ties, which bf16 flips, so the bound is also checked with the reduction off, where nothing can flip."""
    x = images()
    for settings in ({}, METHODS[method].off_settings):
        module = build(method, family, **settings)
        with torch.inference_mode():
            expected, cpu_trace = module.student(x, trace=True)
            student = copy.deepcopy(module.student).to(device)
            got, trace = student(x.to(device), trace=True)
            with bf16(device):
                low, low_trace = student(x.to(device), trace=True)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(trace.tokens.cpu(), cpu_trace.tokens)
        for owner, cpu_owner in zip(trace.owner, cpu_trace.owner, strict=True):  # every block's token decisions
            torch.testing.assert_close(owner.cpu(), cpu_owner)
        assert torch.isfinite(low).all()
        same = all(torch.equal(a.cpu(), b) for a, b in zip(low_trace.owner, cpu_trace.owner, strict=True))
        if same:
            assert float((low.float().cpu() - expected).norm() / expected.norm()) < 0.05
        else:
            assert not settings, "with the reduction off no decision can flip"


def fused_backends(device: torch.device) -> list[SDPBackend]:
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if device.type == "cuda" else \
        [SDPBackend.FLASH_ATTENTION]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_fused_attention_kernels_agree_with_math(method: str, family: str, device: torch.device) -> None:
    """timm's fused path through the flash / memory-efficient SDPA kernels vs the math kernel, fp32 and bf16."""
    student = build(method, family).student.to(device)
    x = images().to(device)
    for precision, tol in (("32", 1e-4), ("bf16", 3e-2)):
        outputs = []
        for backends in (fused_backends(device), [SDPBackend.MATH]):
            context = bf16(device) if precision == "bf16" else torch.autocast(device.type, enabled=False)
            with torch.inference_mode(), sdpa_kernel(backends), context:
                outputs.append(student(x).float())
        scale = float(outputs[1].abs().max())
        torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol * max(scale, 1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_avit_packed_equals_masked_with_two_syncs_per_block(family: str, device: torch.device) -> None:
    module = build("avit", family, gate_center=2.0)
    student = module.student.to(device)
    x = images(6).to(device)
    with torch.inference_mode():
        embedded, rope = student.embed_rope(x)
        out = student.forward_masked(embedded, rope=rope)
        expected = student.vit.forward_head(student.vit.norm(out.features))
        got = student(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        with HostSyncCounter() as counter:
            student.forward_packed(embedded, rope=rope)
        assert len(counter.calls) <= 2 * student.depth, counter.calls
        if device.type == "cuda":  # the real count, from the CUDA runtime
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    student.forward_packed(embedded, rope=rope)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 2 * student.depth, [str(w.message) for w in syncs]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", STATIC)
def test_compiled_students_give_the_eager_logits(method: str, family: str, device: torch.device) -> None:
    """torch.compile (inductor, one graph: fullgraph=True) of every fixed-shape method; on a GPU also, on DeiT,
    in bf16 and with CUDA graphs (mode reduce-overhead) at batch 1, the latency case."""
    torch._dynamo.reset()
    student = build(method, family).student.to(device)
    x = images().to(device)
    with torch.inference_mode():
        expected = student(x)
        torch.testing.assert_close(torch.compile(student, fullgraph=True)(x), expected, rtol=1e-4, atol=1e-4)
        if device.type == "cuda" and family == "DeiT":  # (one family: each compile costs seconds of a short loan)
            with bf16(device):
                eager_bf16 = student(x).float()
                compiled_bf16 = torch.compile(student, fullgraph=True)(x).float()
            torch.testing.assert_close(compiled_bf16, eager_bf16, rtol=3e-2, atol=3e-2 * float(eager_bf16.abs().max()))
            graphs = torch.compile(student, mode="reduce-overhead", fullgraph=True)
            one = x[:1]
            for _ in range(3):  # warm-up, record, replay
                got = graphs(one).clone()
            torch.testing.assert_close(got, student(one), rtol=1e-4, atol=1e-4)


def test_the_throughput_measurement_runs_on_the_device(device: torch.device) -> None:
    """time_model and measure on the device: CUDA events and the peak memory there (None on the CPU)."""
    from callbacks.throughput import dense_baseline, measure

    module = build("tome", "DeiT").to(device)
    x = images(8).to(device)
    dense = dense_baseline(module, x, "bf16-mixed", warmup=1, repeats=2)
    row = measure(module, x, dense, precision="bf16-mixed", warmup=1, repeats=2)
    assert row["images_per_sec"] > 0 and row["dense_images_per_sec"] > 0 and row["mac_ratio"] > 1
    if device.type == "cuda":
        assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] > 0
        assert row["device"] == torch.cuda.get_device_name(device)
    else:
        assert row["peak_memory_mb"] is None
