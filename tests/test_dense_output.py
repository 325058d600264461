"""`student.forward_dense`: one dense-output rule for every method (segmentation's encoder output).

- With the reduction off it is timm's `forward_features` patch tokens.
- With it on, a patch carried by a token (its own, merged, fused) takes that token's final-norm features, and a
  patch that left takes its token's output of the last block it completed. The reference for the second rule is
  the same model cut after that block (`blocks[:k]`), where the patch is still carried: no method code is reused,
  the carried features are read from the final norm's output with a hook and the trace's owner map.
- A-ViT's own rule: each patch's ACT output (documented), every image run until all its tokens halt.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_modules import METHODS

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def build(name: str, **settings: Any) -> Any:
    torch.manual_seed(0)
    module = METHODS[name](backbone="vit_micro_patch4_32", num_classes=10, backbone_kwargs=dict(depth=4),
                           drop_path_rate=0.0, **settings)
    return module.student.eval()


def carried_reference(student: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """-> (B, N0, C) the final-norm token carrying each patch (zeros where none does), (B, N0) bool carried."""
    if len(student.vit.blocks) == 0:  # cut before the first block: the embedded tokens, normed
        with torch.no_grad():
            normed = student.vit.norm(student.embed(images))[:, student.num_prefix_tokens:]
        return normed, torch.ones(normed.shape[:2], dtype=torch.bool)
    seen: list[Tensor] = []
    hook = student.vit.norm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            _, trace = student(images, trace=True)
    finally:
        hook.remove()
    normed, owner = seen[0], trace.owner[-1]  # (B, N, C), (B, N0)
    rows = normed.gather(1, owner.clamp(min=0)[..., None].expand(-1, -1, normed.shape[-1]))
    return rows * (owner >= 0)[..., None], owner >= 0


def truncated(student: Any, blocks: int) -> nn.ModuleList:
    """The student cut after `blocks` blocks (restore with the returned full list)."""
    full = student.vit.blocks
    student.vit.blocks = nn.Sequential(*list(full)[:blocks])
    return full


@pytest.mark.parametrize("name", ["dense", *[n for n in METHODS if n not in ("dense", "avit")]])
def test_reduction_off_is_timms_patch_tokens(name: str) -> None:
    student = build(name, **(METHODS[name].demo_settings | METHODS[name].off_settings))
    with torch.no_grad():
        expected = student.vit.forward_features(IMAGES)[:, student.num_prefix_tokens:]
        torch.testing.assert_close(student.forward_dense(IMAGES), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in METHODS if n not in ("dense", "avit")])
def test_dense_output_follows_the_trace(name: str) -> None:
    """Carried patches: their token's features; a patch that left: what the model cut after the last block it
    completed gives it (there it is still carried)."""
    student = build(name, **METHODS[name].demo_settings)
    with torch.no_grad():
        dense = student.forward_dense(IMAGES)
    expected, carried = carried_reference(student, IMAGES)
    assert dense.shape == (2, 64, 64)
    torch.testing.assert_close(dense[carried], expected[carried], rtol=0, atol=1e-6)
    missing = ~carried
    for blocks in range(student.depth - 1, -1, -1):  # each left patch: the deepest cut that still carries it
        if not missing.any():
            break
        full = truncated(student, blocks)
        try:
            cut, cut_carried = carried_reference(student, IMAGES)
        finally:
            student.vit.blocks = full
        found = missing & cut_carried
        torch.testing.assert_close(dense[found], cut[found], rtol=0, atol=1e-6)
        missing &= ~cut_carried
    assert not missing.any()


def test_pruning_methods_leave_patches_behind() -> None:
    """The rule for left patches is exercised: DynamicViT and DiffRate (demo settings) prune."""
    for name in ("dynamicvit", "diffrate"):
        _, carried = carried_reference(build(name, **METHODS[name].demo_settings), IMAGES)
        assert not carried.all()


def test_dynamicvit_training_pass_keeps_the_same_rule() -> None:
    """The masked training pass (tokens stay in place): a dropped patch keeps its token's output of the block
    before the stage that dropped it; a kept patch its final features."""
    student = build("dynamicvit", **METHODS["dynamicvit"].demo_settings)
    torch.manual_seed(1)
    out = student.run(IMAGES, train=True, trace=True, dense=True)
    inputs: list[Tensor] = []
    hooks = [block.norm1.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for block in student.vit.blocks]
    try:
        torch.manual_seed(1)
        again = student.run(IMAGES, train=True, trace=True)  # the same Gumbel draws
    finally:
        for hook in hooks:
            hook.remove()
    owner = again.trace.owner
    prefix = student.num_prefix_tokens
    expected = again.loss_inputs.tokens.clone()  # (B, N0, C) final-norm patch tokens, in place
    for layer in range(1, student.depth):
        left = (owner[layer - 1] >= 0) & (owner[layer] < 0)  # dropped before block `layer`
        expected[left] = student.vit.norm(inputs[layer][:, prefix:])[left]  # its output of block layer - 1
    assert (owner[-1] < 0).any()
    torch.testing.assert_close(out.dense, expected, rtol=0, atol=1e-5)


def test_avit_dense_output_is_each_patchs_act_output() -> None:
    """A-ViT: the packed inference pass gives the masked (official) pass's ACT outputs at every patch, once the
    student reads patches (no image stops when its class token halts)."""
    student = build("avit", **METHODS["avit"].demo_settings)
    student.reads_patches = True
    with torch.no_grad():
        packed = student.forward_dense(IMAGES)
        masked = student.run(IMAGES, train=True, dense=True).dense
        x = student.embed(IMAGES)
        act = student.forward_masked(x).features
    torch.testing.assert_close(packed, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, student.vit.norm(act)[:, student.num_prefix_tokens:], rtol=0, atol=1e-6)
