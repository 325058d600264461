"""Multiply-accumulates from the token trace (the papers' "GFLOPs" are MACs).

Per block l, with N = tokens entering it and M = tokens its MLP ran on (both per image, from the trace):
attention projections N x (qkv + proj), the two attention matmuls 2 N^2 x attn_dim, the MLP M x (its
linear layers); plus the patch embedding, the head(s) and what a method adds itself
(`ViTStudent.extra_macs`: ToMe's matching, EViT's class-attention row and fused token, DynamicViT's
predictors). Norms, activations, softmax and gathers are not counted, as `torch.utils.flop_counter`
(which counts 2 FLOPs per MAC) does not count them either.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.layers import AttentionPoolLatent
from torch import Tensor, nn

from lightning_modules.trace import TokenTrace

if TYPE_CHECKING:
    from lightning_modules.vit import ViTStudent


def linear_macs(module: nn.Module) -> int:
    """MACs per token of every nn.Linear inside a module (weights: in x out)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def map_head_macs(pool: AttentionPoolLatent, tokens: Tensor) -> Tensor:
    """timm's `AttentionPoolLatent` on `tokens (B,)` tokens: keys/values of every token, the latent queries'
    projections, attention and MLP."""
    latents = pool.latent_len
    kv = pool.kv.in_features * pool.kv.out_features
    dim = pool.num_heads * pool.head_dim
    rest = latents * (linear_macs(pool) - kv)  # q, proj and the MLP on the latent tokens
    return tokens * kv + 2 * latents * tokens * dim + rest


def count_macs(student: ViTStudent, trace: TokenTrace) -> Tensor:
    """(B,) MACs of each image's forward pass, as the trace records it."""
    vit: Any = student.vit  # timm's VisionTransformer or Eva: read by duck typing (blocks, heads, pooling)
    tokens = trace.tokens.double()
    mlp_tokens = trace.mlp_tokens.double()
    total = tokens.new_zeros(tokens.shape[0])
    for layer, block in enumerate(vit.blocks):
        n, m = tokens[:, layer], mlp_tokens[:, layer]
        attn_dim = block.attn.num_heads * block.attn.head_dim
        total += n * linear_macs(block.attn) + 2 * n * n * attn_dim + m * linear_macs(block.mlp)
    proj = vit.patch_embed.proj
    num_patches = trace.owner[0].shape[1]
    total += num_patches * proj.weight[0].numel() * proj.out_channels
    heads = [vit.head] + ([vit.head_dist] if getattr(vit, "head_dist", None) is not None else [])
    total += sum(linear_macs(head) for head in heads)
    if getattr(vit, "attn_pool", None) is not None:  # a MAP head (SigLIP, PE): its latent queries the last tokens
        total += map_head_macs(vit.attn_pool, student.tokens_to_head(trace).double())
    return total + student.extra_macs(trace).double()
