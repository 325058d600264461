"""ATC: agglomerative token clustering (Haurum et al., ECCV 2024), faithful to JoakimHaurum/ATC - on the GPU.

In each block of `reduction_layers` (default 3, 6, 9), between the attention residual and the MLP, the patch tokens
are clustered bottom-up on the cosine distance of the block's keys (averaged over heads), with `linkage` complete,
average or single, until `int(N0 * keep_rate^(s+1))` clusters remain at stage s (N0: the backbone's patch count).
Each cluster becomes one token, the size-weighted mean of its members; proportional attention (`prop_attn`) carries
the sizes on.

The official code clusters each image with scikit-learn on the CPU, one image at a time. Here the whole batch is
clustered at once on the model's device (`agglomerative_labels`: the greedy merge with Lance-Williams updates,
which for these three linkages gives scikit-learn's partition), with no host round-trip.

Differences from the official code, none changing its results on DeiT:
- LayerScale, qk-norm and fused attention are honoured.
- Every prefix token (class, distillation, registers) is protected like the class token.
- Clusters are emitted in order of their first member rather than scikit-learn's tree-cut order. Attention is
  permutation-equivariant and the next clustering does not depend on the order.
"""
from __future__ import annotations

import argparse
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from lightning_modules.base import ReductionModule, check_keep_rate, check_reduction_layers
from lightning_modules.layers import ReductionBlock
from lightning_modules.ops import size_bias
from lightning_modules.trace import TokenTrace
from lightning_modules.vit import ViTStudent, read_checkpoint_object

Linkage = Literal["complete", "average", "single"]
LINKAGES = ("complete", "average", "single")


# ------------------------------------------------------------------------------------------------ pure ops
def cluster_counts(num_patches: int, keep_rate: float, stages: int) -> list[int]:
    """Clusters (non-prefix tokens) kept at each stage: `int(N0 * keep_rate^(s+1))`, in float64 as the official
    code computes it (power first)."""
    return [int(num_patches * keep_rate ** (stage + 1)) for stage in range(stages)]


