"""MCTF against its definition re-derived with loops (scores, bidirectional matching, attention x size pooling, the
one-step-ahead attention, the output order), the official token counts by hand, the fusion's token map, the
training losses, official checkpoints. The contract checks are in test_contract.py; the official code itself was run
on the same DeiT-T/S weights in a script (README, MCTF section)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_modules import METHODS
from lightning_modules.mctf import fuse, match, mctf_scores, merge_count

TAUS = (1.0, 20.0, 40.0)


def test_merge_count_by_hand() -> None:
    assert merge_count(197, 16, 1) == 16
    assert [merge_count(t, 0.35, 1) for t in (197, 129, 85)] == [68, 44, 29]  # 196 x 0.35 = 68.6 -> 68, ...
    assert merge_count(37, 16, 1) == 16 and merge_count(21, 16, 1) == 10  # 21 - 16 < 10: r = 21 - 10 = 11 -> 10 cap
    assert merge_count(15, 16, 1) == 5 and merge_count(10, 16, 1) == 0 and merge_count(8, 16, 1) == 0
    assert merge_count(197, 200, 1) == 98  # at most half the non-prefix tokens
    assert merge_count(66, 8, 2) == 8 and merge_count(66, 0.5, 2) == 32


@pytest.mark.parametrize(("r", "layers", "expected"), [
    (16, None, [197, 197] + [181 - 16 * i for i in range(11)]),
    (0.35, [3, 6, 9], [197] * 4 + [129] * 3 + [85] * 3 + [56] * 3),
])
def test_deit_small_token_counts(r: float, layers: list[int] | None, expected: list[int]) -> None:
    """The official counts per block (class token included) for MCTF and MCTF-Fast on DeiT-S at 224 px."""
    module = METHODS["mctf"](backbone="deit_small_patch16_224", r=r, reduction_layers=layers).eval()
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, 224, 224), trace=True)
    assert trace.tokens[0].tolist() == expected


def test_fusion_token_map_follows_the_merge() -> None:
    """Merging the identity (the official `source` matrix) through a fusion puts each token's 1 where `dest` says."""
    torch.manual_seed(0)
    for prefix, bidirection in ((1, True), (2, True), (1, False), (0, True)):
        x = torch.randn(3, 21, 8)
        received = torch.rand(3, 21) + 0.1
        scores = mctf_scores(x, received, torch.randint(1, 4, (3, 21, 1)).float(), prefix, *TAUS)
        fusion = match(scores, 6, prefix, bidirection)
        source = fusion(torch.eye(21).expand(3, 21, 21), mode="amax")  # (B, 15, 21)
        assert source.shape == (3, 15, 21)
        assert torch.equal(source.argmax(1), fusion.dest(21))
        assert torch.equal(fusion.dest(21)[:, :prefix], torch.arange(prefix).expand(3, -1))  # prefix stays in front


def test_one_step_ahead_attention_rows_stay_distributions() -> None:
    torch.manual_seed(1)
    probs = torch.randn(2, 3, 17, 17).softmax(-1)
    x, size = torch.randn(2, 17, 8), torch.randint(1, 5, (2, 17, 1)).float()
    fusion = match(mctf_scores(x, probs.mean((1, 2)), size, 1, *TAUS), 5, 1)
    for pooling in (0, 1, 3):
        merged, new_size, ahead = fuse(fusion, x, size, probs, pooling)
        assert ahead is not None and ahead.shape == (2, 3, 12, 12)
        torch.testing.assert_close(ahead.sum(-1), torch.ones(2, 3, 12))
        assert torch.equal(new_size.sum(1), size.sum(1))  # sizes count original tokens


