"""DiffRate: differentiable compression rates (Chen et al., ICCV 2023), faithful to OpenGVLab/DiffRate.

In every block, after the attention residual, the tokens are ranked by the class token's attention (mean over
heads of this block's softmax, proportional attention included). Pruning keeps the first `prune_kept_num`; if
`merge_kept_num` is smaller, the first `merge_kept_num` tokens are destinations and every other kept token merges
into its most similar destination (cosine similarity of the token features, the class token never a destination):
an unweighted mean including the destination. A merged token's size grows by the source's size times its
similarity; proportional attention (log size) runs in every block. Counts include the class token.

Evaluation uses fixed counts: `prune_kept_num`/`merge_kept_num` (one per block, or one for every block), or the
official `compression_rate.json` entry for the backbone and `target_flops`. Training with `target_flops` is the
official rate search: the backbone is frozen, each block's prune and merge counts are expectations over candidate
counts (step `granularity`) under learned probabilities, tokens are masked instead of removed (policy softmax),
and the loss adds `flops_weight x (GFLOPs - target_flops)^2` with the official FLOP formula; the counts searched so
far are what evaluation (and the checkpoint) uses. Training without `target_flops` trains the backbone with the
fixed counts (leanvit's extension: the merges are differentiable, as ToMe's).

Differences from the official code, none changing its results on DeiT: LayerScale, qk-norm and fused attention are
honoured, the distillation token and registers are protected like the class token (they come on top of the
counts), and a block that removes no token leaves the tokens in place (the official code re-sorts them).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.base import ReductionModule
from lightning_modules.layers import ReductionBlock
from lightning_modules.macs import linear_macs
from lightning_modules.ops import GatherMerge, policy_softmax, size_bias
from lightning_modules.trace import TokenTrace, TraceRecorder
from lightning_modules.vit import StudentOutput, ViTStudent, backbone_name

log = logging.getLogger(__name__)

# The official searched rates (OpenGVLab/DiffRate compression_rate.json), package data beside this module.
COMPRESSION_RATES = Path(__file__).resolve().parent / "diffrate_compression_rate.json"
RATE_KEYS = {  # timm backbone (tag dropped) -> the official file's model key
    "deit_tiny_patch16_224": "ViT-T-DeiT", "deit_small_patch16_224": "ViT-S-DeiT",
    "deit_base_patch16_224": "ViT-B-DeiT", "vit_base_patch16_224.mae": "ViT-B-MAE",
    "vit_large_patch16_224.mae": "ViT-L-MAE", "vit_huge_patch14_224.mae": "ViT-H-MAE",
}
Counts = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------------ pure ops
def official_rates(backbone: str, target_flops: float, path: Path = COMPRESSION_RATES) -> Optional[tuple[list[int], list[int]]]:
    """The official searched `(prune_kept_num, merge_kept_num)` for a backbone at `target_flops` GFLOPs, or None
    when the file has no entry for them."""
    key = RATE_KEYS.get(backbone) or RATE_KEYS.get(backbone.split(".")[0])
    rates = json.loads(path.read_text()).get(key or "", {})
    entry = rates.get(str(float(target_flops)))
    if entry is None:
        return None
    return json.loads(entry["prune_kept_num"]), json.loads(entry["merge_kept_num"])


def available_rates(backbone: str, path: Path = COMPRESSION_RATES) -> list[str]:
    key = RATE_KEYS.get(backbone) or RATE_KEYS.get(backbone.split(".")[0])
    return list(json.loads(path.read_text()).get(key or "", {}))


class _STECeil(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.ceil(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _STEMin(torch.autograd.Function):
    """min(n, a, b) forward; the gradient goes to both a and b (never to n), as the official `ste_min`."""

    @staticmethod
    def forward(ctx: Any, n: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.minimum(torch.minimum(n, a), b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        return None, grad, grad


class RateProxy(nn.Module):
    """The official differentiable discrete proxy of one block's kept patch count: learned probabilities over
    candidate counts `num_patches, num_patches - granularity, ...` (just `num_patches` for block 0, which the
    official code never compresses)."""

    def __init__(self, num_patches: int, granularity: int) -> None:
        super().__init__()
        self.candidates: Tensor
        self.register_buffer("candidates", torch.arange(num_patches, 0, -granularity).float(), persistent=False)
        self.logits = nn.Parameter(torch.zeros(self.candidates.shape[0]))

    def expected(self) -> Tensor:
        """ceil(E[count]) patches, with a straight-through gradient (a 0-d tensor)."""
        return _STECeil.apply(self.candidates @ self.logits.softmax(-1))

    def token_mask(self, kept: int, upto: int) -> Tensor:
        """(num_patches,) 1 for patch positions kept, 0 for those in [kept, upto), with the gradient of each
        position's probability of being kept (the official STE mask)."""
        positions = torch.arange(int(self.candidates[0]), device=self.logits.device)
        probability = (positions[:, None] < self.candidates[None, :]).float() @ self.logits.softmax(-1)
        mask = torch.ones_like(probability)
        mask[kept:upto] = 0
        return mask - probability.detach() + probability


