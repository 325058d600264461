"""ToMe: Token Merging (Bolya et al., ICLR 2023), faithful to facebookresearch/ToMe.

Inside every block, between the attention residual and the MLP, the r most similar tokens of an even/odd
bipartite split are merged (size-weighted averages, sizes carried through the network); proportional
attention adds log(size) to the attention logits. Works off the shelf and trained.

Differences from the official code, none changing its results on the models it supports: LayerScale,
qk-norm and fused attention are honoured (the official patch silently skips them on current timm),
register tokens are protected like the class and distillation tokens, and no state is shared between
forward calls (gradient checkpointing and `forward_features` work).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_modules.base import ReductionModule
from lightning_modules.layers import ReductionBlock
from lightning_modules.ops import Merge, bipartite_soft_matching, merge_wavg, size_bias  # noqa: F401  (Merge: re-exported)
from lightning_modules.trace import TokenTrace
from lightning_modules.vit import ViTStudent

log = logging.getLogger(__name__)

RSchedule = Union[int, list[int]]


# ------------------------------------------------------------------------------------------------ pure ops
def parse_r(num_layers: int, r: RSchedule, inflect: float = 0.0) -> list[int]:
    """ToMe's r schedule -> tokens to merge in each layer.

    int r with inflect 0: constant. int r with inflect in [-1, 1]: a linear ramp from `int(r * (1 - inflect))`
    to `2r - that`, truncated with int (inflect -1 is the paper's decreasing schedule). A list: per layer,
    zero-padded to num_layers.
    """
    if isinstance(r, (list, tuple)):
        return [int(v) for v in r] + [0] * (num_layers - len(r))
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(1, num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


def merges_done(rs: list[int], num_patches: int) -> list[int]:
    """The merges each layer can do: ToMe caps a layer's r at half the mergeable tokens entering it."""
    done, tokens = [], num_patches  # mergeable tokens (the protected prefix never merges)
    for r in rs:
        done.append(min(r, tokens // 2))
        tokens -= done[-1]
    return done


def check_r(rs: list[int], num_patches: int, r: RSchedule) -> None:
    """A negative r is an error; an r the tokens cannot give is capped (as the official ToMe does) with a warning."""
    if isinstance(r, (list, tuple)) and len(r) > len(rs):
        raise ValueError(f"model.r: {len(r)} values for a {len(rs)}-block model")
    if any(v < 0 for v in rs):
        raise ValueError(f"model.r: expected tokens to merge per block >= 0, got {r!r}")
    done = merges_done(rs, num_patches)
    if done != rs:
        first = next(i for i, (a, b) in enumerate(zip(done, rs)) if a != b)
        log.warning("model.r: %s asks more merges than the %d patch tokens allow from block %d on; capped as the "
                    "official ToMe does, to %s", r, num_patches, first, done)


# ------------------------------------------------------------------------------------------------ layers
class ToMeBlock(ReductionBlock[Optional[Tensor], Optional[int]]):
    """timm's Block with a merge between the attention residual and the MLP.

    setting: r, the tokens to merge; state: token sizes `(B, N, 1)`, None before the first merge. The
    attention gets the proportional-attention bias `log(size)` when `prop_attn` (set by `ToMeStudent`).
    """

    prop_attn: bool = True

    def reduce(self, x: Tensor, size: Optional[Tensor], r: Optional[int], record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        bias = size_bias(size, x.dtype) if self.prop_attn else None  # (B, 1, 1, N): towards each key j
        attn = self.attn.forward_reduce(self.norm1(x), bias, keys=True, rope=rope)  # keys as attention sees them
        x = x + self.drop_path1(self.ls1(attn.x))
        dest = None
        assert attn.keys is not None  # asked for above
        merge = bipartite_soft_matching(attn.keys, r or 0, self.num_prefix)
        if merge is not None:
            if record:
                dest = merge.dest(x.shape[1])
            x, size = merge_wavg(merge, x, size)
        return self.mlp_residual(x), size, dest


# ------------------------------------------------------------------------------------------------ student
class ToMeStudent(ViTStudent):
    """A timm ViT with ToMe blocks. `r` (int or per-layer list) and `inflect` follow `parse_r`; `strength`
    scales every layer's r (the reduction schedule anneals it from 0 to 1)."""

    def __init__(self, vit: Any, r: RSchedule = 0, inflect: float = 0.0, prop_attn: bool = True) -> None:
        super().__init__(vit)
        self.r = r
        self.inflect = inflect
        self.strength = 1.0
        for block in vit.blocks:
            block.prop_attn = prop_attn
        check_r(parse_r(self.depth, r, inflect), vit.patch_embed.num_patches, r)

    def layer_r(self) -> list[int]:
        rs = parse_r(self.depth, self.r, self.inflect)
        if self.strength >= 1.0:
            return rs
        return [int(round(self.strength * v)) for v in rs]

    def layer_settings(self) -> list[int]:
        return self.layer_r()

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """The matching's similarity matmul, N_A x N_B x head_dim, in each block that merged."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        head_dim = self.attention().head_dim
        merged = mlp_tokens < tokens
        scores = torch.ceil(tokens / 2) * torch.floor(tokens / 2) * head_dim
        return (scores * merged).sum(1)

    def forward_head(self, x: Tensor, size: Optional[Tensor]) -> Tensor:
        return self.size_weighted_head(x, size)


# ------------------------------------------------------------------------------------------------ module
class ToMeModule(ReductionModule):
    """`METHODS["tome"]`: merge `r` tokens per block (`r_inflect` for ToMe's ramped schedules, or a
    per-layer list). `prop_attn`: proportional attention (on for supervised checkpoints, off for MAE).
    `reduction_schedule: {start_epoch, shrink_epochs}` anneals r in with the cosine schedule (off by
    default: the official recipe merges r tokens from step 0)."""

    student: ToMeStudent

    static_shapes = True
    setting_keys = ("r",)
    off_settings = {"r": 0}
    demo_settings = {"r": 6}

    def __init__(
        self,
        *,
        r: RSchedule = 13,
        r_inflect: float = 0.0,
        prop_attn: bool = True,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if not -1.0 <= r_inflect <= 1.0:
            raise ValueError(f"model.r_inflect: expected a value in [-1, 1], got {r_inflect}")
        self.build_student(ToMeStudent, block_fn=ToMeBlock, r=r, inflect=r_inflect, prop_attn=prop_attn)

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.student.strength = alpha
        rs = self.student.layer_r()
        return {"r": sum(rs) / len(rs)}