# ------------------------------------------------------------------------------------------------ slow reference
def slow_mctf_logits(vit: torch.nn.Module, image: torch.Tensor, r: int, layers: list[int],
                     prefix: int) -> tuple[torch.Tensor, list[list[int]]]:
    """MCTF on one image, written from its definition with explicit loops (no leanvit code): logits and, for every
    final token, the patches it carries."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[0]  # (T, C)
    carried = [[] for _ in range(prefix)] + [[i] for i in range(x.shape[0] - prefix)]
    size = None
    for layer, block in enumerate(vit.blocks):
        attn = block.attn
        heads, hd = attn.num_heads, attn.head_dim
        t = x.shape[0]

        def probabilities(h: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:  # (H, T, T)
            q, k, _ = (h @ attn.qkv.weight.T + attn.qkv.bias).reshape(h.shape[0], 3, heads, hd).permute(1, 2, 0, 3)
            logits = (q @ k.transpose(-1, -2)) * attn.scale
            if sizes is not None:
                logits = logits + sizes.log()[None, None, :]
            return logits.softmax(-1)

        def branch(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            v = (h @ attn.qkv.weight.T + attn.qkv.bias).reshape(h.shape[0], 3, heads, hd)[:, 2].transpose(0, 1)
            return attn.proj((probs @ v).transpose(0, 1).reshape(h.shape[0], heads * hd))

        count = merge_count(t, r, prefix) if layer in layers else 0
        probs = probabilities(block.norm1(x), size)
        if count == 0:
            x = x + branch(block.norm1(x), probs)
            x = x + block.mlp(block.norm2(x))
            continue
        m = probs.mean((0, 1))  # attention received
        info = (1 / m) / (1 / m).max()
        sizes = size if size is not None else torch.ones(t, dtype=x.dtype)
        small = (1 / sizes) / (1 / sizes).max()
        unit = x / x.norm(dim=-1, keepdim=True)
        a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))

        def score(a: int, b: int) -> float:
            if a < prefix or b < prefix:
                return -math.inf
            value = ((unit[a] @ unit[b] + 1) / 2) ** (1 / TAUS[0]) * (info[a] * info[b]) ** (1 / TAUS[1])
            return float(value * ((small[a] * small[b]) ** (1 / TAUS[2]) if size is not None else 1))

        table = {(a, b): score(a, b) for a in a_pos for b in b_pos}
        r1, r2 = count // 2, count - count // 2
        best_b = {a: max(b_pos, key=lambda b: table[a, b]) for a in a_pos}
        a_order = sorted(a_pos, key=lambda a: -table[a, best_b[a]])
        sources1 = a_order[:r1]
        unmerged_a = sorted(a_order[r1:])
        b_free = [b for b in b_pos if b >= prefix]
        best_a = {b: max(unmerged_a, key=lambda a: table[a, b]) for b in b_free}
        b_order = sorted(b_free, key=lambda b: -table[best_a[b], b])
        sources2, unmerged_b = b_order[:r2], b_order[r2:]
        members = {b: [b] + [a for a in sources1 if best_b[a] == b] for b in b_pos}
        groups = [[p] for p in range(prefix)]
        groups += [[a] + [j for b in sources2 if best_a[b] == a for j in members[b]] for a in unmerged_a if a >= prefix]
        groups += [members[b] for b in unmerged_b]
        weight = m * sizes / sizes.max()
        new_x = torch.stack([sum(weight[j] * x[j] for j in g) / sum(weight[j] for j in g) for g in groups])
        ahead = torch.stack([torch.stack([sum(weight[i] * probs[:, i, g2].sum(-1) for i in g)
                                          / sum(weight[i] for i in g) for g2 in groups], -1) for g in groups], 1)
        size = torch.stack([sizes[g].sum() for g in groups])
        carried = [sum((carried[j] for j in g), []) for g in groups]
        x = new_x + branch(block.norm1(new_x), ahead)
        x = x + block.mlp(block.norm2(x))
    return vit.forward_head(vit.norm(x)[None])[0], carried


@pytest.mark.parametrize("backbone", ["vit_micro_patch4_32", "deit_micro_distilled_patch4_32"])
def test_student_matches_the_slow_reference(backbone: str) -> None:
    """Every logit and merge group of the student equals the loops above (float64: no near tie decides)."""
    torch.manual_seed(3)
    module = METHODS["mctf"](backbone=backbone, num_classes=10, backbone_kwargs={"depth": 4}, r=6,
                             reduction_layers=[1, 2, 3]).double().eval()
    for block in module.student.vit.blocks:  # peakier attention than a fresh init, so informativeness matters
        block.attn.qkv.weight.data *= 4
    prefix = module.student.num_prefix_tokens
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, trace = module.student(images, trace=True)
        for b in range(2):
            expected, carried = slow_mctf_logits(module.student.vit, images[b], 6, [1, 2, 3], prefix)
            torch.testing.assert_close(logits[b], expected, rtol=0, atol=1e-10)
            owner = trace.owner[-1][b]
            assert [sorted(int(i) for i in torch.nonzero(owner == position)[:, 0]) for position in
                    range(prefix, prefix + len(carried) - prefix)] == [sorted(c) for c in carried[prefix:]]
    assert trace.tokens[0].tolist() == [64 + prefix, 64 + prefix, 58 + prefix, 52 + prefix, 46 + prefix]


# ------------------------------------------------------------------------------------------------ training
def test_training_branch_and_losses_by_hand() -> None:
    """The teacher branch draws r as the official code (one randint per pass, below r_teacher_max), runs the same
    network at that r; `teacher` is its cross-entropy, `consistency` the squared class-token distance over the images
    whose true-label probability passes the threshold."""
    torch.manual_seed(0)
    module = METHODS["mctf"](backbone="vit_micro_patch4_32", num_classes=10, backbone_kwargs={"depth": 4}, r=6,
                             reduction_layers=[1, 2, 3], drop_path_rate=0.0, r_teacher_max=5,
                             consistency_threshold=0.1).eval()
    images, targets = torch.randn(6, 3, 32, 32), torch.arange(6)
    torch.manual_seed(11)
    drawn = int(torch.randint(0, 5, (1,)))
    torch.manual_seed(11)
    out = module.student.run(images, train=True)
    branch = out.loss_inputs
    assert branch is not None
    with torch.no_grad():
        module.student.r = drawn  # the branch is the same network at the drawn r
        teacher_logits = module.student(images)
        module.student.r = 6
    torch.testing.assert_close(branch.logits, teacher_logits)
    terms = module.reduction_terms(out, images, targets)
    torch.testing.assert_close(terms["teacher"], F.cross_entropy(teacher_logits, targets, label_smoothing=0.1))
    passed = (out.logits.softmax(-1)[torch.arange(6), targets] > 0.1).float()
    distance = ((branch.cls - branch.student_cls) ** 2).mean(1)
    expected = (distance * passed).sum() / passed.sum() if passed.sum() else torch.zeros(())
    torch.testing.assert_close(terms["consistency"], expected)
    assert module.loss_weights() == {"cls": 1.0, "teacher": 1.0, "consistency": 3.0}
    fraction = METHODS["mctf"](backbone="vit_micro_patch4_32", num_classes=10, r_teacher_max=0.3).student
    torch.manual_seed(4)
    assert fraction.teacher_r() == int(torch.randint(0, 30, (1,), generator=torch.Generator().manual_seed(4))) / 100
    no_branch = METHODS["mctf"](backbone="vit_micro_patch4_32", num_classes=10, teacher_weight=0.0,
                                consistency_weight=0.0)
    assert no_branch.student.run(images, train=True).loss_inputs is None


def test_official_checkpoint_loads(tmp_path: Path) -> None:
    """An official MCTF checkpoint (main.py's savepoint: 'model' with timm's DeiT keys, 'args' as an argparse
    Namespace, the EMA as a one-element tuple) initialises the student."""
    torch.manual_seed(0)
    state = timm.create_model("vit_micro_patch4_32", num_classes=10).state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "args": argparse.Namespace(mctf_type=[16, 8, 0, 1, 1, 1, 20, 40, 1, 1, 0]),
                "state_dict_ema": (state,), "epoch": 29}, path)
    module = METHODS["mctf"](backbone="vit_micro_patch4_32", num_classes=10, weights=str(path))
    assert all(torch.equal(module.student.vit.state_dict()[k], v) for k, v in state.items())


def test_bad_settings_name_their_key() -> None:
    for kwargs, key in (({"one_step_ahead": 0}, "one_step_ahead"), ({"pooling_type": 4}, "pooling_type"),
                        ({"r": -1}, "r"), ({"tau_info": -1.0}, "tau_info")):
        with pytest.raises(ValueError, match=f"model.{key}:"):
            METHODS["mctf"](backbone="vit_micro_patch4_32", num_classes=10, **kwargs)
