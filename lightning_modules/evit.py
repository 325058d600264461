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
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lightning_modules.base import ReductionModule, check_keep_rate, check_reduction_layers
from lightning_modules.layers import ReductionBlock
from lightning_modules.ops import keep_topk
from lightning_modules.trace import TokenTrace
from lightning_modules.vit import ViTStudent, backbone_name


# ------------------------------------------------------------------------------------------------ pure ops
def kept_tokens(num_tokens: int, keep_rate: float, num_prefix: int = 1) -> int:
    """EViT's count: `ceil(keep_rate * (N - 1))` of the tokens after the prefix (a fused token counts)."""
    return math.ceil(keep_rate * (num_tokens - num_prefix))


def keep_attentive(x: Tensor, cls_attn: Tensor, keep_rate: float, num_prefix: int = 1,
                   fuse_token: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """EViT's token reorganisation. x: (B, N, C), cls_attn: (B, N) ->
    x `(B, num_prefix + k (+1 fused), C)` and the token map `dest (B, N)` (None when nothing changes).

    The k = ceil(keep_rate * (N - num_prefix)) non-prefix tokens with the highest class attention are
    kept in descending order; with `fuse_token` the others become one token, `sum_i a_i x_i`, appended last.
    """
    n = x.shape[1]
    k = kept_tokens(n, keep_rate, num_prefix)
    if k >= n - num_prefix:
        return x, None
    scores = cls_attn[:, num_prefix:]  # (B, N - p)
    kept, dest = keep_topk(x, scores, k, num_prefix)
    if not fuse_token:
        return kept, dest
    left = dest[:, num_prefix:] < 0  # (B, N - p) the tokens not kept
    weights = torch.where(left, scores, torch.zeros_like(scores))  # kept tokens weigh 0
    fused = torch.bmm(weights[:, None, :].to(x.dtype), x[:, num_prefix:])  # (B, 1, C)
    return torch.cat([kept, fused], dim=1), dest.masked_fill(dest < 0, num_prefix + k)


# ------------------------------------------------------------------------------------------------ layers
class EViTBlock(ReductionBlock[None, Optional[float]]):
    """timm's Block with EViT's reorganisation between attention and MLP. setting: the keep rate (None
    outside `reduction_layers`: the dense block); no state."""

    fuse_token: bool = True

    def reduce(self, x: Tensor, state: None, keep_rate: Optional[float], record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, None, Optional[Tensor]]:
        if keep_rate is None or kept_tokens(x.shape[1], keep_rate, self.num_prefix) >= x.shape[1] - self.num_prefix:
            return self.dense(x, rope), None, None
        attn = self.attn.forward_reduce(self.norm1(x), cls_attn=True, rope=rope)
        x = x + self.drop_path1(self.ls1(attn.x))
        assert attn.cls_attn is not None  # asked for above
        x, dest = keep_attentive(x, attn.cls_attn, keep_rate, self.num_prefix, self.fuse_token)
        return self.mlp_residual(x), None, dest


# ------------------------------------------------------------------------------------------------ student
class EViTStudent(ViTStudent):
    """A timm ViT with EViT blocks reducing at `reduction_layers` with `keep_rate`."""

    def __init__(self, vit: Any, keep_rate: float = 0.7, reduction_layers: tuple[int, ...] = (3, 6, 9),
                 fuse_token: bool = True) -> None:
        super().__init__(vit)
        if vit.cls_token is None:
            raise ValueError(f"model.backbone: {backbone_name(vit)} has no class token, and EViT ranks tokens by the class "
                             f"token's attention")
        self.keep_rate = keep_rate
        self.reduction_layers = check_reduction_layers(reduction_layers, len(vit.blocks))
        for block in vit.blocks:
            block.fuse_token = fuse_token
        self.fuse_token = fuse_token

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """The class token's attention row (N x attn_dim) and the fused token's weighted sum ((N - p) x C)
        in each block that reorganised."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        attn_dim = self.attention().heads_width
        reduced = mlp_tokens < tokens
        fused = (tokens - self.num_prefix_tokens) * self.embed_dim * float(self.fuse_token)
        return ((tokens * attn_dim + fused) * reduced).sum(1)

    def layer_settings(self) -> list[Optional[float]]:
        return [self.keep_rate if layer in self.reduction_layers else None for layer in range(self.depth)]


# ------------------------------------------------------------------------------------------------ module
class EViTModule(ReductionModule):
    """`METHODS["evit"]`: keep `keep_rate` of the tokens at `reduction_layers` (default 3, 6, 9), fusing the
    rest when `fuse_token`. `reduction_schedule: {start_epoch, shrink_epochs}` is EViT's cosine keep-rate
    schedule (from scratch: 10 and 100; fine-tuning: none, the target from step 0)."""

    student: EViTStudent

    static_shapes = True
    needs_class_token = True
    setting_keys = ("keep_rate",)
    off_settings = {"keep_rate": 1.0}
    demo_settings = {"keep_rate": 0.5, "reduction_layers": [1, 2]}

    def __init__(
        self,
        *,
        keep_rate: float = 0.7,
        reduction_layers: Sequence[int] = (3, 6, 9),
        fuse_token: bool = True,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        check_keep_rate(keep_rate)
        self.target_keep_rate = keep_rate
        self.build_student(EViTStudent, block_fn=EViTBlock, keep_rate=keep_rate, reduction_layers=tuple(reduction_layers), fuse_token=fuse_token)

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        # EViT: keep_rate = base + (1 - base) * (cos(pi t) + 1) / 2 = 1 - alpha * (1 - base)
        self.student.keep_rate = 1.0 - alpha * (1.0 - self.target_keep_rate)
        return {"keep_rate": self.student.keep_rate}
