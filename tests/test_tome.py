"""ToMe: the merge ops alone, against a brute-force reference; the student against timm and against a slow,
loop-based re-derivation of the official algorithm; DeiT-S token counts; training with ToMe."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from lightning_modules import METHODS
from lightning_modules.layers import ReductionAttention
from lightning_modules.ops import bipartite_soft_matching, merge_wavg
from lightning_modules.tome import ToMeBlock, ToMeStudent, parse_r

from helpers import FAST, QUICKSTART, VARIANTS, assert_fused_matches_explicit, leanvit, micro_vit


# ------------------------------------------------------------------------------------------------ ops
def test_parse_r() -> None:
    assert parse_r(4, 3) == [3, 3, 3, 3]
    # (r=8, inflect=-1): from int(8 * 2) = 16 down to 0, truncated
    assert parse_r(5, 8, -1.0) == [16, 12, 8, 4, 0]
    # (r=5, inflect=0.5): from int(2.5) = 2 up to 8 in steps of 1.5 -> 2, 3.5, 5, 6.5, 8 truncated
    assert parse_r(5, 5, 0.5) == [2, 3, 5, 6, 8]
    assert parse_r(4, [5, 2]) == [5, 2, 0, 0]


def brute_force_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """One image at a time with Python lists: returns merged tokens, sizes and each output's members."""
    xs, sizes, groups_all = [], [], []
    n = x.shape[1]
    r = min(r, (n - num_prefix) // 2)
    for b in range(x.shape[0]):
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        a_tokens, b_tokens = list(range(0, n, 2)), list(range(1, n, 2))
        best = {}
        for i in a_tokens:
            choices = [(float(unit[i] @ unit[j]), j) for j in b_tokens if j >= num_prefix]
            best[i] = max(choices) if i >= num_prefix else (-math.inf, None)
        order = sorted(a_tokens, key=lambda i: -best[i][0])
        merged, kept = order[:r], order[r:]
        if num_prefix:  # the official code sorts when there is a class token
            kept = sorted(kept)
        groups = {j: [j] for j in b_tokens}
        for i in merged:
            groups[best[i][1]].append(i)
        prefix = list(range(num_prefix))
        outputs = [[t] for t in prefix] + [[i] for i in kept if i >= num_prefix] + \
                  [sorted(groups[j]) for j in b_tokens if j >= num_prefix]
        xs.append(torch.stack([(x[b, g] * size[b, g]).sum(0) / size[b, g].sum(0) for g in outputs]))
        sizes.append(torch.stack([size[b, g].sum(0) for g in outputs]))
        groups_all.append(outputs)
    return torch.stack(xs), torch.stack(sizes), groups_all


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
def test_matching_agrees_with_brute_force(num_prefix: int) -> None:
    torch.manual_seed(num_prefix)
    x, metric = torch.randn(3, 17, 6), torch.randn(3, 17, 4)
    size = torch.randint(1, 4, (3, 17, 1)).float()
    for r in (1, 4, 100):  # 100 is capped at (17 - prefix) // 2
        merge = bipartite_soft_matching(metric, r, num_prefix)
        got_x, got_size = merge_wavg(merge, x, size)
        want_x, want_size, groups = brute_force_merge(x, metric, size, r, num_prefix)
        assert got_x.shape[1] == 17 - min(r, (17 - num_prefix) // 2)
        torch.testing.assert_close(got_x, want_x)
        torch.testing.assert_close(got_size, want_size)
        torch.testing.assert_close(got_size.sum(1), size.sum(1))  # sizes are conserved
        torch.testing.assert_close(got_x[:, :num_prefix], x[:, :num_prefix])  # prefix tokens untouched, in order
        dest = merge.dest(17)
        for b in range(3):
            for position, members in enumerate(groups[b]):
                assert all(dest[b, m] == position for m in members)


def test_merge_wavg_is_the_size_weighted_mean_by_hand() -> None:
    # 1 class token + 4 tokens; token 1 (A) is most similar to token 2 (B): merging r=1 joins them
    x = torch.tensor([[[0.0], [1.0], [5.0], [7.0], [9.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]])
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [-1.0, 0.3], [0.2, -1.0]]])
    merge = bipartite_soft_matching(metric, 1, num_prefix=1)
    out, new_size = merge_wavg(merge, x, size)
    # A = [cls, t1, t3], B = [t2, t4]; t1 -> t2; output [cls, t3, (t2 + 3 * t1) / 4, t4]
    assert out.flatten().tolist() == [0.0, 9.0, (5.0 + 3 * 1.0) / 4, 7.0]
    assert new_size.flatten().tolist() == [1.0, 1.0, 4.0, 1.0]


