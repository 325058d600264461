"""The attention and block every reduction method builds on (the method contract, part 1).

`ReductionAttention` is timm's `Attention` (its own `forward` is untouched: with no reduction a block runs
exactly timm's code) plus `forward_reduce`, which gives what token reduction needs beside fused SDPA: the
keys averaged over heads (ToMe's matching metric), the class token's attention row, a float bias or a
boolean mask on the logits, or a replacement softmax (DynamicViT's policy softmax). It calls every timm
submodule (qkv, q/k norms, scale norm, gate, proj, dropouts), so LayerScale, qk-norm and gated models work
for every method.

`ReductionBlock[State, Setting]` is timm's `Block` (its `forward` is timm's, the dense block) plus
`reduce(x, state, setting, record, rope) -> (x, state, dest)`: one block with the method's reduction.
`ViTStudent.forward_blocks` drives it and keeps the token trace.

timm's `Eva` family (EVA-02, DINOv3, Perception Encoder) has no `block_fn`: `convert_eva` turns its built blocks
into a method's blocks in place (as the official ToMe patch does, by setting `__class__`), with the same weights.
Its rotary position embedding (RoPE) reaches the attention as `rope`: the table for the tokens after the prefix,
`(N - p, D)`, `(H, N - p, D)` or, once tokens moved, `(B, 1 or H, N - p, D)` (see `ops.mean_rope`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Optional, TypeVar, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block
from torch import Tensor, nn


def class_attention(q_cls: Tensor, k: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
    """The class token's attention probabilities, averaged over heads. q_cls: (B, H, 1, D), k: (B, H, N, D),
    bias: None or broadcastable to (B, H, 1, N) -> (B, N). One query row: O(N) next to the attention itself."""
    logits = (q_cls * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


@dataclass
class AttentionOutput:
    x: Tensor  # (B, N, C) the attention branch's output (after proj), as timm's forward returns it
    keys: Optional[Tensor] = None  # (B, N, D) keys (after k_norm) averaged over heads, when asked
    cls_attn: Optional[Tensor] = None  # (B, N) the class token's attention row averaged over heads, when asked


class ReductionAttentionOps(nn.Module):
    """What every reduction attention adds to its timm attention class (timm's `Attention`, Eva's `EvaAttention`,
    `AttentionRope`): `forward_reduce`, `attend`, `project`. Subclasses say how the packed qkv is computed."""

    # what the timm classes define (declared for the type checker)
    num_heads: int
    head_dim: int
    scale: float
    rotate_half: bool = False  # RoPE layout (Eva's `rotate_half`)
    q_norm: nn.Module
    k_norm: nn.Module
    attn_drop: nn.Dropout
    norm: nn.Module
    gate: Optional[nn.Linear]
    proj: nn.Linear
    proj_drop: nn.Dropout

    @property
    def fused(self) -> bool:
        """Whether this attention runs through fused SDPA (timm's `fused_attn`, set by its constructor)."""
        return bool(getattr(self, "fused_attn"))

    @property
    def heads_width(self) -> int:
        """num_heads x head_dim: the width of q, k, v and of the heads' output (timm's `attn_dim`; Eva has none)."""
        return self.num_heads * self.head_dim

    def packed_qkv(self, x: Tensor) -> Tensor:
        """x: (..., C) -> (..., 3 heads_width): q, k, v as the timm class computes them (one fused projection, or
        Eva's three)."""
        qkv = getattr(self, "qkv", None)
        if qkv is None:
            return torch.cat([getattr(self, f"{name}_proj")(x) for name in "qkv"], dim=-1)
        return qkv(x)

    def packed_weight_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        """The fused q/k/v projection's weight `(3 heads_width, C)` and effective bias (timm's `qkv`)."""
        qkv = getattr(self, "qkv")
        return qkv.weight, qkv.bias

    def qkv_part(self, x: Tensor, parts: slice) -> Tensor:
        """x: (..., C) -> the projections `parts` of (q, k, v) only, e.g. `slice(0, 2)`: q and k `(..., 2 heads_width)`
        (MCTF computes q, k before a merge and v after it)."""
        if getattr(self, "qkv", None) is None:  # Eva's separate projections
            return torch.cat([getattr(self, f"{name}_proj")(x) for name in "qkv"[parts]], dim=-1)
        weight, bias = self.packed_weight_bias()
        rows = slice(parts.start * self.heads_width, parts.stop * self.heads_width)
        return F.linear(x, weight[rows], None if bias is None else bias[rows])

    def attention_probs(self, x: Tensor, bias: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
        """The attention probabilities of x: (B, N, C) -> (B, H, N, N), per head, with the float `bias` on the logits
        (q and k as the timm class computes them: norms, RoPE), explicitly: for a method that reads or reuses them."""
        B, N, _ = x.shape
        qk = self.qkv_part(x, slice(0, 2)).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(qk[0]), self.k_norm(qk[1])
        if rope is not None:
            q, k = self.rotate(q, rope).type_as(qk), self.rotate(k, rope).type_as(qk)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
        return (logits if bias is None else logits + bias).softmax(dim=-1)

    def values(self, x: Tensor) -> Tensor:
        """The values of x: (B, N, C) -> (B, H, N, D)."""
        B, N, _ = x.shape
        return self.qkv_part(x, slice(2, 3)).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def attend_probs(self, x: Tensor, probs: Tensor) -> Tensor:
        """The attention branch of x: (B, N, C) with given probabilities `probs (B, H, N, N)` (values computed here,
        attention dropout, scale norm, gate, proj) -> (B, N, C)."""
        B, N, _ = x.shape
        out = (self.attn_drop(probs) @ self.values(x)).transpose(1, 2).reshape(B, N, self.heads_width)
        return self.project(x, out)

    def forward_reduce(self, x: Tensor, bias: Optional[Tensor] = None, *, keys: bool = False,
                       cls_attn: bool = False, softmax: Optional[Callable[[Tensor], Tensor]] = None,
                       rope: Optional[Tensor] = None) -> AttentionOutput:
        """x: (B, N, C); bias: a float (added) or bool (True = attend) mask broadcastable to (B, H, N, N).
        `softmax` replaces the softmax on the logits and forces the explicit path; `rope` rotates q and k."""
        B, N, _ = x.shape
        qkv = self.packed_qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, k, row = self.attend(qkv, bias, cls_attn=cls_attn, softmax=softmax, rope=rope)
        out = out.transpose(1, 2).reshape(B, N, self.heads_width)
        return AttentionOutput(self.project(x, out), k.mean(1) if keys else None, row)

    def attend(self, qkv: Tensor, mask: Optional[Tensor] = None, *, cls_attn: bool = False,
               softmax: Optional[Callable[[Tensor], Tensor]] = None,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """qkv: (3, B, H, N, D) -> (attention output (B, H, N, D), normed (and rotated) keys (B, H, N, D), class
        row (B, N)). `rope (..., M, 2 D)` rotates the last M tokens (those after the prefix), as timm's Eva."""
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.rotate(q, rope).type_as(v), self.rotate(k, rope).type_as(v)
        row = None
        if self.fused and softmax is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
            if cls_attn:
                bias = mask if mask is None or mask.dtype != torch.bool else _bool_bias(mask, q.dtype)
                row = class_attention(q[:, :, :1], k, self.scale, None if bias is None else bias[..., :1, :])
            return out, k, row
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        if mask is not None:
            attn = attn.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else attn + mask
        attn = softmax(attn) if softmax is not None else attn.softmax(dim=-1)
        if cls_attn:
            row = attn[:, :, 0].mean(dim=1)
        return self.attn_drop(attn) @ v, k, row

    def project(self, inputs: Tensor, out: Tensor) -> Tensor:
        """The attention output `(..., heads_width)` -> the branch output: scale norm, gate (from the branch's
        inputs), proj, dropout, as timm's forward ends."""
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(inputs).sigmoid()
        return self.proj_drop(self.proj(out))

    def rotate(self, t: Tensor, rope: Tensor) -> Tensor:
        """t: (B, H, N, D); rope: (..., M, 2 D) -> t with its last M tokens rotated (Eva's `apply_rot_embed_cat`)."""
        first = t.shape[2] - rope.shape[-2]
        return torch.cat([t[:, :, :first], apply_rot_embed_cat(t[:, :, first:], rope, half=self.rotate_half)], dim=2)


class ReductionAttention(ReductionAttentionOps, Attention):
    """timm's Attention with `forward_reduce`, `attend` and `project` for token-reduction methods."""


class EvaReductionAttention(ReductionAttentionOps, EvaAttention):
    """timm's EvaAttention (EVA-02: separate q/k/v projections, k without bias) with the reduction methods."""

    def packed_weight_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        assert self.qkv is not None
        if self.q_bias is None or self.k_bias is None or self.v_bias is None:
            return self.qkv.weight, self.qkv.bias
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.qkv.weight, bias + self.qkv.bias if self.qkv_bias_separate and self.qkv.bias is not None else bias

    def packed_qkv(self, x: Tensor) -> Tensor:
        if self.qkv is None or self.q_bias is None or self.k_bias is None or self.v_bias is None:
            return super().packed_qkv(x)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, weight=self.qkv.weight, bias=bias)


class RopeReductionAttention(ReductionAttentionOps, AttentionRope):
    """timm's AttentionRope (DINOv3, Perception Encoder) with the reduction methods (no grouped-query attention)."""


def _bool_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


class SplitBlock(Block):
    """timm's Block split into the pieces a reduction calls: the whole dense block (`dense`, taking RoPE) and the MLP
    residual (`mlp_residual`), for a method that changes what happens between them."""

    attn: ReductionAttentionOps  # the student builds its blocks with a reduction attention (`convert_eva` too)

    def dense(self, x: Tensor, rope: Optional[Tensor] = None) -> Tensor:
        """The unchanged timm block (a ViT with RoPE is an Eva: see `EvaBlockOps`)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


State = TypeVar("State")  # what a method carries from block to block in one forward pass
Setting = TypeVar("Setting")  # one block's reduction (None: the block runs dense)


class ReductionBlock(SplitBlock, Generic[State, Setting]):
    """timm's Block for a token-reduction method: `forward` stays timm's dense block; subclasses implement `reduce`:

    `reduce(x, state, setting, record, rope) -> (x, state, dest)`: `state` is what the method carries from block to
    block in one forward pass (ToMe's token sizes, DynamicViT's keep policy; None before the first reduction),
    `setting` this block's reduction (ToMe's r, EViT's keep rate; None: the block runs dense), `record` whether the
    token trace is wanted; `dest (B, N)` maps each entering token to its position after the reduction (None: no
    change). A block that reduces between the attention residual and the MLP returns the count its MLP ran on as
    `x.shape[1]`, which `ViTStudent.forward_blocks` records.

    `rope` is this block's RoPE table for the tokens after the prefix (None: the backbone has none).
    `num_prefix` (class, distillation and register tokens, never reduced) is set by the student.
    """

    num_prefix: int = 1

    def reduce(self, x: Tensor, state: State, setting: Setting, record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, State, Optional[Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} does not implement reduce")


# ------------------------------------------------------------------------------------------------ timm's Eva
class EvaBlockOps:
    """Put before a method's block class to run it on timm's pre-norm `EvaBlock`: Eva's LayerScale is `gamma_1`,
    `gamma_2` (parameters, not modules), its dense block takes `rope`."""

    gamma_1: Optional[Tensor]
    gamma_2: Optional[Tensor]

    def ls1(self, x: Tensor) -> Tensor:
        return x if self.gamma_1 is None else self.gamma_1 * x

    def ls2(self, x: Tensor) -> Tensor:
        return x if self.gamma_2 is None else self.gamma_2 * x

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
        return EvaBlock.forward(self, x, rope=rope, attn_mask=attn_mask)  # type: ignore[arg-type]

    def dense(self, x: Tensor, rope: Optional[Tensor] = None) -> Tensor:
        return EvaBlock.forward(self, x, rope=rope)  # type: ignore[arg-type]

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))  # type: ignore[attr-defined]


_EVA_CLASSES: dict[Callable[..., nn.Module], type] = {}


def eva_class(block_fn: Callable[..., nn.Module]) -> type:
    """The method's block class for an `EvaBlock` (one class per method block class)."""
    if block_fn not in _EVA_CLASSES:
        base = cast(type, block_fn)  # a block class (timm's block_fn may be any callable; a method's is its class)
        _EVA_CLASSES[block_fn] = type(f"Eva{base.__name__}", (EvaBlockOps, base), {"__module__": __name__})
    return _EVA_CLASSES[block_fn]


def convert_eva(blocks: Iterable[nn.Module], block_fn: Callable[..., nn.Module]) -> None:
    """Turn timm's built `EvaBlock`s into `block_fn` blocks in place (weights untouched): post-norm blocks and
    grouped-query attention are refused, as no method here defines them."""
    for i, block in enumerate(blocks):
        if type(block) is not EvaBlock:
            raise ValueError(f"backbone: block {i} is a {type(block).__name__}; token reduction runs on timm's pre-norm "
                             f"EvaBlock only (use_post_norm models are not supported)")
        attn = block.attn
        if isinstance(attn, AttentionRope):
            if getattr(attn, "num_kv_groups", 1) != 1:
                raise ValueError("backbone: grouped-query attention (num_kv_heads) is not supported by token reduction")
            attn.__class__ = RopeReductionAttention
        elif isinstance(attn, EvaAttention):
            attn.__class__ = EvaReductionAttention
        block.__class__ = eva_class(block_fn)