def cosine_distance(metric: Tensor) -> Tensor:
    """metric: (B, T, D) -> (B, T, T) `1 - cos`, in the metric's precision (float32 as the official code)."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    return 1 - unit @ unit.transpose(-1, -2)


def agglomerative_labels(distance: Tensor, num_clusters: int, linkage: Linkage = "complete") -> Tensor:
    """Agglomerative clustering of every image of a batch at once. distance: (B, T, T) symmetric -> labels (B, T) in
    [0, num_clusters), numbered by each cluster's first member.

    T - num_clusters times, every image merges its two closest clusters a < b into a, and the distance of the union
    to every other cluster c becomes (Lance-Williams) max (complete), min (single) or the member-count-weighted mean
    (average: UPGMA) of d(a, c) and d(b, c). Average updates run in float64, as scipy's. For these linkages merge heights
    never decrease, so this is the partition scikit-learn's `AgglomerativeClustering` cuts from its full tree (ties
    aside: the lowest pair index wins here)."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage: expected one of {LINKAGES}, got {linkage!r}")
    batch, tokens, _ = distance.shape
    device = distance.device
    # complete and single linkage only pick among the given distances (exact in their own precision, and half the
    # memory traffic of float64 for float32 ones); average linkage averages them, in float64 as scipy does
    dist = (distance.double() if linkage == "average" else distance)
    # no cluster pairs with itself (masked_fill, not an in-place fill of the diagonal view: export needs a functional graph)
    dist = dist.masked_fill(torch.eye(tokens, dtype=torch.bool, device=device), float("inf"))
    count = torch.ones(batch, tokens, dtype=dist.dtype, device=device)
    gone = torch.full((batch, 1, tokens), float("inf"), dtype=dist.dtype, device=device)  # a removed cluster's row
    flat = torch.arange(tokens * tokens, device=device)
    pair_of = torch.stack([flat // tokens, flat % tokens], dim=1)  # (T T, 2): a flat index's (row, column)
    merges = []
    for _ in range(tokens - num_clusters):
        # as few ops per step as possible: at batch 1 this loop's per-op overhead is ATC's cost
        ab = pair_of[dist.view(batch, -1).min(dim=1).indices]  # (B, 2) the closest pair a < b (row-major first)
        pair_rows = ab[..., None].expand(-1, -1, tokens)  # (B, 2, T)
        da, db = dist.gather(1, pair_rows).unbind(1)  # (B, T) rows a and b
        if linkage == "complete":  # max with d(a, a) = d(b, b) = inf: no distance to itself, nor to b
            joined = torch.maximum(da, db)
        elif linkage == "single":
            joined = torch.minimum(da, db).scatter_(1, ab, float("inf"))  # min would keep d(a, b): set a and b apart
        else:  # inf stays inf, as for complete
            na, nb = count.gather(1, ab).unbind(1)
            joined = (na[:, None] * da + nb[:, None] * db) / (na + nb)[:, None]
            count.scatter_add_(1, ab[:, :1], nb[:, None])
        rows = torch.cat([joined[:, None], gone], dim=1)  # (B, 2, T): a's new row, b's
        dist.scatter_(1, pair_rows, rows)
        dist.scatter_(2, ab[:, None].expand(-1, tokens, -1), rows.transpose(1, 2))  # the columns: symmetric
        merges.append(ab)
    return cluster_numbers(merges, batch, tokens, device)


def cluster_numbers(merges: list[Tensor], batch: int, tokens: int, device: torch.device) -> Tensor:
    """The merge steps [(B, 2): a < b, b joined a] -> labels (B, T): each token's final cluster, numbered in order of
    its first member. b's parent is a (every b is merged away once); a token's cluster is the root of its parent chain,
    found by pointer jumping: ceil(log2 T) gathers instead of one relabelling per step."""
    parent = torch.arange(tokens, device=device).expand(batch, -1).clone()  # (B, T)
    if merges:
        steps = torch.stack(merges, dim=1)  # (B, S, 2)
        parent.scatter_(1, steps[..., 1], steps[..., 0])
    for _ in range(max(tokens - 1, 1).bit_length()):
        parent = parent.gather(1, parent)
    alive = torch.zeros(batch, tokens, dtype=torch.long, device=device).scatter_(1, parent, 1)  # surviving clusters
    rank = alive.cumsum(dim=1) - 1  # (B, T) each survivor's number, in order of its first member
    return rank.gather(1, parent)


def merge_clusters(x: Tensor, size: Optional[Tensor], labels: Tensor, num_clusters: int,
                   num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """Size-weighted means of the clusters. x: (B, T, C), size: (B, T, 1) or None (all 1), labels: (B, T - p) ->
    x (B, p + num_clusters, C): the prefix tokens, then the clusters by label; sizes; dest (B, T)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    batch, _, channels = x.shape
    prefix = torch.arange(num_prefix, device=x.device).expand(batch, -1)
    dest = torch.cat([prefix, labels + num_prefix], dim=1)  # (B, T)
    total = x.new_zeros(batch, num_prefix + num_clusters, channels)
    merged = total.scatter_add(1, dest[..., None].expand(-1, -1, channels), x * size)
    sizes = size.new_zeros(batch, num_prefix + num_clusters, 1).scatter_add(1, dest[..., None], size)
    return merged / sizes, sizes, dest


# ------------------------------------------------------------------------------------------------ layers
class ATCBlock(ReductionBlock[Optional[Tensor], Optional[int]]):
    """timm's Block clustering its tokens between the attention residual and the MLP. setting: the clusters to keep
    (None: a plain block); state: token sizes `(B, N, 1)` (with `prop_attn`; None otherwise: the official forward drops
    them after every block). `linkage` and `prop_attn` are set by `ATCStudent`."""

    linkage: Linkage = "complete"
    prop_attn: bool = True

    def reduce(self, x: Tensor, size: Optional[Tensor], clusters: Optional[int], record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        bias = size_bias(size, x.dtype) if self.prop_attn else None  # (B, 1, 1, N): towards each key j
        p = self.num_prefix
        # as many clusters as tokens (keep rate 1): singletons, the tokens as they are (the official code re-orders
        # them into scikit-learn's label order, with sizes 1)
        clusters = None if clusters is None or clusters >= x.shape[1] - p else clusters
        attn = self.attn.forward_reduce(self.norm1(x), bias, keys=clusters is not None, rope=rope)
        x = x + self.drop_path1(self.ls1(attn.x))
        dest = None
        if clusters is not None:
            assert attn.keys is not None  # asked for above
            kept = clusters
            with torch.no_grad():
                labels = agglomerative_labels(cosine_distance(attn.keys[:, p:]), kept, self.linkage)
            x, size, dest = merge_clusters(x, size, labels, kept, p)
        return self.mlp_residual(x), size if self.prop_attn else None, dest if record else None


# ------------------------------------------------------------------------------------------------ student
class ATCStudent(ViTStudent):
    """A timm ViT with ATC blocks clustering at `reduction_layers` to `int(N0 * keep_rate^(s+1))` clusters."""

    def __init__(self, vit: Any, keep_rate: float = 0.9, reduction_layers: Sequence[int] = (3, 6, 9),
                 linkage: Linkage = "complete", prop_attn: bool = True) -> None:
        super().__init__(vit)
        self.keep_rate = keep_rate
        self.reduction_layers = check_reduction_layers(reduction_layers, len(vit.blocks))
        for block in self.blocks_of(ATCBlock):
            block.linkage, block.prop_attn = linkage, prop_attn

    def layer_settings(self) -> list[Optional[int]]:
        """Each reducing block's cluster count (a stage whose count is 0 does not reduce, as the official code)."""
        counts = cluster_counts(self.vit.patch_embed.num_patches, self.keep_rate, len(self.reduction_layers))
        settings: list[Optional[int]] = [None] * self.depth
        for layer, count in zip(self.reduction_layers, counts):
            settings[layer] = count or None
        return settings

    def forward_head(self, x: Tensor, size: Optional[Tensor]) -> Tensor:
        return self.size_weighted_head(x, size)

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """The cosine similarities of the patch tokens, (T - p)^2 x head_dim, in each block that clustered (the
        clustering's comparisons are not MACs)."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        patches = tokens - self.num_prefix_tokens
        return (patches ** 2 * self.attention().head_dim * (mlp_tokens < tokens)).sum(1)


# ------------------------------------------------------------------------------------------------ module
def official_args(path: str) -> Optional[argparse.Namespace]:
    """The `args` an official ATC checkpoint (train_deit.py) stores, or None for any other file."""
    args = read_checkpoint_object(path).get("args")
    return args if isinstance(args, argparse.Namespace) and hasattr(args, "reduction_loc") else None


class ATCModule(ReductionModule):
    """`METHODS["atc"]`: cluster the patch tokens at `reduction_layers` (default 3, 6, 9) into
    `int(N0 * keep_rate^(s+1))` clusters with `linkage` complete, average or single, merged size-weighted, with
    proportional attention (`prop_attn`). Defaults: the official README's DeiT command (keep rate 0.9, complete
    linkage, proportional attention). An official checkpoint's own settings (its `args`) must match these keys."""

    static_shapes = True
    setting_keys = ("keep_rate", "linkage")
    off_settings = {"keep_rate": 1.0}
    demo_settings = {"keep_rate": 0.6, "reduction_layers": [0, 1]}  # (a 2-block model too: the DDP matrix)

    student: ATCStudent

    def __init__(
        self,
        *,
        keep_rate: float = 0.9,
        reduction_layers: Sequence[int] = (3, 6, 9),
        linkage: Linkage = "complete",
        prop_attn: bool = True,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        check_keep_rate(keep_rate)
        if linkage not in LINKAGES:
            raise ValueError(f"model.linkage: expected one of {', '.join(LINKAGES)}, got {linkage!r}")
        if self.hp.weights is not None:
            check_official_settings(self.hp.weights, keep_rate, list(reduction_layers), linkage, prop_attn)
        self.target_keep_rate = keep_rate
        self.build_student(ATCStudent, block_fn=ATCBlock, keep_rate=keep_rate, reduction_layers=tuple(reduction_layers),
                           linkage=linkage, prop_attn=prop_attn)

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.student.keep_rate = 1.0 - alpha * (1.0 - self.target_keep_rate)
        return {"keep_rate": self.student.keep_rate}


def check_official_settings(path: str, keep_rate: float, layers: list[int], linkage: str, prop_attn: bool) -> None:
    """An official checkpoint was trained with its `args`: a different setting here is an error naming both."""
    args = official_args(path)
    if args is None:
        return
    ratio = list(getattr(args, "reduction_ratio", [keep_rate]))
    theirs = {"keep_rate": ratio[0] if len(ratio) == 1 else ratio, "reduction_layers": list(args.reduction_loc),
              "linkage": getattr(args, "linkage", linkage), "prop_attn": bool(getattr(args, "proportional_attn", prop_attn))}
    ours = {"keep_rate": keep_rate, "reduction_layers": layers, "linkage": linkage, "prop_attn": prop_attn}
    for key, value in theirs.items():
        if value != ours[key]:
            raise ValueError(f"model.{key}: {path} was trained with {key} {value!r} (its args), not {ours[key]!r}; "
                             f"set model.{key}={value!r}".replace("'", ""))

