"""The token trace: which token carries which patch, layer by layer (its contract: the README's Layout section).

Every method reports its reductions through one mechanism: after a reduction, the new position of each
old token (`dest`, -1 when it left) is composed with the current owner map. Visualisation and MAC
counting read only the finished `TokenTrace`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class TokenTrace:
    """What a reduced ViT did to its tokens in one forward pass.

    owner: `depth + 1` LongTensors `(B, N0)`. `owner[l][b, i]` is the position (prefix tokens included)
        of the token carrying patch `i` among the tokens ENTERING block `l` (`owner[depth]`: leaving the
        last block), or -1 when patch `i` no longer takes part (pruned or halted).
    tokens: `(B, depth + 1)` number of tokens taking part (prefix included) entering block `l`
        (`tokens[:, depth]`: leaving the last block).
    mlp_tokens: `(B, depth)` number of tokens block `l`'s MLP ran on; differs from `tokens[:, l]` when a
        method reduces inside a block, between attention and MLP (ToMe, EViT).
    num_prefix_tokens: class/distillation/register tokens in front of the patch tokens.
    grid_size: `(H, W)` of the patch grid, `H * W = N0`.
    """

    owner: list[Tensor]
    tokens: Tensor
    mlp_tokens: Tensor
    num_prefix_tokens: int
    grid_size: tuple[int, int]

    @property
    def depth(self) -> int:
        return len(self.owner) - 1


def remap_owner(owner: Tensor, dest: Tensor) -> Tensor:
    """Compose an owner map with a reduction.

    owner: `(B, N0)` position of each patch's token, -1 when gone; dest: `(B, N)` new position of each of
    the N current tokens, -1 when it left -> `(B, N0)`.
    """
    moved = dest.gather(1, owner.clamp(min=0))
    return moved.masked_fill(owner < 0, -1)


def kept_dest(idx: Tensor, num_tokens: int, num_prefix: int, rest: int = -1) -> Tensor:
    """The token map of a gather that keeps the prefix tokens, then the non-prefix tokens `idx (B, k)` in that
    order: prefix -> its place, kept -> `num_prefix + rank`, every other token -> `rest` (-1: dropped,
    or the position of a token they were fused into) -> (B, N)."""
    batch, k = idx.shape
    dest = torch.full((batch, num_tokens), rest, dtype=torch.long, device=idx.device)
    dest[:, :num_prefix] = torch.arange(num_prefix, device=idx.device)
    ranks = torch.arange(num_prefix, num_prefix + k, device=idx.device).expand(batch, -1)
    return dest.scatter_(1, idx + num_prefix, ranks)


@dataclass
class TraceRecorder:
    """Builds a `TokenTrace` inside one forward pass (created there, never shared between calls)."""

    owner: Tensor
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    positions: Tensor  # (B, N0) where each patch's token is in the sequence (masked tokens stay in place); -1: pruned
    moves: int = 0  # reductions that moved tokens so far (RoPE follows them: see `ViTStudent.block_rope`)
    left: Optional[Tensor] = None  # (B, N0, C) with `keep_left`: each left patch's token as it was when it left
    owners: list[Tensor] = field(default_factory=list)
    counts: list[Tensor] = field(default_factory=list)
    mlp_counts: list[Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, batch: int, grid_size: tuple[int, int], num_prefix_tokens: int, device: torch.device,
              keep_left: Optional[Tensor] = None) -> TraceRecorder:
        """`keep_left`: the embedded tokens `(B, prefix + N0, C)` when the pass restores a dense output
        (`ViTStudent.dense_features`): every reduction then stores the tokens of the patches that leave."""
        num_patches = grid_size[0] * grid_size[1]
        owner = torch.arange(num_prefix_tokens, num_prefix_tokens + num_patches, device=device)
        owner = owner.expand(batch, -1).clone()
        left = None if keep_left is None else keep_left.new_zeros(batch, num_patches, keep_left.shape[-1])
        return cls(owner, num_prefix_tokens, (grid_size[0], grid_size[1]), owner, left=left)

    def remap(self, dest: Tensor, x: Optional[Tensor] = None) -> None:
        """Tokens moved: `dest (B, N)` is each current token's new position, or -1 when it left; `x (B, N, C)`:
        the tokens as they were before this reduction (their last complete block's output), kept for the
        patches that leave when the pass restores a dense output."""
        owner = remap_owner(self.owner, dest)
        self._keep_leaving(owner, x)
        self.owner = owner
        self.positions = remap_owner(self.positions, dest)
        self.moves += 1

    def drop(self, keep: Tensor, x: Optional[Tensor] = None) -> None:
        """Tokens stay in place but some stop taking part: `keep (B, N)` bool; `x` as for `remap`."""
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        owner = remap_owner(self.owner, positions.masked_fill(~keep, -1))
        self._keep_leaving(owner, x)
        self.owner = owner

    def _keep_leaving(self, owner: Tensor, x: Optional[Tensor]) -> None:
        """Store, into `left`, the token of every patch that takes part before (`self.owner`) but not after
        (`owner`): `x (B, N, C)` is indexed by the current owner map."""
        if self.left is None:
            return
        if x is None:
            raise RuntimeError("TraceRecorder: a reduction that drops tokens must pass the tokens it drops them "
                               "from (x) when the pass restores a dense output")
        leaving = (self.owner >= 0) & (owner < 0)  # (B, N0)
        index = self.owner.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1])  # (B, N0, C)
        self.left = torch.where(leaving[..., None], x.gather(1, index), self.left)

    def dense(self, x: Tensor) -> Tensor:
        """The dense map `(B, N0, C)` at the end of the pass: each patch's carrying token in `x (B, N, C)`, or
        its token when it left."""
        assert self.left is not None, "TraceRecorder.start(keep_left=...) was not given"
        index = self.owner.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1])  # (B, N0, C)
        return torch.where((self.owner >= 0)[..., None], x.gather(1, index), self.left)

    def place(self, owner: Tensor) -> None:
        """Set the owner map outright (`(B, N0)`, -1 when gone): for methods that track positions themselves."""
        self.owner = owner

    def block(self, tokens: Tensor | int) -> None:
        """Record the tokens entering the next block; its MLP defaults to the same count."""
        self.owners.append(self.owner)
        self.counts.append(self._per_image(tokens))
        self.mlp_counts.append(self.counts[-1])

    def mlp(self, tokens: Tensor | int) -> None:
        """Record the tokens the current block's MLP runs on, when a reduction inside the block changed it."""
        self.mlp_counts[-1] = self._per_image(tokens)

    def finish(self, tokens: Tensor | int) -> TokenTrace:
        """Record the tokens leaving the last block and return the trace."""
        self.owners.append(self.owner)
        self.counts.append(self._per_image(tokens))
        return TokenTrace(
            owner=self.owners,
            tokens=torch.stack(self.counts, 1),
            mlp_tokens=torch.stack(self.mlp_counts, 1),
            num_prefix_tokens=self.num_prefix_tokens,
            grid_size=self.grid_size,
        )

    def _per_image(self, tokens: Tensor | int) -> Tensor:
        batch = self.owner.shape[0]
        if isinstance(tokens, int):
            return torch.full((batch,), tokens, dtype=torch.long, device=self.owner.device)
        return tokens.to(torch.long).reshape(batch)


def kept_alone(owner: Tensor, num_prefix: int) -> Tensor:
    """Which patches still have a token of their own: `owner (B, N0)` -> `(B, N0)` bool, False where the patch
    left (pruned, halted) or shares its token with another patch (merged, fused)."""
    batch, n0 = owner.shape
    slot = owner.clamp(min=0)  # (B, N0) token position, prefix included; a left patch counts at 0 (masked below)
    carried = torch.zeros(batch, n0 + num_prefix, dtype=torch.long, device=owner.device)
    carried.scatter_add_(1, slot, (owner >= 0).long())  # (B, N0 + prefix) patches per token
    return (owner >= 0) & (carried.gather(1, slot) == 1)


def patch_regions(mask: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """A pixel mask `(B, H, W)` bool -> `(B, N0)` bool per patch (row-major, as the patch tokens): a patch is in
    the region when any of its pixels is."""
    batch, height, width = mask.shape
    rows, cols = grid_size
    patches = mask.reshape(batch, rows, height // rows, cols, width // cols)  # (B, rows, ph, cols, pw)
    return patches.any(dim=4).any(dim=2).reshape(batch, rows * cols)


def region_keep_counts(trace: TokenTrace, region: Tensor) -> tuple[Tensor, Tensor]:
    """How much of the blocks' output the patches of a region keep for themselves: `region (B, N0)` bool ->
    (kept, total) float64 pairs `(2,)` for [inside the region, outside it], counted over every patch and
    every block's output (`owner[1:]`). kept / total is the fraction of (patch, block) pairs where the patch
    still has its own token (`kept_alone`): 1 for a dense ViT; where a learned or attention-based keep
    decision sees the foreground, higher inside it than outside."""
    inside = region.to(torch.float64)
    owners = torch.stack(trace.owner[1:]).flatten(0, 1)  # (depth * B, N0): every block's output at once
    alone = kept_alone(owners, trace.num_prefix_tokens).view(trace.depth, *region.shape)
    blocks = alone.to(torch.float64).sum(0)  # (B, N0) blocks after which each patch still had its own token
    kept = torch.stack([(blocks * inside).sum(), (blocks * (1 - inside)).sum()])
    return kept, torch.stack([inside.sum(), (1 - inside).sum()]) * trace.depth