class DiffRateRates(nn.Module):
    """Every block's prune and merge proxies and the counts evaluation uses (`kept`: (2, depth) patch counts,
    prune then merge; updated by every search step, as the official `kept_token_number`)."""

    def __init__(self, depth: int, num_patches: int, granularity: int) -> None:
        super().__init__()
        sizes = [num_patches + 1] + [granularity] * (depth - 1)
        self.prune = nn.ModuleList(RateProxy(num_patches, g) for g in sizes)
        self.merge = nn.ModuleList(RateProxy(num_patches, g) for g in sizes)
        self.kept: Tensor
        self.register_buffer("kept", torch.full((2, depth), num_patches, dtype=torch.long))
        # `kept` as Python ints: what inference reads, so torch.compile sees constants rather than a
        # data-dependent `.tolist()` (a graph break); refreshed by `set_kept` and after load_state_dict
        self.counts: list[tuple[int, int]] = [(num_patches, num_patches)] * depth
        self.register_load_state_dict_post_hook(lambda module, _: module.sync_counts())

    def set_kept(self, kept: Tensor) -> None:
        """Set the (2, depth) patch counts evaluation uses (prune, then merge)."""
        with torch.no_grad():
            self.kept.copy_(kept)
        self.sync_counts()

    def sync_counts(self) -> None:
        prune, merge = self.kept.tolist()
        self.counts = list(zip(prune, merge))

    def expected_counts(self) -> list[list[int]]:
        with torch.no_grad():
            return [[int(cast(RateProxy, p).expected()) for p in proxies] for proxies in (self.prune, self.merge)]


def prune_and_merge(x: Tensor, size: Tensor, order: Tensor, prune: int, merge: int, num_prefix: int,
                    clamp_sizes: bool = False) -> tuple[Tensor, Tensor, GatherMerge]:
    """One block's pruning and merging at inference. x: (B, N, C) after the attention residual, size: (B, N, 1);
    order: (B, N - p) patch tokens by class attention, highest first; prune/merge: patch counts kept ->
    x `(B, p + merge, C)`: the prefix, then the first `merge` tokens of the order, each the unweighted mean of
    itself and the tokens ranked in [merge, prune) most similar to it (cosine of the features); the sizes (a
    source adds its size times that similarity, at least 1 with `clamp_sizes` as the official training path; without,
    a dissimilar source can take a size to 0 or below and proportional attention to NaN, as the official inference);
    and the merge as a `GatherMerge` (for the token map)."""
    c, p = x.shape[2], num_prefix
    dst_idx, src_idx = order[:, :merge], order[:, merge:prune]  # (B, merge), (B, prune - merge)
    tokens, sizes = x[:, p:], size[:, p:, 0]
    dst = tokens.gather(1, dst_idx[..., None].expand(-1, -1, c))
    src = tokens.gather(1, src_idx[..., None].expand(-1, -1, c))
    with torch.no_grad():
        similarity = F.normalize(src, dim=-1) @ F.normalize(dst, dim=-1).transpose(-1, -2)  # (B, sources, merge)
        best, partner = similarity.max(dim=-1)  # each source's destination
    count = torch.ones_like(sizes[:, :merge]).scatter_add(1, partner, torch.ones_like(best, dtype=sizes.dtype))
    dst = dst.scatter_add(1, partner[..., None].expand(-1, -1, c), src) / count[..., None]  # the mean, itself included
    added = sizes.gather(1, src_idx) * best.to(sizes.dtype)  # (B, sources)
    dst_size = sizes.gather(1, dst_idx).scatter_add(1, partner, added.clamp(min=1) if clamp_sizes else added)
    merged = GatherMerge(kept_idx=order[:, :0], src_idx=src_idx, dst_idx=dst_idx, dst_of_src=partner, num_prefix=p)
    return torch.cat([x[:, :p], dst], dim=1), torch.cat([size[:, :p], dst_size[..., None]], dim=1), merged


