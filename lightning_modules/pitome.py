"""PiToMe: token merging protected by an energy score (Tran et al., NeurIPS 2024), faithful to hchautran/PiToMe
(`algo/pitome`, its DeiT/timm patch).

In every block, between the attention residual and the MLP, r = floor(T - T * ratio) of the T mergeable
tokens are merged. Each token's energy is the mean over all tokens of ELU(cosine(k_i, k_j) - margin), keys
averaged over heads; tokens are ranked by energy, highest first. In the first ceil(depth / 2) blocks the
whole ranking is split into A (even ranks) and B (odd ranks) and the r A tokens with the most similar B
partners merge into them (ToMe's bipartite matching, unmerged A kept in that similarity order); in the later
blocks only the top 2r tokens are mergeable (even ranks into their most similar odd-rank token) and the others
are protected, kept in energy order. Merges are size-weighted averages; the official DeiT patch has no
proportional attention (`prop_attn: true` adds ToMe's). Margin 0.75 - 0.75 l / depth, ELU alpha 1.

Differences from the official code, none changing its results on DeiT: LayerScale, qk-norm and fused attention
are honoured; the distillation token and registers are protected like the class token (the official patch
protects the class token only, so on a distilled DeiT it can merge the distillation token).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import ReductionModule
from lightning_modules.layers import ReductionBlock
from lightning_modules.ops import GatherMerge, merge_wavg, size_bias
from lightning_modules.trace import TokenTrace
from lightning_modules.vit import ViTStudent


# ------------------------------------------------------------------------------------------------ pure ops
def merge_count(num_tokens: int, ratio: float) -> int:
    """The official r: floor(T - T * ratio) in float64 (`int(T * (1 - ratio))` is one less when T is a multiple
    of 10 at ratio 0.9)."""
    return math.floor(num_tokens - num_tokens * ratio)


def margins(depth: int) -> list[float]:
    """The energy margin of each block: 0.75 - 0.75 * l / depth."""
    return [0.75 - 0.75 * (layer / depth) for layer in range(depth)]


def energy_ranking(metric: Tensor, margin: float, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """metric: (B, T, D) keys of the mergeable tokens -> cosine similarities (B, T, T) and the tokens ordered by
    energy `mean_j ELU(cos_ij - margin)`, highest first (B, T)."""
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
    return sim, torch.argsort(energy, dim=-1, descending=True)


def pairwise(sim: Tensor, a_idx: Tensor, b_idx: Tensor) -> Tensor:
    """sim (B, T, T) restricted to rows a_idx (B, nA) and columns b_idx (B, nB) -> (B, nA, nB)."""
    rows = sim.gather(1, a_idx[..., None].expand(-1, -1, sim.shape[2]))
    return rows.gather(2, b_idx[:, None, :].expand(-1, a_idx.shape[1], -1))


def energy_matching(metric: Tensor, ratio: float, margin: float, num_prefix: int, bipartite: bool) -> GatherMerge:
    """PiToMe's merge for one block. metric: (B, N, D) keys averaged over heads (prefix tokens included)."""
    with torch.no_grad():
        sim, order = energy_ranking(metric[:, num_prefix:], margin)  # (B, T, T), (B, T)
        r = merge_count(order.shape[1], ratio)
        if bipartite:  # the whole ranking: A = even ranks, B = odd ranks, the r best-matched A tokens merge
            a_idx, b_idx = order[:, ::2], order[:, 1::2]
            best, partner = pairwise(sim, a_idx, b_idx).max(dim=-1)  # (B, nA): each A token's best B partner
            edge = torch.argsort(best, dim=-1, descending=True)  # (B, nA) A tokens by similarity, highest first
            src = edge[:, :r]
            return GatherMerge(kept_idx=a_idx.gather(1, edge[:, r:]), src_idx=a_idx.gather(1, src), dst_idx=b_idx,
                               dst_of_src=partner.gather(1, src), num_prefix=num_prefix)
        mergeable = order[:, :2 * r]  # the 2r highest energies; every even-rank one merges into an odd-rank one
        a_idx, b_idx = mergeable[:, ::2], mergeable[:, 1::2]
        partner = pairwise(sim, a_idx, b_idx).argmax(dim=-1)  # (B, r)
        return GatherMerge(kept_idx=order[:, 2 * r:], src_idx=a_idx, dst_idx=b_idx, dst_of_src=partner,
                           num_prefix=num_prefix)