def test_protected_tokens_are_never_sources_or_destinations() -> None:
    torch.manual_seed(0)
    metric = torch.randn(4, 21, 8)
    metric[:, :3] = metric[:, 3:4]  # the prefix looks exactly like a patch token: still protected
    for num_prefix in (1, 2, 3):
        merge = bipartite_soft_matching(metric, 9, num_prefix)
        dest = merge.dest(21)
        assert torch.equal(dest[:, :num_prefix], torch.arange(num_prefix).expand(4, -1))
        assert (torch.bincount(dest[0], minlength=21)[:num_prefix] == 1).all()  # nothing else joins them


# ------------------------------------------------------------------------------------------------ student
def tome_student(vit: torch.nn.Module, r: int | list[int], prop_attn: bool = True, **create: object) -> ToMeStudent:
    """A ToMe student with the weights of a given timm ViT."""
    name = create.pop("name", "vit_micro_patch4_32")
    tome_vit = timm.create_model(name, num_classes=10, block_fn=ToMeBlock, attn_layer=ReductionAttention, **create)
    tome_vit.load_state_dict(vit.state_dict())
    return ToMeStudent(tome_vit, r=r, prop_attn=prop_attn).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_equals_dense_timm(variant: str) -> None:
    vit = micro_vit(**VARIANTS[variant])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tome_student(vit, 0, **VARIANTS[variant])(images), vit(images), rtol=0, atol=0)


def test_r0_equals_dense_distilled_deit() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("deit_micro_distilled_patch4_32", num_classes=10).eval()
    student = tome_student(vit, 0, name="deit_micro_distilled_patch4_32")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(images), vit(images), rtol=0, atol=0)
        logits, trace = tome_student(vit, 8, name="deit_micro_distilled_patch4_32")(images, trace=True)
    assert trace.num_prefix_tokens == 2 and trace.tokens[0].tolist() == [66, 58, 50, 42, 34, 26, 18]


@pytest.mark.parametrize("variant", ["plain", "layerscale_no_embed_class", "qk_norm", "registers"])
def test_fused_and_explicit_attention_agree(variant: str) -> None:
    vit = micro_vit(**VARIANTS[variant])
    student = tome_student(vit, 6, **VARIANTS[variant])
    assert_fused_matches_explicit(student, torch.randn(3, 3, 32, 32))


