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
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

from lightning_modules.base import ReductionModule
from lightning_modules.trace import TokenTrace, TraceRecorder
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


@dataclass(frozen=True)
class Merge:
    """One bipartite merge, computed by `bipartite_soft_matching`. Tokens at even positions are set A,
    odd positions set B. Indices are `(B, k, 1)` into A or B."""

    unm_idx: Tensor  # A tokens kept, in output order (the protected prefix tokens first)
    src_idx: Tensor  # A tokens merged away
    dst_idx: Tensor  # the B token each of them joins
    num_prefix: int  # protected tokens in front (class, distillation, registers), never merged

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def __call__(self, x: Tensor, mode: str = "sum") -> Tensor:
        """x: (B, N, C) -> (B, N - r, C): [prefix tokens, unmerged A, B with A merged in by `mode`]."""
        src, dst = x[:, ::2, :], x[:, 1::2, :]
        n, t1, c = src.shape
        p = self.num_prefix
        unm = src.gather(1, self.unm_idx[:, (p + 1) // 2:].expand(n, -1, c))
        src = src.gather(1, self.src_idx.expand(n, self.r, c))
        dst = dst.scatter_reduce(1, self.dst_idx.expand(n, self.r, c), src, reduce=mode)
        # prefix tokens are never sources or destinations: they pass through unchanged, in order (with a
        # class and a distillation token this is the official [cls, dist, unmerged A, B])
        return torch.cat([x[:, :p], unm, dst[:, p // 2:]], dim=1)

    def dest(self, num_tokens: int) -> Tensor:
        """(B, N): the position each input token ends up at (merged tokens: their B partner's)."""
        batch, device = self.unm_idx.shape[0], self.unm_idx.device
        p, t_b = self.num_prefix, num_tokens // 2
        kept_a = self.unm_idx.shape[1] - (p + 1) // 2  # unmerged A tokens after the prefix
        pos_unm = torch.arange(p, p + kept_a, device=device)
        j = torch.arange(t_b, device=device)
        pos_dst = torch.where(j < p // 2, 2 * j + 1, p + kept_a + j - p // 2)  # B-side prefix keeps its place
        dest_a = torch.empty(batch, num_tokens - t_b, dtype=torch.long, device=device)
        dest_a[:, :(p + 1) // 2] = torch.arange(0, 2 * ((p + 1) // 2), 2, device=device)
        dest_a.scatter_(1, self.unm_idx[:, (p + 1) // 2:, 0], pos_unm.expand(batch, -1))
        dest_a.scatter_(1, self.src_idx[..., 0], pos_dst[self.dst_idx[..., 0]])
        dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        dest[:, ::2] = dest_a
        dest[:, 1::2] = pos_dst
        return dest


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> Optional[Merge]:
    """ToMe's matching. metric: (B, N, C) keys averaged over heads -> the merge removing r tokens, or None.

    Each A token (even position) picks its most similar B token (odd position) by cosine similarity; the r
    A tokens with the highest similarity merge into their partners. The first `num_prefix` tokens (class,
    distillation, registers) are never merged: A-side prefix tokens are never sources, B-side ones never
    destinations. r is capped at `(N - num_prefix) // 2`. With prefix tokens the unmerged A tokens keep
    ascending order (the official sort for the class token); without, descending similarity.
    Runs without gradient; the merge itself is differentiable.
    """
    r = min(r, (metric.shape[1] - num_prefix) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2, :], metric[:, 1::2, :]
        scores = a @ b.transpose(-1, -2)  # (B, N_A, N_B)
        if num_prefix:
            scores[:, :(num_prefix + 1) // 2, :] = -math.inf
            scores[:, :, :num_prefix // 2] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:, :]
        src_idx = edge_idx[:, :r, :]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
        if num_prefix:
            unm_idx = unm_idx.sort(dim=1)[0]  # the prefix tokens (lowest A indices) first
    return Merge(unm_idx, src_idx, dst_idx, num_prefix)


def merge_wavg(merge: Merge, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge. x: (B, N, C), size: (B, N, 1) or None (all ones) -> (B, N - r, C), sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


# ------------------------------------------------------------------------------------------------ layers
class ToMeAttention(Attention):
    """timm's Attention that also returns the merge metric (keys averaged over heads) and takes the
    proportional-attention bias `log(size)`: a float mask for SDPA, added to the logits on the explicit path."""

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k.mean(1)


class ToMeBlock(Block):
    """timm's Block with a merge between the attention residual and the MLP.

    forward(x, size, r, record) -> (x, size, dest): `size (B, N, 1)` or None before the first merge,
    `dest` the merge's token map when `record` (for the token trace), else None. The prefix layout and
    `prop_attn` are set by `ToMeStudent` from the model they belong to.
    """

    num_prefix: int = 1
    prop_attn: bool = True

    def forward(self, x: Tensor, size: Optional[Tensor], r: int,  # type: ignore[override]
                record: bool = False) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        bias = None
        if self.prop_attn and size is not None:
            bias = size.log()[:, None, None, :, 0].to(x.dtype)  # (B, 1, 1, N): towards each key j
        x_attn, metric = self.attn(self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(x_attn))
        dest = None
        merge = bipartite_soft_matching(metric, r, self.num_prefix)
        if merge is not None:
            if record:
                dest = merge.dest(x.shape[1])
            x, size = merge_wavg(merge, x, size)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, dest


# ------------------------------------------------------------------------------------------------ student
class ToMeStudent(ViTStudent):
    """A timm ViT with ToMe blocks. `r` (int or per-layer list) and `inflect` follow `parse_r`; `strength`
    scales every layer's r (the keep-rate schedule anneals it from 0 to 1)."""

    def __init__(self, vit: Any, r: RSchedule = 0, inflect: float = 0.0, prop_attn: bool = True) -> None:
        super().__init__(vit)
        self.r = r
        self.inflect = inflect
        self.strength = 1.0
        for block in vit.blocks:
            block.num_prefix = vit.num_prefix_tokens
            block.prop_attn = prop_attn
        check_r(parse_r(self.depth, r, inflect), vit.patch_embed.num_patches, r)

    def layer_r(self) -> list[int]:
        rs = parse_r(self.depth, self.r, self.inflect)
        if self.strength >= 1.0:
            return rs
        return [int(round(self.strength * v)) for v in rs]

    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder]) -> tuple[Tensor, Optional[Tensor]]:
        size: Optional[Tensor] = None
        for block, r in zip(self.vit.blocks, self.layer_r()):
            if recorder is not None:
                recorder.block(x.shape[1])
            x, size, dest = self.run_block(block, x, size, r, recorder is not None)
            if recorder is not None and dest is not None:
                recorder.remap(dest)
                recorder.mlp(x.shape[1])
        return x, size

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """The matching's similarity matmul, N_A x N_B x head_dim, in each block that merged."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        head_dim = self.vit.blocks[0].attn.head_dim
        merged = mlp_tokens < tokens
        scores = torch.ceil(tokens / 2) * torch.floor(tokens / 2) * head_dim
        return (scores * merged).sum(1)

    def forward_head(self, x: Tensor, size: Optional[Tensor]) -> Tensor:
        vit = self.vit
        if size is None or vit.attn_pool is not None or vit.global_pool != "avg":
            return vit.forward_head(x)  # class-token heads read token 0 (never merged)
        # global average pooling weighted by token size: the mean over the original patches (ToMe's MAE patch)
        prefix = self.num_prefix_tokens
        pooled = (x * size)[:, prefix:].sum(dim=1) / size[:, prefix:].sum(dim=1)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))


# ------------------------------------------------------------------------------------------------ module
class ToMeModule(ReductionModule):
    """`METHODS["tome"]`: merge `r` tokens per block (`r_inflect` for ToMe's ramped schedules, or a
    per-layer list). `prop_attn`: proportional attention (on for supervised checkpoints, off for MAE).
    `keep_rate_schedule: {start_epoch, shrink_epochs}` anneals r in with the cosine schedule (off by
    default: the official recipe merges r tokens from step 0)."""

    def __init__(
        self,
        *,
        r: RSchedule = 13,
        r_inflect: float = 0.0,
        prop_attn: bool = True,
        keep_rate_schedule: Optional[dict[str, float]] = None,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if not -1.0 <= r_inflect <= 1.0:
            raise ValueError(f"model.r_inflect: expected a value in [-1, 1], got {r_inflect}")
        self.keep_rate_schedule = keep_rate_schedule
        self.build_student(ToMeStudent, block_fn=ToMeBlock, vit_kwargs={"attn_layer": ToMeAttention},
                           r=r, inflect=r_inflect, prop_attn=prop_attn)

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.student.strength = alpha
        rs = self.student.layer_r()
        return {"r": sum(rs) / len(rs)}
