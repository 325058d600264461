"""PiToMe against its definition re-derived with loops (energies, rankings, the two matching phases, size-weighted
groups), the official r, and DeiT-S token counts. The contract checks (reduction off, fused = explicit, trace,
MACs, training, checkpoints) are in test_contract.py. The official code itself was run on the same weights in a
script (see the README's PiToMe section): same token maps, logits within 1.3e-6."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import METHODS
from lightning_modules.pitome import energy_matching, margins, merge_count

from helpers import micro_vit


def test_merge_count_is_the_official_floor() -> None:
    # floor(T - T * ratio) in float64; int(T * (1 - ratio)) is one less at T = 180, ratio 0.9 (0.1 is inexact)
    assert merge_count(180, 0.9) == 18 and int(180 * (1 - 0.9)) == 17
    assert [merge_count(t, 0.9125) for t in (196, 179, 10, 11, 12)] == [17, 15, 0, 0, 1]
    assert margins(12)[0] == 0.75 and margins(12)[6] == pytest.approx(0.375) and margins(4)[3] == pytest.approx(0.1875)


def slow_matching(keys: torch.Tensor, ratio: float, margin: float, bipartite: bool) -> tuple[list[int], dict[int, int]]:
    """One image, loops: (tokens kept unmerged in output order + destinations, {source: destination}) over the
    T mergeable tokens (no prefix)."""
    t = keys.shape[0]
    unit = [keys[i] / keys[i].norm() for i in range(t)]
    sim = [[float(unit[i] @ unit[j]) for j in range(t)] for i in range(t)]
    energy = [sum(F.elu(torch.tensor(sim[i][j] - margin)).item() for j in range(t)) / t for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])
    r = math.floor(t - t * ratio)
    if bipartite:
        a, b = order[0::2], order[1::2]
        partner = {i: max(b, key=lambda j: sim[i][j]) for i in a}
        ranked = sorted(a, key=lambda i: -sim[i][partner[i]])
        return ranked[r:] + b, {i: partner[i] for i in ranked[:r]}
    a, b = order[0:2 * r:2], order[1:2 * r:2]
    return order[2 * r:] + b, {i: max(b, key=lambda j: sim[i][j]) for i in a}


@pytest.mark.parametrize("bipartite", [True, False])
def test_matching_equals_the_loops(bipartite: bool) -> None:
    torch.manual_seed(0)
    keys = torch.randn(3, 2 + 21, 8)  # 2 protected prefix tokens, 21 mergeable
    merge = energy_matching(keys, 0.8, 0.4, num_prefix=2, bipartite=bipartite)
    dest = merge.dest(23)
    for b in range(3):
        kept, joins = slow_matching(keys[b, 2:], 0.8, 0.4, bipartite)
        assert len(joins) == 4  # floor(21 - 16.8)
        assert dest[b, :2].tolist() == [0, 1]  # the prefix never merges
        assert [int(dest[b, 2 + i]) for i in kept] == list(range(2, 2 + len(kept)))  # output order
        for src, dst in joins.items():
            assert dest[b, 2 + src] == dest[b, 2 + dst]


def slow_pitome_reference(vit: torch.nn.Module, images: torch.Tensor, ratio: float) -> torch.Tensor:
    """The official DeiT computation re-derived per image with loops: explicit softmax attention (no
    proportional attention), the loop matching above, size-weighted group means; class token protected."""
    logits = []
    heads, depth = vit.blocks[0].attn.num_heads, len(vit.blocks)
    for image in images:
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[0]
        size = torch.ones(x.shape[0])
        for layer, block in enumerate(vit.blocks):
            h = block.norm1(x)
            q, k, v = block.attn.qkv(h).reshape(x.shape[0], 3, heads, -1).permute(1, 2, 0, 3)
            out = ((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v).transpose(0, 1)
            x = x + block.ls1(block.attn.proj(out.reshape(x.shape[0], -1)))
            if merge_count(x.shape[0] - 1, ratio) > 0:
                kept, joins = slow_matching(k.mean(0)[1:], ratio, margins(depth)[layer], layer < math.ceil(depth / 2))
                rows, sizes = [x[0]], [size[0]]
                for i in kept:
                    members = [i] + [s for s, d in joins.items() if d == i]
                    weights = torch.stack([size[1 + m] for m in members])
                    rows.append((torch.stack([x[1 + m] for m in members]) * weights[:, None]).sum(0) / weights.sum())
                    sizes.append(weights.sum())
                x, size = torch.stack(rows), torch.stack(sizes)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(vit.forward_head(vit.norm(x)[None]))
    return torch.cat(logits)


@pytest.mark.parametrize("ratio", [0.9125, 0.75])
def test_student_matches_the_slow_reference(ratio: float) -> None:
    vit = micro_vit(init_values=0.5)
    module = METHODS["pitome"](backbone="vit_micro_patch4_32", num_classes=10, ratio=ratio,
                               backbone_kwargs={"init_values": 0.5}).eval()
    module.student.vit.load_state_dict(vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = slow_pitome_reference(vit, images, ratio)
        got = module.student(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_deit_small_token_counts() -> None:
    module = METHODS["pitome"](backbone="deit_small_patch16_224").eval()  # ratio 0.9125, the official default
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, 224, 224), trace=True)
    expected, t = [197], 196
    for _ in range(12):
        t -= math.floor(t - t * 0.9125)
        expected.append(t + 1)
    assert trace.tokens[0].tolist() == expected and expected[-1] == 69
    assert torch.equal(trace.mlp_tokens, trace.tokens[:, 1:])  # merging happens before the MLP


def test_ratio_outside_what_pitome_can_merge_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model.ratio: .*\[0.5, 1\].*0.3"):
        METHODS["pitome"](backbone="vit_micro_patch4_32", num_classes=10, ratio=0.3)
