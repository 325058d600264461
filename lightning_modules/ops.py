"""Pure token-reduction ops shared by the methods (the method contract, part 2): each takes tokens and
scores and returns the reduced tokens with the token map `dest (B, N)` the trace composes (see trace.py).

`keep_topk` keeps the highest-scoring tokens (EViT, DynamicViT inference); `Merge` and `bipartite_soft_matching`
are ToMe's merge; `GatherMerge` a merge given by index lists (PiToMe); `merge_wavg` applies either as a
size-weighted average; `policy_softmax` is the masked softmax DynamicViT and DiffRate train through;
`mean_rope` gives reduced tokens their rotary position embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_modules.trace import kept_dest


def keep_topk(x: Tensor, scores: Tensor, k: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Keep the prefix tokens, then the k non-prefix tokens with the highest `scores` in descending order.
    x: (B, N, C), scores: (B, N - num_prefix) -> x `(B, num_prefix + k, C)`, dest `(B, N)` (-1: dropped)."""
    c = x.shape[2]
    idx = scores.topk(k, dim=1, largest=True, sorted=True).indices  # (B, k) among the non-prefix tokens
    kept = x[:, num_prefix:].gather(1, idx[..., None].expand(-1, -1, c))
    return torch.cat([x[:, :num_prefix], kept], dim=1), kept_dest(idx, x.shape[1], num_prefix)


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


@dataclass(frozen=True)
class GatherMerge:
    """A merge given by index lists over the mergeable tokens (those after the `num_prefix` protected ones):
    output `[prefix, kept, dst]` where every `src` token is reduced into `dst[dst_of_src]` and any token in none of
    the lists is dropped (pruned). Indices are
    `(B, k)` into the T = N - num_prefix mergeable tokens; `dst_of_src (B, r)` into `dst_idx`. PiToMe's
    energy-ordered merges produce it; `merge_wavg` applies it."""

    kept_idx: Tensor  # tokens kept unmerged, in output order
    src_idx: Tensor  # tokens merged away
    dst_idx: Tensor  # destinations, in output order
    dst_of_src: Tensor  # the destination (a position in dst_idx) of each src token
    num_prefix: int

    def __call__(self, x: Tensor, mode: str = "sum") -> Tensor:
        """x: (B, N, C) -> (B, num_prefix + kept + dst, C)."""
        p, c = self.num_prefix, x.shape[2]
        t = x[:, p:]

        def take(idx: Tensor) -> Tensor:
            return t.gather(1, idx[..., None].expand(-1, -1, c))

        dst = take(self.dst_idx).scatter_reduce(1, self.dst_of_src[..., None].expand(-1, -1, c), take(self.src_idx),
                                                reduce=mode)
        return torch.cat([x[:, :p], take(self.kept_idx), dst], dim=1)

    def dest(self, num_tokens: int) -> Tensor:
        """(B, N): the position each input token ends up at (merged tokens: their destination's; pruned: -1)."""
        batch, device, p = self.kept_idx.shape[0], self.kept_idx.device, self.num_prefix
        kept = self.kept_idx.shape[1]
        rest = torch.full((batch, num_tokens - p), -1, dtype=torch.long, device=device)  # -1: pruned
        rest.scatter_(1, self.kept_idx, torch.arange(p, p + kept, device=device).expand(batch, -1))
        dst_pos = torch.arange(p + kept, p + kept + self.dst_idx.shape[1], device=device).expand(batch, -1)
        rest.scatter_(1, self.dst_idx, dst_pos)
        rest.scatter_(1, self.src_idx, dst_pos.gather(1, self.dst_of_src))
        return torch.cat([torch.arange(p, device=device).expand(batch, -1), rest], dim=1)


def merge_wavg(merge: Merge | GatherMerge, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge. x: (B, N, C), size: (B, N, 1) or None (all ones) -> (B, N - r, C), sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def size_bias(size: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Proportional attention (ToMe): a token that carries `size` patches counts `size` times as a key, by adding
    `log(size)` to every query's logits towards it. size: (B, N, 1) or None (all 1) -> (B, 1, 1, N) or None."""
    return None if size is None else size.log()[:, None, None, :, 0].to(dtype)


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax, in float32. logits: (B, H, N, N), policy: (B, N) keep mask ->
    `A_ij = (exp(a_ij - max_i) G_ij + eps/N) / (sum_j exp(a_ij - max_i) G_ij + eps)` with
    `G_ij = policy_j` for j != i and `G_ii = 1` (a dropped token still attends to itself)."""
    n = policy.shape[1]
    eye = torch.eye(n, dtype=torch.float32, device=policy.device).view(1, 1, n, n)
    keep = policy.reshape(-1, 1, 1, n).to(torch.float32)
    gate = keep + (1.0 - keep) * eye
    shifted = logits - logits.max(dim=-1, keepdim=True)[0]
    weights = shifted.to(torch.float32).exp() * gate
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).type_as(logits)


def mean_rope(table: Tensor, positions: Tensor, num_tokens: int, num_prefix: int) -> Tensor:
    """The RoPE of tokens after reductions: each token's rotation table is the mean of the tables of the patches
    it carries (the position-embedding average the ToMe author suggests, facebookresearch/ToMe#29), so a kept
    token keeps its own rotation exactly and a merged or fused one sits at the mean of its patches.

    table: `(N0, D)` or `(H, N0, D)` the backbone's per-patch table; positions: `(B, N0)` the position of each
    patch's token among the `num_tokens` current ones (prefix included), -1 when pruned
    -> `(B, 1 or H, num_tokens - num_prefix, D)`.
    """
    heads = table.unsqueeze(0) if table.dim() == 2 else table  # (H', N0, D)
    h, n0, d = heads.shape
    batch, n = positions.shape[0], num_tokens - num_prefix
    slot = torch.where(positions >= num_prefix, positions - num_prefix, n)  # (B, N0): pruned patches -> spare slot n
    sums = heads.new_zeros(batch, h, n + 1, d).scatter_add_(
        2, slot[:, None, :, None].expand(batch, h, n0, d), heads.unsqueeze(0).expand(batch, -1, -1, -1))
    counts = heads.new_zeros(batch, n + 1).scatter_add_(1, slot, heads.new_ones(batch, n0))
    return sums[:, :, :n] / counts[:, None, :n, None]


def identity_rope(like: Tensor, tokens: int) -> Tensor:
    """A RoPE table that rotates nothing (sin 0, cos 1) for `tokens` tokens, shaped like `like (..., M, 2 D)`."""
    shape = (*like.shape[:-2], tokens, like.shape[-1] // 2)
    return torch.cat([like.new_zeros(shape), like.new_ones(shape)], dim=-1)
