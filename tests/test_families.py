"""The family matrix: every registered method on one small instance of each ViT family users bring.

timm's `VisionTransformer` families (DeiT, DeiT III, AugReg, CLIP, SigLIP, DINOv2 with registers, MAE) and its
`Eva` families with rotary position embeddings (EVA-02, DINOv3, Perception Encoder, and timm's mixed-RoPE ViT),
shrunk through the backbone's own keyword arguments to 3 blocks of width 64 on 32 px images. For each: the method
builds (or refuses in one line when it needs a class token the backbone lacks), reduction off gives timm's logits
exactly, the token trace keeps its invariants, MACs from the trace equal the flop counter's, fused and explicit
attention agree; with RoPE, the rotation each block applies is the mean of the rotations of the patches each
token carries (`ops.mean_rope`), checked against the trace with loops, and DynamicViT's inference equals timm's
own Eva blocks run on the kept tokens with their gathered rotations.
"""
from __future__ import annotations

from typing import Any

import pytest
import timm
import timm.layers.attention
import timm.models.eva
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lightning_modules.layers
from lightning_modules import METHODS, method_name
from lightning_modules.macs import count_macs
from lightning_modules.ops import mean_rope

from helpers import (
    FAMILIES,
    MICRO,
    ROPE,
    assert_fused_matches_explicit,
    assert_trace_invariants,
    build,
    reference,
    refuses,
)


