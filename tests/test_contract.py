"""The method contract: every entry of METHODS, by registering, gets these checks.

Reduction off gives timm's logits exactly; fused and explicit attention agree; the token trace keeps its
invariants; MACs from the trace equal torch.utils.flop_counter's FLOPs / 2; two training steps run and
change the weights; a checkpoint round trip gives the same logits. (The shared training arguments are
checked for every method in test_shared_args.py.) Plus the layering the contract relies on: no import cycles
between leanvit's modules, nothing in lightning_modules imports callbacks, datamodules or experiments, and
method names live in METHODS only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from datamodules import EmbeddedDataModule
from lightning_modules import METHODS, method_name
from lightning_modules.macs import count_macs
from lightning_modules.vit import load_weights

from helpers import REPO, assert_fused_matches_explicit, assert_trace_invariants

BACKBONES = {  # one with a class token only; one with class + distillation tokens and LayerScale
    "plain": ("vit_micro_patch4_32", {}),
    "distilled_layerscale": ("deit_micro_distilled_patch4_32", {"init_values": 0.1}),
}


def build(method: str, backbone: str = "vit_micro_patch4_32", depth: int = 4, **settings: object) -> pl.LightningModule:
    torch.manual_seed(0)
    kwargs = dict(METHODS[method].demo_settings) | settings
    return METHODS[method](backbone=backbone, num_classes=10, backbone_kwargs={"depth": depth}, **kwargs).eval()


@pytest.mark.parametrize("variant", list(BACKBONES))
@pytest.mark.parametrize("method", list(METHODS))
def test_reduction_off_gives_timm_logits_exactly(method: str, variant: str) -> None:
    backbone, extra = BACKBONES[variant]
    torch.manual_seed(1)
    vit = timm.create_model(backbone, num_classes=10, depth=4, **extra).eval()
    module = METHODS[method](backbone=backbone, num_classes=10, backbone_kwargs={"depth": 4, **extra},
                             **(METHODS[method].demo_settings | METHODS[method].off_settings)).eval()
    module.student.vit.load_state_dict(vit.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, trace = module.student(images, trace=True)
        expected = vit(images)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert (trace.mlp_tokens == 64 + vit.num_prefix_tokens).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_and_explicit_attention_agree(method: str) -> None:
    assert_fused_matches_explicit(build(method).student, torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("method", list(METHODS))
def test_trace_invariants(method: str) -> None:
    module = build(method, backbone="deit_micro_distilled_patch4_32")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, trace = module.student(images, trace=True)
        torch.testing.assert_close(logits, module(images))  # module(images) and the traced student agree
    reduced = assert_trace_invariants(trace, prefix=2, depth=4, num_patches=64, static=type(module).static_shapes)
    assert reduced == (method != "dense")  # demo_settings reduce


@pytest.mark.parametrize("method", list(METHODS))
def test_one_pass_in_training_too(method: str) -> None:
    """Every method trains through the one forward pass: `run(images, train=True)` (Gumbel masks, halting, ...) is
    what the loss reads - the same logits whatever the module's mode (no dropout or drop path here), `forward` is it
    in training mode, and its trace (asked or not, the same pass) keeps the invariants."""
    module = build(method, backbone="deit_micro_distilled_patch4_32", drop_path_rate=0.0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(2)
        plain = module.student.run(images, train=True)
        torch.manual_seed(2)
        traced = module.student.run(images, train=True, trace=True)
        torch.manual_seed(2)
        forward = module.student.train()(images)
    torch.testing.assert_close(traced.logits, plain.logits, rtol=0, atol=0)
    assert plain.trace is None and traced.trace is not None
    assert_trace_invariants(traced.trace, prefix=2, depth=4, num_patches=64, static=False, masked=True)
    torch.testing.assert_close(forward, plain.logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_macs_equal_the_flop_counter(method: str) -> None:
    module = build(method, backbone="deit_micro_distilled_patch4_32")
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, trace = module.student(image, trace=True)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            module.student(image)
    assert float(count_macs(module.student, trace)[0]) == counter.get_total_flops() / 2


@pytest.mark.parametrize("method", list(METHODS))
def test_two_steps_train_and_a_checkpoint_round_trips(method: str, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pth"  # a method's default teacher (DynamicViT's) is the dense backbone
    torch.save(timm.create_model("vit_micro_patch4_32", num_classes=10, depth=3).state_dict(), teacher)
    module = build(method, depth=3, lr_reference_batch=None, warmup_epochs=0, mixup=0.0, cutmix=0.0,
                   teacher_weights=str(teacher))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=EmbeddedDataModule(batch_size=8))
    assert trainer.global_step == 2
    trained = module.student.state_dict()
    changed = [k for k in before if not torch.equal(before[k], trained[k])]
    assert changed  # (DynamicViT's backbone is frozen for its first epochs: its predictors learn)
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    images = torch.randn(2, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        expected = module(images)
    loaded = type(module).load_from_checkpoint(path, weights_only=True).eval()
    fresh = build(method, depth=3)
    load_weights(fresh.student, path)  # model.weights=run.ckpt: the student's weights only
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)
    assert method_name(loaded) == method


# ------------------------------------------------------------------------------------------------ layering
PACKAGES = ("lightning_modules", "callbacks", "datamodules", "experiments")


def imports_of(path: Path) -> set[str]:
    """leanvit modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def module_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for package in PACKAGES for p in (REPO / package).glob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycles_and_lightning_modules_imports_nothing_above_it() -> None:
    graph = module_graph()
    upward = {(a, b) for a, deps in graph.items() if a.startswith("lightning_modules") for b in deps
              if not b.startswith("lightning_modules")}
    assert not upward
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        for dep in graph[node]:
            visit(dep, path + [node])
        done.add(node)

    for name in graph:
        visit(name, [])


def test_method_names_live_in_the_registry_only() -> None:
    """No module outside lightning_modules/__init__.py lists the methods by name (a new method registers once)."""
    listed = []
    for package in ("callbacks", "datamodules", "experiments", "lightning_modules"):
        for path in (REPO / package).glob("*.py"):
            if path.name == "__init__.py" and package == "lightning_modules":
                continue
            text = path.read_text()
            names = [m for m in METHODS if m != "dense" and f'"{m}"' in text]
            if len(names) >= 2:
                listed.append((str(path.relative_to(REPO)), names))
    assert not listed
