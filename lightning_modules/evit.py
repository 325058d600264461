"""EViT: keep the attentive tokens, fuse the rest (Liang et al., ICLR 2022), faithful to youweiliang/evit.

At `reduction_layers`, between the attention residual and the MLP, the tokens are ranked by the class
token's attention (post-softmax, averaged over heads); the top `ceil(keep_rate * (N - 1))` are kept in
descending order and the rest are fused into one token, their attention-weighted sum (weights not
renormalised), appended last. Only the class token's row of attention is computed, beside fused SDPA.

Beyond the official code: any timm ViT with a class token works (LayerScale, qk-norm), and the
distillation token (and registers) are protected, so distilled DeiT trains (the official path crashes).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

from lightning_modules.base import ReductionModule
from lightning_modules.trace import TokenTrace, TraceRecorder, kept_dest
from lightning_modules.vit import ViTStudent


# ------------------------------------------------------------------------------------------------ pure ops
def kept_tokens(num_tokens: int, keep_rate: float, num_prefix: int = 1) -> int:
    """EViT's count: `ceil(keep_rate * (N - 1))` of the tokens after the prefix (a fused token counts)."""
    return math.ceil(keep_rate * (num_tokens - num_prefix))


def class_attention(q_cls: Tensor, k: Tensor, scale: float) -> Tensor:
    """The class token's attention probabilities, averaged over heads. q_cls: (B, H, 1, D), k: (B, H, N, D)
    -> (B, N). One query row: O(N) next to the attention itself."""
    return ((q_cls * scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, 0]


def keep_attentive(x: Tensor, cls_attn: Tensor, keep_rate: float, num_prefix: int = 1,
                   fuse_token: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """EViT's token reorganisation. x: (B, N, C), cls_attn: (B, N) ->
    x `(B, num_prefix + k (+1 fused), C)` and the token map `dest (B, N)` (None when nothing changes).

    The k = ceil(keep_rate * (N - num_prefix)) non-prefix tokens with the highest class attention are
    kept in descending order; with `fuse_token` the others become one token, `sum_i a_i x_i`, appended last.
    """
    _, n, c = x.shape
    rest = n - num_prefix
    k = kept_tokens(n, keep_rate, num_prefix)
    if k >= rest:
        return x, None
    scores = cls_attn[:, num_prefix:]  # (B, N - p)
    _, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)  # (B, k)
    tokens = x[:, num_prefix:]
    parts = [x[:, :num_prefix], tokens.gather(1, idx[..., None].expand(-1, -1, c))]
    if fuse_token:
        weights = scores.scatter(1, idx, 0.0)  # attention of the tokens not kept; kept ones weigh 0
        parts.append(torch.bmm(weights[:, None, :].to(tokens.dtype), tokens))  # (B, 1, C)
    new_x = torch.cat(parts, dim=1)
    return new_x, kept_dest(idx, n, num_prefix, rest=num_prefix + k if fuse_token else -1)


# ------------------------------------------------------------------------------------------------ layers
class EViTAttention(Attention):
    """timm's Attention that can also return the class token's attention row `(B, N)` (fused path: one
    extra query row; explicit path: read from the matrix it already has)."""

    def forward(self, x: Tensor, need_cls_attn: bool = False) -> tuple[Tensor, Optional[Tensor]]:  # type: ignore[override]
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        cls_attn = None
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            if need_cls_attn:
                cls_attn = class_attention(q[:, :, :1], k, self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if need_cls_attn:
                cls_attn = attn[:, :, 0].mean(dim=1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), cls_attn


class EViTBlock(Block):
    """timm's Block with EViT's reorganisation between attention and MLP when given a keep rate.

    forward(x, keep_rate) -> (x, dest): keep_rate None (not a reduction layer) or 1 is the dense block.
    """

    num_prefix: int = 1
    fuse_token: bool = True

    def forward(self, x: Tensor, keep_rate: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:  # type: ignore[override]
        reduce = keep_rate is not None and kept_tokens(x.shape[1], keep_rate, self.num_prefix) < x.shape[1] - self.num_prefix
        x_attn, cls_attn = self.attn(self.norm1(x), need_cls_attn=reduce)
        x = x + self.drop_path1(self.ls1(x_attn))
        dest = None
        if reduce:
            x, dest = keep_attentive(x, cls_attn, keep_rate, self.num_prefix, self.fuse_token)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, dest


# ------------------------------------------------------------------------------------------------ student
class EViTStudent(ViTStudent):
    """A timm ViT with EViT blocks reducing at `reduction_layers` with `keep_rate`."""

    def __init__(self, vit: Any, keep_rate: float = 0.7, reduction_layers: tuple[int, ...] = (3, 6, 9),
                 fuse_token: bool = True) -> None:
        super().__init__(vit)
        if vit.cls_token is None:
            raise ValueError("EViT ranks tokens by the class token's attention: the backbone has no class token")
        bad = [layer for layer in reduction_layers if not 0 <= layer < len(vit.blocks)]
        if bad:
            raise ValueError(f"model.reduction_layers: {bad} outside the {len(vit.blocks)} blocks")
        self.keep_rate = keep_rate
        self.reduction_layers = tuple(reduction_layers)
        for block in vit.blocks:
            block.num_prefix = vit.num_prefix_tokens
            block.fuse_token = fuse_token

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """The class token's attention row (N x attn_dim) and the fused token's weighted sum ((N - p) x C)
        in each block that reorganised."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        attn_dim = self.vit.blocks[0].attn.attn_dim
        reduced = mlp_tokens < tokens
        fused = (tokens - self.num_prefix_tokens) * self.embed_dim * float(self.vit.blocks[0].fuse_token)
        return ((tokens * attn_dim + fused) * reduced).sum(1)

    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder]) -> tuple[Tensor, None]:
        for layer, block in enumerate(self.vit.blocks):
            if recorder is not None:
                recorder.block(x.shape[1])
            keep_rate = self.keep_rate if layer in self.reduction_layers else None
            x, dest = self.run_block(block, x, keep_rate)
            if recorder is not None and dest is not None:
                recorder.remap(dest)
                recorder.mlp(x.shape[1])
        return x, None


# ------------------------------------------------------------------------------------------------ module
class EViTModule(ReductionModule):
    """`METHODS["evit"]`: keep `keep_rate` of the tokens at `reduction_layers` (default 3, 6, 9), fusing the
    rest when `fuse_token`. `keep_rate_schedule: {start_epoch, shrink_epochs}` is EViT's cosine keep-rate
    schedule (from scratch: 10 and 100; fine-tuning: none, the target from step 0)."""

    def __init__(
        self,
        *,
        keep_rate: float = 0.7,
        reduction_layers: list[int] = (3, 6, 9),  # type: ignore[assignment]
        fuse_token: bool = True,
        keep_rate_schedule: Optional[dict[str, float]] = None,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"model.keep_rate: expected a value in (0, 1], got {keep_rate}")
        self.target_keep_rate = keep_rate
        self.keep_rate_schedule = keep_rate_schedule
        self.build_student(EViTStudent, block_fn=EViTBlock, vit_kwargs={"attn_layer": EViTAttention},
                           keep_rate=keep_rate, reduction_layers=tuple(reduction_layers), fuse_token=fuse_token)

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        # EViT: keep_rate = base + (1 - base) * (cos(pi t) + 1) / 2 = 1 - alpha * (1 - base)
        self.student.keep_rate = 1.0 - alpha * (1.0 - self.target_keep_rate)
        return {"keep_rate": self.student.keep_rate}