def search_dest(order: Tensor, head: int, rest: int, last: int, partner: Optional[Tensor]) -> Tensor:
    """The token map of one search step. order: (B, N) the entering token at each sorted position; sorted positions
    [head, rest) merged into `partner (B, rest - head)` (positions < head; None: no merge), [rest, last) pruned ->
    dest (B, N): each entering token's position after the step, -1 when pruned."""
    batch, n = order.shape
    positions = torch.arange(n, device=order.device).expand(batch, -1)
    after = positions.clone()  # sorted position -> position after the step
    after[:, rest:last] = -1
    if partner is not None:
        after[:, head:rest] = partner
    return after.gather(1, torch.empty_like(order).scatter_(1, order, positions))  # (entering -> sorted) -> after


def official_macs(num_patches: int, counts: list[tuple[Tensor, Tensor]], attn_macs: int, attn_dim: int,
                  mlp_macs: int, embed_macs: int, head_macs: int, num_prefix: int = 1) -> Tensor:
    """The official `calculate_flop_*` (in MACs, as its "FLOPs"): per block attention on the tokens entering it,
    the MLP on min(tokens, prune, merge) with a gradient to both counts; patch embedding on N0 + 1 tokens."""
    n = torch.tensor(float(num_patches + num_prefix))
    total = n * embed_macs + head_macs
    for prune, merge in counts:
        total = total + n * attn_macs + 2 * n * n * attn_dim
        n = _STEMin.apply(n.to(prune), prune + num_prefix, merge + num_prefix)
        total = total + n * mlp_macs
    return total