# ------------------------------------------------------------------------------------------------ layers
class PiToMeBlock(ReductionBlock[Optional[Tensor], Optional[float]]):
    """timm's Block with PiToMe's merge between the attention residual and the MLP. setting: the ratio (1: the
    dense block); state: token sizes `(B, N, 1)`. `margin` and `bipartite` are set by `PiToMeStudent`."""

    margin: float = 0.5
    bipartite: bool = True
    prop_attn: bool = False

    def reduce(self, x: Tensor, size: Optional[Tensor], ratio: Optional[float], record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        if ratio is None or merge_count(x.shape[1] - self.num_prefix, ratio) <= 0:
            return self.dense(x, rope), size, None  # (the official code re-orders the tokens here and merges nothing)
        bias = size_bias(size, x.dtype) if self.prop_attn else None  # (B, 1, 1, N): towards each key j
        attn = self.attn.forward_reduce(self.norm1(x), bias, keys=True, rope=rope)
        x = x + self.drop_path1(self.ls1(attn.x))
        assert attn.keys is not None  # asked for above
        merge = energy_matching(attn.keys, ratio, self.margin, self.num_prefix, self.bipartite)
        dest = merge.dest(x.shape[1]) if record else None
        x, size = merge_wavg(merge, x, size)
        return self.mlp_residual(x), size, dest


# ------------------------------------------------------------------------------------------------ student
class PiToMeStudent(ViTStudent):
    """A timm ViT with PiToMe blocks merging `ratio` per block."""

    def __init__(self, vit: Any, ratio: float = 0.9125, prop_attn: bool = False) -> None:
        super().__init__(vit)
        self.ratio = ratio
        bipartite_blocks = math.ceil(self.depth * 0.5)  # the official split: the first half matches bipartitely
        for layer, (block, margin) in enumerate(zip(vit.blocks, margins(self.depth))):
            block.margin = margin
            block.bipartite = layer < bipartite_blocks
            block.prop_attn = prop_attn

    def layer_settings(self) -> list[float]:
        return [self.ratio] * self.depth

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """The energy's similarity matmul, T x T x head_dim over the T mergeable tokens, in each merging block."""
        tokens = trace.tokens[:, :-1].double()
        merged = trace.mlp_tokens.double() < tokens
        mergeable = tokens - self.num_prefix_tokens
        return (mergeable * mergeable * self.attention().head_dim * merged).sum(1)

    def forward_head(self, x: Tensor, size: Optional[Tensor]) -> Tensor:
        return self.size_weighted_head(x, size)


# ------------------------------------------------------------------------------------------------ module
class PiToMeModule(ReductionModule):
    """`METHODS["pitome"]`: merge r = floor(T (1 - ratio)) tokens per block (`ratio`, the official
    `model.ratio`, default 0.9125), energy-protected. `prop_attn`: ToMe's proportional attention (off, as the
    official DeiT patch). `reduction_schedule` anneals the ratio from 1 to its target."""

    student: PiToMeStudent

    setting_keys = ("ratio",)
    off_settings = {"ratio": 1.0}
    demo_settings = {"ratio": 0.8}

    def __init__(self, *, ratio: float = 0.9125, prop_attn: bool = False, **shared: Any) -> None:
        super().__init__(**shared)
        if not 0.5 <= ratio <= 1.0:
            raise ValueError(f"model.ratio: expected the fraction of tokens each block keeps in [0.5, 1] (PiToMe "
                             f"merges at most half), got {ratio!r}")
        self.target_ratio = ratio
        self.build_student(PiToMeStudent, block_fn=PiToMeBlock, ratio=ratio, prop_attn=prop_attn)

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.student.ratio = 1.0 - alpha * (1.0 - self.target_ratio)
        return {"ratio": self.student.ratio}