def test_the_rope_families_are_the_eva_ones() -> None:
    assert ROPE == ["EVA-02", "DINOv3", "PE-core", "RoPE-ViT mixed", "EVA-02 qk-norm, no class token"]
    assert all(reference(f).rope is not None for f in ROPE)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_family_matrix(method: str, family: str) -> None:
    if refuses(method, family):
        with pytest.raises(ValueError, match=r"^model\.backbone: \S+ has no class token, and \w+ ranks tokens"):
            build(method, family)
        return
    # reduction off: timm's logits, exactly
    torch.manual_seed(1)
    vit = reference(family)
    off = build(method, family, **METHODS[method].off_settings)
    off.student.vit.load_state_dict(vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(off.student(images), vit(images), rtol=0, atol=0)
    # reducing: the trace's invariants, the flop counter's MACs, fused = explicit attention
    module = build(method, family)
    module.requires_grad_(False)  # (the flop counter's module tracker needs no autograd graph for MAP heads)
    with torch.no_grad():
        logits, trace = module.student(images, trace=True)
        torch.testing.assert_close(logits, module(images))
    prefix = module.student.num_prefix_tokens
    reduced = assert_trace_invariants(trace, prefix=prefix, depth=3, num_patches=64, static=type(module).static_shapes)
    assert reduced == (method_name(module) != "dense")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module.student(images[:1])
    assert float(count_macs(module.student, trace)[0]) == counter.get_total_flops() / 2
    assert_fused_matches_explicit(module.student, images)


# ------------------------------------------------------------------------------------------------ RoPE
def test_mean_rope_by_hand() -> None:
    table = torch.arange(12.0).reshape(4, 3)  # 4 patches, D = 3 (the op does not split sin and cos)
    positions = torch.tensor([[1, 2, 1, -1], [3, 2, 1, 1]])  # prefix 1: tokens 1, 2 (and 3 in image 1)
    out = mean_rope(table, positions, num_tokens=4, num_prefix=1)
    assert out.shape == (2, 1, 3, 3)
    torch.testing.assert_close(out[0, 0, 0], (table[0] + table[2]) / 2, rtol=0, atol=0)
    torch.testing.assert_close(out[0, 0, 1], table[1], rtol=0, atol=0)  # a kept token: its own rotation exactly
    torch.testing.assert_close(out[1, 0, 0], (table[2] + table[3]) / 2, rtol=0, atol=0)
    torch.testing.assert_close(out[1, 0, 2], table[0], rtol=0, atol=0)
    per_head = torch.stack([table, -table])  # (H, N0, D)
    out = mean_rope(per_head, positions, num_tokens=4, num_prefix=1)
    assert out.shape == (2, 2, 3, 3)
    torch.testing.assert_close(out[1, 1, 0], -(table[2] + table[3]) / 2, rtol=0, atol=0)


def rotations_applied(module: Any, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every RoPE table an attention applied (q then k, per block), whichever code path ran it (timm's or ours)."""
    seen: list[torch.Tensor] = []
    original = timm.models.eva.apply_rot_embed_cat

    def spy(x: torch.Tensor, emb: torch.Tensor, half: bool = False) -> torch.Tensor:
        seen.append(emb)
        return original(x, emb, half=half)

    for where in (timm.models.eva, timm.layers.attention, lightning_modules.layers):
        monkeypatch.setattr(where, "apply_rot_embed_cat", spy)
    with torch.no_grad():
        module.student(images)
    return seen[::2]  # one per block (k gets the same as q)


STATIC = [m for m in METHODS if METHODS[m].static_shapes and m != "dense"]


@pytest.mark.parametrize("family", ROPE)
@pytest.mark.parametrize("method", STATIC)
def test_rope_follows_the_tokens(method: str, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block l rotates the token carrying patches P with the mean of timm's rotations of P (a slow loop over the
    trace): a kept token keeps its own, a merged or fused one gets its patches' mean."""
    if refuses(method, family):
        pytest.skip("refused: no class token")
    module = build(method, family)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, trace = module.student(images, trace=True)
        _, rope = module.student.embed_rope(images)
    applied = rotations_applied(module, images, monkeypatch)
    assert len(applied) == 3
    prefix = module.student.num_prefix_tokens
    for layer, emb in enumerate(applied):
        table = module.student.layer_rope(rope, layer)  # (N0, D) or (H, N0, D)
        table = table[None] if table.dim() == 2 else table
        emb = emb.expand(2, table.shape[0], -1, -1)  # (B, H', n, D)
        owner = trace.owner[layer]
        for b in range(2):
            for j in range(emb.shape[2]):
                patches = (owner[b] == prefix + j).nonzero()[:, 0]
                assert patches.numel() >= 1
                expected = table[:, patches].mean(1)  # (H', D)
                torch.testing.assert_close(emb[b, :, j], expected, rtol=1e-6, atol=1e-6)
    assert any(e.dim() == 4 for e in applied)  # tokens did move, and their rotations followed


@pytest.mark.parametrize("family", ["EVA-02", "DINOv3"])
def test_dynamicvit_on_eva_equals_timm_blocks_on_the_kept_tokens(family: str) -> None:
    """DynamicViT's inference against a slow reference: timm's own EvaBlocks, tokens and rotations gathered by hand."""
    module = build("dynamicvit", family)
    student = module.student
    vit = reference(family)
    vit.load_state_dict(student.vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    prefix = student.num_prefix_tokens
    with torch.no_grad():
        x, rope = student.embed_rope(images)
        positions = torch.arange(64).expand(2, -1)  # (B, n) patch index of each non-prefix token
        for layer, block in enumerate(vit.blocks):
            if layer in student.reduction_layers:
                stage = student.reduction_layers.index(layer)
                tokens = x[:, prefix:]
                score = student.score_predictor[stage](tokens, tokens.new_ones(*tokens.shape[:2], 1))[..., 0]
                keep = int(64 * module.hparams.keep_rate ** (stage + 1))
                idx = score.topk(keep, dim=1).indices  # (ties broken as the implementation does)
                x = torch.cat([x[:, :prefix], torch.stack([tokens[b, idx[b]] for b in range(2)])], dim=1)
                positions = torch.stack([positions[b, idx[b]] for b in range(2)])
            table = rope[positions][:, None]  # (B, 1, n, D): each kept token's own rotation
            x = block(x, rope=table)
        x = vit.norm(x)
        student.forward_head = lambda tokens, state: vit.forward_head(tokens, pre_logits=True)  # features, not logits
        torch.testing.assert_close(student(images), vit.forward_head(x, pre_logits=True), rtol=1e-5, atol=1e-5)
        assert x.shape[1] < 64 + prefix


@pytest.mark.parametrize("family", ROPE)
def test_avit_packed_inference_equals_its_masked_computation_on_eva(family: str) -> None:
    module = build("avit", family)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        x, rope = module.student.embed_rope(images)
        out = module.student.forward_masked(x, None, rope)
        expected = module.student.vit.forward_head(module.student.vit.norm(out.features))
        torch.testing.assert_close(module(images), expected, rtol=1e-5, atol=1e-5)


def test_eva_models_the_methods_cannot_run_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="pre-norm EvaBlock only"):
        METHODS["tome"](backbone="eva02_enormous_patch14_clip_224", num_classes=10, img_size=32,
                        backbone_kwargs=MICRO)
    with pytest.raises(ValueError, match="grouped-query attention"):
        METHODS["tome"](backbone="vit_pe_core_tiny_patch16_384", num_classes=10, img_size=32,
                        backbone_kwargs=MICRO | {"qkv_fused": False, "num_kv_heads": 1})
    with pytest.raises(ValueError, match="model.target_flops: .*RoPE"):
        METHODS["diffrate"](backbone="eva02_tiny_patch14_224", num_classes=10, img_size=32, backbone_kwargs=MICRO,
                            target_flops=0.6)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_and_weights_on_a_rope_backbone(method: str, tmp_path: Any) -> None:
    """DINOv3 (RoPE, registers, LayerScale): the training path (masked or reducing) backpropagates finite
    gradients into the backbone, and a timm weights file loads into the student with timm's logits."""
    family = "DINOv3"
    torch.manual_seed(2)
    vit = reference(family)
    weights = tmp_path / "dinov3_micro.pth"
    torch.save(vit.state_dict(), weights)
    module = build(method, family, weights=str(weights), teacher_weights=str(weights), mixup=0.0, cutmix=0.0)
    off = build(method, family, weights=str(weights), **METHODS[method].off_settings)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(off.student(images), vit(images), rtol=0, atol=0)
    if module.needs_teacher():  # (DynamicViT's: the dense backbone, from the same file)
        module.prepare_teacher()
    module.train()
    terms = module.loss_terms(images, targets)
    loss = sum(module.loss_weights()[k] * v for k, v in terms.items())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_every_benchmark_grid_entry_is_a_valid_experiment() -> None:
    from experiments.benchmark import BENCHMARK_KEYS, GRIDS, LABELLED
    from experiments.build import load_checked

    for name, (grid, _, _) in GRIDS.items():
        for backbone, rows in grid.items():
            if name in LABELLED:  # a grid comparing settings (ATC against ToMe): valid experiments
                assert all(load_checked(config, overrides, BENCHMARK_KEYS) for config, overrides in rows)
                continue
            methods = [load_checked(config, overrides, BENCHMARK_KEYS)["method"] for config, overrides in rows]
            assert set(methods) == set(METHODS), backbone  # every registered method, on every backbone of every grid
