"""torch.compile on the CPU: every fixed-shape method traces to ONE graph (fullgraph=True: no graph break, no
host sync in the student) on every backbone family, inductor's compiled student gives the eager logits, and
`leanvit benchmark compile=true` runs (it crashed for every method once)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_modules import METHODS

from helpers import FAMILIES, QUICKSTART, build, leanvit, refuses

STATIC = [name for name, cls in METHODS.items() if cls.static_shapes]


@pytest.mark.parametrize("method", list(METHODS))
def test_static_shapes_says_what_the_method_does(method: str) -> None:
    """A method's `static_shapes` is what the compile tests and the benchmark trust: a static one runs every image
    of a batch with the same token counts, an adaptive one (A-ViT) with counts that differ between images."""
    student = build(method, "DeiT").student
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32) * torch.linspace(0.1, 3.0, 8).view(8, 1, 1, 1)  # inputs far apart
    with torch.inference_mode():
        _, trace = student(images, trace=True)
    same_counts = bool((trace.tokens == trace.tokens[:1]).all())
    assert same_counts == METHODS[method].static_shapes


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", STATIC)
def test_one_graph_per_student(method: str, family: str) -> None:
    """Dynamo's trace of the whole student, with the reduction on: a data-dependent shape, a `.item()` or
    `.tolist()` (DiffRate read its counts from a buffer this way) fails here. The eager backend runs the traced
    graph as is, so the logits are the eager ones exactly."""
    if refuses(method, family):
        pytest.skip(f"{method} needs a class token")
    torch._dynamo.reset()
    student = build(method, family).student
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = student(images)
        got = torch.compile(student, backend="eager", fullgraph=True)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", STATIC)
def test_inductor_gives_the_eager_logits(method: str) -> None:
    """The real compiler (inductor, C++ on the CPU): the eager logits within fp32 rounding."""
    torch._dynamo.reset()
    student = build(method, "DeiT").student
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = student(images)
        got = torch.compile(student, fullgraph=True)(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffrate_counts_follow_a_loaded_checkpoint() -> None:
    """The counts inference reads as Python ints (for the compiler) follow the `kept` buffer of a state dict."""
    source = build("diffrate", "DeiT", prune_kept_num=40, merge_kept_num=30)
    target = build("diffrate", "DeiT")
    assert target.student.layer_settings() != source.student.layer_settings()
    target.load_state_dict(source.state_dict())
    assert target.student.layer_settings() == source.student.layer_settings() == [(39, 29)] * 3
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(target.student(images), source.student(images), rtol=0, atol=0)


def test_benchmark_compile_runs_and_checks_its_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rows.json"
    assert leanvit("benchmark", QUICKSTART, "method=evit", "model.backbone_kwargs.depth=2", "model.reduction_layers=[1]",
                   "compile=true", "batch_sizes=[2]", "warmup=1", "repeats=2", f"output={out}") == 0
    row = json.loads(out.read_text())[0]
    assert row["method"] == "evit" and row["images_per_sec"] > 0 and row["dense_images_per_sec"] > 0
    assert row["efficiency"] == pytest.approx(row["speedup"] / row["mac_ratio"])
    capsys.readouterr()
    assert leanvit("benchmark", QUICKSTART, "compile=true", "compile_mode=reduce-overhead", "device=cpu") == 2
    assert "compile_mode: reduce-overhead records CUDA graphs, which need a GPU" in capsys.readouterr().err
    assert leanvit("benchmark", QUICKSTART, "compile=true", "compile_mode=fast") == 2
    assert "compile_mode: expected one of default, reduce-overhead" in capsys.readouterr().err