# ------------------------------------------------------------------------------------------------ layers
class DiffRateBlock(ReductionBlock[Optional[Tensor], Optional[tuple[int, int]]]):
    """timm's Block with DiffRate's prune-then-merge between the attention residual and the MLP.
    setting: (prune, merge) patch counts; state: token sizes `(B, N, 1)` (None: all 1)."""

    clamp_sizes: bool = False

    def reduce(self, x: Tensor, size: Optional[Tensor], setting: Optional[tuple[int, int]], record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        p = self.num_prefix
        n = x.shape[1] - p
        prune = n if setting is None else min(setting[0], n)
        merge = min(prune if setting is None else setting[1], prune)
        bias = size_bias(size, x.dtype)  # (B, 1, 1, N), proportional attention in every block
        attn = self.attn.forward_reduce(self.norm1(x), bias, cls_attn=merge < n, rope=rope)
        x = x + self.drop_path1(self.ls1(attn.x))
        if merge == n:  # nothing leaves this block
            return self.mlp_residual(x), size, None
        assert attn.cls_attn is not None  # asked for above
        order = torch.sort(attn.cls_attn[:, p:], dim=1, descending=True).indices  # (B, n)
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        x, size, merged = prune_and_merge(x, size, order, prune, merge, p, self.clamp_sizes)
        dest = merged.dest(p + n) if record else None
        return self.mlp_residual(x), size, dest

    def search(self, x: Tensor, size: Tensor, mask: Tensor, prune_proxy: RateProxy, merge_proxy: RateProxy,
               record: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
        """The official training step: every token stays, sorted by class attention; pruned and merged tokens are
        masked (policy softmax) with straight-through gradients to the proxies. x: (B, N, C), size: (B, N, 1),
        mask: (B, N) -> x, size, mask, the expected prune and merge patch counts, and with `record` the token map
        `dest (B, N)`: each entering token's position after the sort, its destination's when merged, -1 when pruned."""
        p, c = self.num_prefix, x.shape[2]
        attn = self.attn.forward_reduce(self.norm1(x), size_bias(size, x.dtype), cls_attn=True, softmax=partial(policy_softmax, policy=mask))
        x = x + self.drop_path1(self.ls1(attn.x))
        assert attn.cls_attn is not None  # asked for above
        order = torch.sort(attn.cls_attn[:, p:], dim=1, descending=True).indices + p
        order = torch.cat([torch.arange(p, device=x.device).expand(x.shape[0], -1), order], dim=1)  # (B, N)
        x = x.gather(1, order[..., None].expand(-1, -1, c))
        size, mask = size.gather(1, order[..., None]), mask.gather(1, order)
        last = int(mask[0, p:].sum())  # patch tokens still taking part (the same for every image)
        prune = prune_proxy.expected()
        patch_mask = torch.ones_like(mask[0, p:])
        if int(prune) < last:
            patch_mask = patch_mask * prune_proxy.token_mask(int(prune), last)
        mid = min(last, int(prune))
        merge = merge_proxy.expected()
        keep = int(merge)
        if keep < mid:
            patch_mask = patch_mask * merge_proxy.token_mask(keep, mid)
            head, rest = p + keep, p + mid  # destinations: positions [0, head); sources: [head, rest)
            with torch.no_grad():
                metric = F.normalize(x[:, :rest].detach(), dim=-1)
                similarity = metric[:, head:] @ metric[:, :head].transpose(-1, -2)  # (B, sources, destinations)
                similarity[..., :p] = -math.inf  # prefix tokens are never destinations
                best, partner = similarity.max(dim=-1)
            index = partner[..., None]
            dst = x[:, :head].scatter_reduce(1, index.expand(-1, -1, c), x[:, head:rest], reduce="mean")
            x = torch.cat([dst, x[:, head:]], dim=1)  # sources stay (masked), as the official training path
            scaled = torch.cat([size[:, :head], size[:, head:rest] * best[..., None]], dim=1).clamp(min=1)
            merged = scaled[:, :head].scatter_reduce(1, index, scaled[:, head:], reduce="sum")
            size = torch.cat([merged, scaled[:, head:], size[:, rest:]], dim=1)
        mask = mask * torch.cat([torch.ones_like(mask[0, :p]), patch_mask])[None]
        dest = search_dest(order, p + min(keep, mid), p + mid, p + last, partner if keep < mid else None) if record else None
        return self.mlp_residual(x), size, mask, prune, merge, dest


# ------------------------------------------------------------------------------------------------ student
@dataclass
class RateSearch:
    """The state a search pass ends with: every block's expected (prune, merge) patch counts (what the FLOP loss
    reads) and the `(B, N)` mask of the tokens still taking part."""

    counts: list[tuple[Tensor, Tensor]]
    mask: Tensor


class DiffRateStudent(ViTStudent):
    """A timm ViT with DiffRate blocks; `rates` holds the search proxies and the counts evaluation uses."""

    added_modules = ("rates",)

    def __init__(self, vit: Any, granularity: int = 4, clamp_sizes: bool = False) -> None:
        super().__init__(vit)
        for block in vit.blocks:
            block.clamp_sizes = clamp_sizes
        if vit.cls_token is None:
            raise ValueError(f"model.backbone: {backbone_name(vit)} has no class token, and DiffRate ranks tokens by the "
                             f"class token's attention")
        self.rates = DiffRateRates(self.depth, vit.patch_embed.num_patches, granularity)  # counts: set by the module
        self.search = False  # training searches the rates (the module sets it for `target_flops`)

    def layer_settings(self) -> list[tuple[int, int]]:
        return self.rates.counts

    def forward_head(self, x: Tensor, state: Optional[Tensor] | RateSearch) -> Tensor:
        # the search's sizes are not its head's (the class token: DiffRate needs one, which no size weighs)
        return self.size_weighted_head(x, state if isinstance(state, Tensor) else None)

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """In each block that reduced: the class token's attention row beside fused SDPA (N x attn_dim) and the
        similarities of the sources to the destinations ((prune - merge) x merge x C)."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        p, attn_dim = self.num_prefix_tokens, self.attention().heads_width
        prune = torch.minimum(self.rates.kept[0].to(tokens) + p, tokens)  # (B, depth) tokens after pruning
        reduced = mlp_tokens < tokens
        fused = float(self.attention().fused)
        similarity = (prune - mlp_tokens) * (mlp_tokens - p) * self.embed_dim
        return ((tokens * attn_dim * fused + similarity) * reduced).sum(1)

    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder], rope: Optional[Tensor] = None,
                       train: bool = False) -> tuple[Tensor, Optional[Tensor] | RateSearch]:
        """The fixed counts (state: token sizes), or in training with `search` on the official rate search."""
        if not (train and self.search):
            return super().forward_blocks(x, recorder, rope, train)
        size, mask = x.new_ones(*x.shape[:2], 1), x.new_ones(*x.shape[:2])
        counts = []
        for layer, block in enumerate(self.blocks_of(DiffRateBlock)):
            if recorder is not None:
                recorder.block(mask.sum(1))
            entering = x
            x, size, mask, prune, merge, dest = self.run_block(block.search, x, size, mask, self.rates.prune[layer],
                                                               self.rates.merge[layer], recorder is not None)
            if recorder is not None and dest is not None:
                recorder.remap(dest, entering)
                recorder.mlp(mask.sum(1))
            counts.append((prune, merge))
        # what evaluation uses from now on, as the official kept_token_number
        self.rates.set_kept(torch.tensor([[int(a) for a, _ in counts], [int(b) for _, b in counts]]))
        return x, RateSearch(counts, mask)

    def tokens_out(self, x: Tensor, state: Optional[Tensor] | RateSearch) -> Tensor | int:
        return state.mask.sum(1) if isinstance(state, RateSearch) else x.shape[1]

    def loss_inputs(self, x: Tensor, state: Optional[Tensor] | RateSearch) -> Optional[list[tuple[Tensor, Tensor]]]:
        return state.counts if isinstance(state, RateSearch) else None


# ------------------------------------------------------------------------------------------------ module
def check_counts(name: str, counts: Counts, depth: int) -> list[int]:
    values = [counts] * depth if isinstance(counts, int) else list(counts)
    if len(values) != depth or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"model.{name}: expected {depth} token counts >= 1 (class token included), or one for "
                         f"every block, got {counts!r}")
    return values


class DiffRateModule(ReductionModule):
    """`METHODS["diffrate"]`: prune, then merge, to per-block counts (`prune_kept_num`, `merge_kept_num`: class
    token included, one per block or one for all), or the official searched ones for `target_flops`; with
    `target_flops`, `fit` is the official rate search (arch parameters only, `flops_weight x (GFLOPs - target)^2`,
    `granularity` tokens between candidate counts; `flops_warmup_epochs` without the FLOP term, as
    `--warmup_compression_rate`). `clamp_sizes`: each merged source adds at least 1 to its destination's size at
    inference too, as the official training path does (off: the official inference, where a source with a negative
    similarity lowers the size, down to 0 or below, which makes proportional attention NaN)."""

    student: DiffRateStudent

    needs_class_token = True
    setting_keys = ("prune_kept_num", "merge_kept_num", "target_flops")
    off_settings = {"prune_kept_num": None, "merge_kept_num": None, "target_flops": None}
    demo_settings = {"prune_kept_num": 48, "merge_kept_num": 40, "clamp_sizes": True}

    def __init__(
        self,
        *,
        prune_kept_num: Optional[Counts] = None,
        merge_kept_num: Optional[Counts] = None,
        target_flops: Optional[float] = None,
        granularity: int = 4,
        clamp_sizes: bool = False,
        flops_weight: float = 5.0,
        flops_warmup_epochs: float = 0.0,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if (prune_kept_num is None) != (merge_kept_num is None):
            raise ValueError("model.prune_kept_num, model.merge_kept_num: give both (or target_flops)")
        if prune_kept_num is not None and target_flops is not None:
            raise ValueError("model.target_flops: give it or prune_kept_num/merge_kept_num, not both")
        if granularity < 1:
            raise ValueError(f"model.granularity: expected a positive token step, got {granularity!r}")
        self.target_flops = target_flops
        self.flops_weight = flops_weight
        self.flops_warmup_epochs = flops_warmup_epochs
        self.build_student(DiffRateStudent, block_fn=DiffRateBlock, granularity=granularity,
                           clamp_sizes=clamp_sizes)
        rates, depth, backbone = self.student.rates, self.student.depth, self.hp.backbone
        if target_flops is not None and getattr(self.student.vit, "rope", None) is not None:
            raise ValueError("model.target_flops: DiffRate's rate search re-sorts and masks tokens, which leanvit does "
                             "not follow with RoPE; on this RoPE backbone give prune_kept_num and merge_kept_num")
        counts = None
        if prune_kept_num is not None and merge_kept_num is not None:  # (both or neither: checked above)
            counts = (check_counts("prune_kept_num", prune_kept_num, depth),
                      check_counts("merge_kept_num", merge_kept_num, depth))
        elif target_flops is not None:
            counts = official_rates(backbone, target_flops)
            if counts is None:
                log.warning("model.target_flops: compression_rate.json has no %s G entry for %s (it has %s): until a "
                            "search (fit) has run, evaluation uses the search's starting counts", target_flops,
                            backbone, available_rates(backbone) or "none")
                rates.set_kept(torch.tensor(rates.expected_counts()))
        if counts is not None:
            if any(len(c) != depth for c in counts):
                raise ValueError(f"model.target_flops: the {target_flops} G counts are for another depth than {depth}")
            rates.set_kept(torch.tensor(counts) - 1)
        self.student.search = self.searching
        if self.searching:
            self.student.vit.requires_grad_(False)  # the official search steps the arch parameters only
        else:
            rates.requires_grad_(False)  # fixed counts: the search parameters take no part (DDP needs every one used)

    @property
    def searching(self) -> bool:
        """fit searches the rates (`target_flops` set) rather than training the backbone at fixed counts."""
        return self.target_flops is not None

    def official_gmacs(self, counts: list[tuple[Tensor, Tensor]]) -> Tensor:
        vit: Any = self.student.vit
        block = self.student.blocks_of(DiffRateBlock)[0]
        proj = vit.patch_embed.proj
        return official_macs(vit.patch_embed.num_patches, counts, linear_macs(block.attn), block.attn.heads_width,
                             linear_macs(block.mlp), proj.weight[0].numel() * proj.out_channels, linear_macs(vit.head),
                             self.student.num_prefix_tokens) / 1e9

    def reduction_terms(self, out: StudentOutput[list[tuple[Tensor, Tensor]]], images: Tensor,
                        targets: Tensor) -> dict[str, Tensor]:
        """`flops` while searching: (official GFLOPs of the expected counts - target)^2."""
        if out.loss_inputs is None or self.target_flops is None:
            return {}
        return {"flops": (self.official_gmacs(out.loss_inputs) - self.target_flops) ** 2}

    def loss_weights(self) -> dict[str, float]:
        weights = super().loss_weights()
        if self.searching:
            warm = self._trainer is not None and self.schedule_epoch() < self.flops_warmup_epochs
            weights["flops"] = 0.0 if warm else self.flops_weight
        return weights

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.searching:
            return super().param_groups()
        return [{"params": list(self.student.rates.parameters()), "weight_decay": self.hp.weight_decay}]