def slow_tome_reference(vit: torch.nn.Module, images: torch.Tensor, r: int, prop_attn: bool) -> torch.Tensor:
    """The official algorithm re-derived with explicit loops: per image, explicit softmax attention with
    log(size), cosine matching by enumeration, size-weighted groups. Supports a class token only."""
    logits = []
    heads = vit.blocks[0].attn.num_heads
    for image in images:
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[0]
        size = torch.ones(x.shape[0])
        for block in vit.blocks:
            h = block.norm1(x)
            q, k, v = block.attn.qkv(h).reshape(x.shape[0], 3, heads, -1).permute(1, 2, 0, 3)
            logit = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if prop_attn:
                logit = logit + size.log()[None, None, :]
            out = (logit.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
            x = x + block.ls1(block.attn.proj(out))
            merged, merged_size, _ = brute_force_merge(x[None], k.mean(0)[None], size[None, :, None], r, 1)
            x, size = merged[0], merged_size[0, :, 0]
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(vit.forward_head(vit.norm(x)[None]))
    return torch.cat(logits)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_student_matches_the_slow_reference(prop_attn: bool) -> None:
    vit = micro_vit(init_values=0.5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = slow_tome_reference(vit, images, 5, prop_attn)
        got = tome_student(vit, 5, prop_attn=prop_attn, init_values=0.5)(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("r,final", [(8, 101), (13, 41), (16, 11)])
def test_deit_small_token_counts(r: int, final: int) -> None:
    model = METHODS["tome"](backbone="deit_small_patch16_224", num_classes=1000, r=r).eval()
    with torch.no_grad():
        _, trace = model.student(torch.randn(1, 3, 224, 224), trace=True)
    counts = trace.tokens[0].tolist()
    assert counts[0] == 197 and counts[-1] == final
    expected, n = [197], 197
    for _ in range(12):
        n -= min(r, (n - 1) // 2)
        expected.append(n)
    assert counts == expected


def test_trace_owners_match_token_sizes() -> None:
    vit = micro_vit()
    student = tome_student(vit, 7)
    with torch.no_grad():
        _, trace = student(torch.randn(2, 3, 32, 32), trace=True)
    for layer, owner in enumerate(trace.owner):
        for b in range(2):
            counts = torch.bincount(owner[b], minlength=int(trace.tokens[b, layer]))
            assert counts[0] == 0 and (counts[1:] >= 1).all()  # every patch token carries >= 1 patch
            assert counts.sum() == 64
    assert torch.equal(trace.mlp_tokens, trace.tokens[:, 1:])  # merging happens before the MLP


def test_no_shared_state_twice_and_with_gradient_checkpointing() -> None:
    vit = micro_vit()
    images = torch.randn(2, 3, 32, 32)
    student = tome_student(vit, 6).train()
    torch.manual_seed(0)
    first = student(images)
    second = student(images)
    torch.testing.assert_close(first, second)
    first.sum().backward()
    grad = student.vit.blocks[2].attn.qkv.weight.grad.clone()
    student.zero_grad()
    student.vit.set_grad_checkpointing(True)
    student(images).sum().backward()
    torch.testing.assert_close(student.vit.blocks[2].attn.qkv.weight.grad, grad)


def test_global_average_pool_is_size_weighted() -> None:
    avg = VARIANTS["avg_pool_no_class_token"]
    vit = micro_vit(**avg)
    student = tome_student(vit, 6, **avg)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x, size = student.forward_blocks(student.embed(images), None)
        x = student.vit.norm(x)
        pooled = (x * size).sum(1) / 64  # every token is a patch token here; sizes add up to 64 patches
        expected = student.vit.head(student.vit.fc_norm(pooled))
        torch.testing.assert_close(student(images), expected)


def test_official_checkpoint_loads(tmp_path: Path) -> None:
    import argparse

    vit = micro_vit()
    torch.save({"model": vit.state_dict(), "args": argparse.Namespace(model="deit_small_patch16_224", r=13)},
               tmp_path / "f367470145_deit_S_r13.pth")
    module = METHODS["tome"](backbone="vit_micro_patch4_32", num_classes=10, r=0,
                             weights=str(tmp_path / "f367470145_deit_S_r13.pth")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(images), vit(images), rtol=0, atol=0)


def test_schedule_strength_scales_r() -> None:
    module = METHODS["tome"](backbone="vit_micro_patch4_32", num_classes=10, r=[8, 6, 4])
    assert module.apply_reduction(0.5) == {"r": (4 + 3 + 2) / 6}
    assert module.student.layer_r() == [4, 3, 2, 0, 0, 0]
    module.apply_reduction(0.0)
    with torch.no_grad():
        _, trace = module.eval().student(torch.randn(1, 3, 32, 32), trace=True)
    assert (trace.tokens == 65).all()


@pytest.mark.slow  # ~50 s; ToMe training is also covered by test_contract's fit, the DDP matrix and test_shared_args
def test_fit_with_tome_learns(in_tmp: Path) -> None:
    assert leanvit("fit", QUICKSTART, *FAST, "method=tome", "model.r=8", "trainer.max_epochs=6",
                   "model.reduction_schedule={start_epoch: 0, shrink_epochs: 2}", "trainer.log_every_n_steps=5") == 0
    from test_training import column, metrics

    rows = metrics(in_tmp / "runs" / "digits" / "dense" / "version_0")
    acc = column(rows, "val/acc1")
    assert acc[-1] > 30 and acc[-1] > acc[0] + 10
    r_logged = column(rows, "train/r")
    assert r_logged[0] < 8 and r_logged[-1] == 8  # annealed in, then constant
    assert column(rows, "tokens/layer_2")[-1] == 65 - 2 * 8
