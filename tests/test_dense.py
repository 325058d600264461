"""The dense student is timm's model: same logits on every ViT variant, an identity token trace."""
from __future__ import annotations

import pytest
import torch

from lightning_modules import METHODS
from lightning_modules.trace import remap_owner
from lightning_modules.vit import ViTStudent

from helpers import VARIANTS, micro_vit


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dense_student_equals_timm(variant: str) -> None:
    vit = micro_vit(**VARIANTS[variant])
    student = ViTStudent(vit).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit(images)
        logits, trace = student(images, trace=True)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    prefix = vit.num_prefix_tokens
    assert trace.num_prefix_tokens == prefix and trace.grid_size == (8, 8)
    assert len(trace.owner) == len(vit.blocks) + 1
    identity = torch.arange(prefix, prefix + 64).expand(3, -1)
    for owner in trace.owner:
        assert torch.equal(owner, identity)
    assert (trace.tokens == prefix + 64).all() and trace.tokens.shape == (3, len(vit.blocks) + 1)
    assert torch.equal(trace.mlp_tokens, trace.tokens[:, :-1])


def test_distilled_deit_averages_heads_in_eval_and_splits_in_distilled_training() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("deit_micro_distilled_patch4_32", num_classes=10).eval()
    student = ViTStudent(vit).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(images), vit(images), rtol=0, atol=0)
    vit.set_distilled_training(True)
    student.train()
    out = student(images)
    assert isinstance(out, tuple) and len(out) == 2


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        student = ViTStudent(micro_vit()).train()
        student.vit.set_grad_checkpointing(checkpointing)
        student(images).sum().backward()
        grads.append(student.vit.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_module_forward_is_the_student() -> None:
    module = METHODS["dense"](backbone="vit_micro_patch4_32", num_classes=10, backbone_kwargs={"depth": 2}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(images), module.student(images), rtol=0, atol=0)
        torch.testing.assert_close(module(images), module.student.vit(images), rtol=0, atol=0)


def test_remap_owner_composes_reductions() -> None:
    # 1 prefix + 4 patches; merge token 2 into 1 and drop token 4, then the survivors shift left
    owner = torch.tensor([[1, 2, 3, 4]])
    dest = torch.tensor([[0, 1, 1, 2, -1]])
    assert remap_owner(owner, dest).tolist() == [[1, 1, 2, -1]]
    again = remap_owner(remap_owner(owner, dest), torch.tensor([[0, -1, 1]]))
    assert again.tolist() == [[-1, -1, 1, -1]]
