"""The attention and block every reduction method builds on (the method contract, part 1).

`ReductionAttention` is timm's `Attention` (its own `forward` is untouched: with no reduction a block runs
exactly timm's code) plus `forward_reduce`, which gives what token reduction needs beside fused SDPA: the
keys averaged over heads (ToMe's matching metric), the class token's attention row, a float bias or a
boolean mask on the logits, or a replacement softmax (DynamicViT's policy softmax). It calls every timm
submodule (qkv, q/k norms, scale norm, gate, proj, dropouts), so LayerScale, qk-norm and gated models work
for every method.

`ReductionBlock` is timm's `Block` whose `forward(x, state, setting, record)` runs one block with the
method's reduction and returns `(x, state, dest)`; `ViTStudent.forward_blocks` drives it and keeps the
token trace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor


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


class ReductionAttention(Attention):
    """timm's Attention with `forward_reduce`, `attend` and `project` for token-reduction methods."""

    def forward_reduce(self, x: Tensor, bias: Optional[Tensor] = None, *, keys: bool = False,
                       cls_attn: bool = False, softmax: Optional[Callable[[Tensor], Tensor]] = None) -> AttentionOutput:
        """x: (B, N, C); bias: a float (added) or bool (True = attend) mask broadcastable to (B, H, N, N).
        `softmax` replaces the softmax on the logits and forces the explicit path."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, k, row = self.attend(qkv, bias, cls_attn=cls_attn, softmax=softmax)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return AttentionOutput(self.project(x, out), k.mean(1) if keys else None, row)

    def attend(self, qkv: Tensor, mask: Optional[Tensor] = None, *, cls_attn: bool = False,
               softmax: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """qkv: (3, B, H, N, D) -> (attention output (B, H, N, D), normed keys (B, H, N, D), class row (B, N))."""
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        row = None
        if self.fused_attn and softmax is None:
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
        """The attention output `(..., attn_dim)` -> the branch output: scale norm, gate (from the branch's
        inputs), proj, dropout, as timm's forward ends."""
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(inputs).sigmoid()
        return self.proj_drop(self.proj(out))


def _bool_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


class ReductionBlock(Block):
    """timm's Block for a method that reduces tokens inside blocks. Subclasses implement `forward`:

    `forward(x, state, setting, record) -> (x, state, dest)`: `state` is what the method carries from block to
    block in one forward pass (ToMe's token sizes; None before the first reduction), `setting` this block's
    reduction (ToMe's r, EViT's keep rate; None: the block runs dense), `record` whether the token trace is
    wanted; `dest (B, N)` maps each entering token to its position after the reduction (None: no change).
    A block that reduces between the attention residual and the MLP returns the count its MLP ran on as
    `x.shape[1]`, which `ViTStudent.forward_blocks` records.

    `num_prefix` (class, distillation and register tokens, never reduced) is set by the student.
    """

    num_prefix: int = 1

    def dense(self, x: Tensor) -> Tensor:
        """The unchanged timm block."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: Tensor, state: Any = None, setting: Any = None,  # type: ignore[override]
                record: bool = False) -> tuple[Tensor, Any, Optional[Tensor]]:
        raise NotImplementedError
