"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024), faithful to mlvlab/MCTF.

In a reducing block (`reduction_layers`, default every block but the first), with the default one-step-ahead
attention, the merge happens at the START of the block:

1. The attention probabilities `A` of all T entering tokens are computed from q and k (with the log-size bias).
2. The block's input tokens are split by position parity (A = even, B = odd). Each pair scores
   `W_sim * W_info * W_size`:
   - `W_sim`: cosine similarity, mapped to [0, 1], to the power 1/tau_sim;
   - `W_info`: how little attention both receive, normalised per image, to the power 1/tau_info;
   - `W_size`: how small both are, to the power 1/tau_size.
3. The matching is bidirectional: r // 2 A tokens merge into their best B, then r - r // 2 B tokens into their
   best unmerged A. The merged tokens are averaged, weighted by attention received x size (pooling type 1). The
   attention map is merged the same way into the one-step-ahead attention `A'`: keys summed, queries averaged.
4. The block finishes on the T - r fused tokens with `A'` (values, projection, MLP).

Training adds a second branch of the same network (the "teacher") at a random r, and two losses on it: its
cross-entropy and a consistency loss (the student's class token towards the teacher's, on confidently right
images).

Differences from the official code, none changing its results on DeiT:
- LayerScale, qk-norm, gates and RoPE backbones are honoured.
- Every prefix token (class, distillation, registers) is protected and stays in front; the official code protects
  only the first one.
- No state is shared between forward calls.
- The two training branches run one after the other, not interleaved block by block, so only the order of
  drop-path draws differs.
- `one_step_ahead=0` (merging after the MLP) is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import ReductionModule, check_reduction_layers
from lightning_modules.layers import ReductionBlock
from lightning_modules.macs import linear_macs
from lightning_modules.ops import size_bias
from lightning_modules.trace import TokenTrace, TraceRecorder
from lightning_modules.vit import StudentOutput, ViTStudent

Rate = Union[int, float]  # tokens merged per reducing block, or (< 1) a fraction of the non-prefix tokens


# ------------------------------------------------------------------------------------------------ pure ops
def merge_count(tokens: int, r: Rate, num_prefix: int) -> int:
    """Tokens a reducing block with `tokens` entering (prefix included) merges away, as the official code:
    an int r is cut to `tokens - 10` when fewer than 10 would remain; a fraction r takes `int((tokens - p) * r)`;
    at most half the non-prefix tokens; never below 0."""
    if tokens - r < 10:
        r = tokens - 10
    count = int((tokens - num_prefix) * r) if r < 1 else int(r)
    return max(0, min(count, (tokens - num_prefix) // 2))


def mctf_scores(x: Tensor, received: Optional[Tensor], size: Optional[Tensor], num_prefix: int, tau_sim: float,
                tau_info: float, tau_size: float) -> Tensor:
    """The multi-criteria score of every (A, B) pair. x: (B, T, C) tokens (A = even positions, B = odd),
    received: (B, T) attention each token receives (mean over heads and queries), size: (B, T, 1) or None ->
    (B, ceil(T/2), floor(T/2)), in float32 at least (never fp16/bf16: near ties decide the order). A tau of 0 turns
    its factor off; prefix tokens score -inf (never a source or a destination)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    if tau_sim:
        scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        scores = x.new_ones(a.shape[0], a.shape[1], b.shape[1])
    if tau_info > 0 and received is not None:
        info = 1 / received.to(x.dtype)
        info = info / info.max(1, keepdim=True).values  # (B, T)
        scores = scores * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        small = 1 / size.to(x.dtype)
        small = small / small.max(1, keepdim=True).values  # (B, T, 1)
        scores = scores * (small[:, ::2] * small[:, 1::2].transpose(1, 2)) ** (1 / tau_size)
    if num_prefix:
        scores[:, :(num_prefix + 1) // 2] = -math.inf  # A-side prefix: never a source
        scores[:, :, :num_prefix // 2] = -math.inf  # B-side prefix: never a destination
    return scores


@dataclass(frozen=True)
class Fusion:
    """One bidirectional bipartite merge (`match`). Index tensors are `(B, k)`: into the A tokens (even positions),
    into the B tokens (odd positions), or (`dst_idx2`) into the unmerged A tokens."""

    unm_idx: Tensor  # unmerged A tokens, by position (the A-side prefix first)
    src_idx: Tensor  # A tokens merged into B (step 1)
    dst_idx: Tensor  # the B token each joins
    unm_idx2: Optional[Tensor]  # unmerged B tokens, in output order (step 2: by their best score, descending)
    src_idx2: Optional[Tensor]  # B tokens merged into unmerged A tokens (with what they received in step 1)
    dst_idx2: Optional[Tensor]  # the unmerged A token (its index in `unm_idx`) each joins
    num_prefix: int

    def __call__(self, x: Tensor, mode: str = "sum") -> Tensor:
        """x: (B, ..., T, C) -> (B, ..., T - r, C) along dim -2: [prefix, unmerged A (by position), B (unmerged B
        in step-2 order when bidirectional)], members combined by `mode` (sum, amax)."""
        a, b = x[..., ::2, :], x[..., 1::2, :]
        pa, pb = (self.num_prefix + 1) // 2, self.num_prefix // 2

        def index(idx: Tensor, like: Tensor) -> Tensor:  # (B, k) -> (B, ..., k, C)
            view = idx.reshape(idx.shape[0], *([1] * (like.dim() - 3)), idx.shape[1], 1)
            return view.expand(*like.shape[:-2], idx.shape[1], like.shape[-1])

        b = b.scatter_reduce(-2, index(self.dst_idx, b), a.gather(-2, index(self.src_idx, a)), reduce=mode)
        unm = a.gather(-2, index(self.unm_idx, a))
        if self.src_idx2 is None or self.dst_idx2 is None or self.unm_idx2 is None:
            return torch.cat([x[..., :self.num_prefix, :], unm[..., pa:, :], b[..., pb:, :]], dim=-2)
        unm = unm.scatter_reduce(-2, index(self.dst_idx2, unm), b.gather(-2, index(self.src_idx2, b)), reduce=mode)
        return torch.cat([x[..., :self.num_prefix, :], unm[..., pa:, :], b.gather(-2, index(self.unm_idx2, b))],
                         dim=-2)

    def dest(self, num_tokens: int) -> Tensor:
        """(B, T): where each entering token ends up (merged tokens: their destination's place)."""
        batch, device = self.unm_idx.shape[0], self.unm_idx.device
        p, pa, pb = self.num_prefix, (self.num_prefix + 1) // 2, self.num_prefix // 2
        t_a, t_b = (num_tokens + 1) // 2, num_tokens // 2
        kept_a = self.unm_idx.shape[1] - pa
        unm_place = torch.cat([2 * torch.arange(pa, device=device),  # A-side prefix: its own place
                               torch.arange(p, p + kept_a, device=device)]).expand(batch, -1)  # (B, len(unm_idx))
        b_place = torch.empty(batch, t_b, dtype=torch.long, device=device)
        b_place[:, :pb] = 2 * torch.arange(pb, device=device) + 1
        if self.unm_idx2 is None or self.src_idx2 is None or self.dst_idx2 is None:
            b_place[:, pb:] = torch.arange(p + kept_a, p + kept_a + t_b - pb, device=device)
        else:
            ranks = torch.arange(p + kept_a, p + kept_a + self.unm_idx2.shape[1], device=device).expand(batch, -1)
            b_place.scatter_(1, self.unm_idx2, ranks)
            b_place.scatter_(1, self.src_idx2, unm_place.gather(1, self.dst_idx2))
        a_place = torch.empty(batch, t_a, dtype=torch.long, device=device)
        a_place.scatter_(1, self.unm_idx, unm_place)
        a_place.scatter_(1, self.src_idx, b_place.gather(1, self.dst_idx))
        dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        dest[:, ::2], dest[:, 1::2] = a_place, b_place
        return dest


def match(scores: Tensor, r: int, num_prefix: int, bidirection: bool = True) -> Fusion:
    """The official bidirectional matching on `mctf_scores` (B, Ta, Tb), merging r tokens: r // 2 A tokens with the
    best scores join their best B token; then, on the same scores, r - r // 2 B tokens (non-prefix) with the best
    scores towards the unmerged A tokens join their best one. Without `bidirection`, r A tokens in one step."""
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    pb = num_prefix // 2
    node_max, node_idx = scores.max(dim=-1)  # (B, Ta): each A token's best B
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]
    dst_idx = node_idx.gather(1, src_idx)
    if num_prefix:
        unm_idx = unm_idx.sort(dim=1).values  # by position: the class token first
    if not bidirection:
        return Fusion(unm_idx, src_idx, dst_idx, None, None, None, num_prefix)
    toward_unmerged = scores.gather(1, unm_idx[..., None].expand(-1, -1, scores.shape[2])).transpose(1, 2)
    node_max2, node_idx2 = toward_unmerged[:, pb:].max(dim=-1)  # (B, Tb - pb): each B token's best unmerged A
    order2 = node_max2.sort(dim=-1, descending=True).indices
    src2 = order2[:, :r2]
    return Fusion(unm_idx, src_idx, dst_idx, order2[:, r2:] + pb, src2 + pb, node_idx2.gather(1, src2), num_prefix)


def pooling_weights(fusion: Fusion, size: Tensor, received: Tensor, pooling_type: int) -> tuple[Tensor, Tensor]:
    """How a group pools its members (types 0, 1, 3): each token's weight `(B, T, 1)` (0: its size; 1: attention
    received x size / max size; 3: 1) and each group's total weight `(B, T - r, 1)`."""
    with torch.no_grad():
        if pooling_type == 1:
            weight = received[..., None] * (size / size.amax(dim=-2, keepdim=True))
        elif pooling_type == 3:
            weight = torch.ones_like(size)
        else:
            weight = size
        return weight, fusion(weight, mode="sum")


def attend_ahead(fusion: Fusion, probs: Tensor, values: Tensor, dest: Tensor, weight: Tensor,
                 total: Tensor) -> Tensor:
    """The one-step-ahead attention's output without building it: `A' v'` = the queries' pooling of `A (v' of each
    key's group)`, as A' sums a group's key columns and pools its query rows (weights `weight`, `total` of
    `pooling_weights`). probs: (B, H, T, T), values: (B, H, T - r, D) of the fused tokens, dest: (B, T) each token's
    group -> (B, T - r, H D). One T x T x D product and no (B, H, T, T - r) tensors: faster than building A'."""
    B, H, T, D = probs.shape[0], probs.shape[1], probs.shape[2], values.shape[-1]
    spread = values.gather(2, dest[:, None, :, None].expand(B, H, T, D))  # (B, H, T, D): each key's group value
    per_query = (probs @ spread).transpose(1, 2).reshape(B, T, H * D)  # (B, T, H D) before pooling the queries
    return fusion(per_query * weight, mode="sum") / total


def fuse(fusion: Fusion, x: Tensor, size: Optional[Tensor], probs: Tensor, pooling_type: int = 1,
         one_step_ahead: bool = True) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Merge tokens x: (B, T, C) with sizes (B, T, 1) (None: all 1) under the block's attention probabilities
    `probs (B, H, T, T)` -> x (B, T - r, C), sizes, and the one-step-ahead attention (B, H, T - r, T - r) (None
    unless `one_step_ahead`). Pooling 0: size-weighted mean; 1: weighted by attention received x size / max size;
    2: channel max; 3: plain mean. Keys of a group are summed in the attention, queries pooled alike."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    keys_summed = fusion(probs[..., None], mode="sum").squeeze(-1) if one_step_ahead else None  # (B, H, T, T - r)
    ahead = None
    if pooling_type == 1:
        weight = size / size.amax(dim=-2, keepdim=True)
        with torch.no_grad():
            received = probs.mean(dim=(1, 2))[..., None]  # (B, T, 1)
            norm = fusion(received * weight, mode="sum")
        if keys_summed is not None:
            ahead = fusion(keys_summed * (received * weight)[:, None], mode="sum") / norm[:, None]
        x = fusion(x * received * weight, mode="sum") / norm
    elif pooling_type == 2:
        x = fusion(x, mode="amax")
        if keys_summed is not None:
            ahead = fusion(keys_summed, mode="amax")
    elif pooling_type == 3:
        with torch.no_grad():
            count = fusion(torch.ones_like(size), mode="sum")
        if keys_summed is not None:
            ahead = fusion(keys_summed, mode="sum") / count[:, None]
        x = fusion(x, mode="sum") / count
    else:
        with torch.no_grad():
            total = fusion(size, mode="sum")
        if keys_summed is not None:
            ahead = fusion(keys_summed * size[:, None], mode="sum") / total[:, None]
        x = fusion(x * size, mode="sum") / total
    with torch.no_grad():
        size = fusion(size, mode="sum")
    return x, size, ahead


# ------------------------------------------------------------------------------------------------ layers
class MCTFBlock(ReductionBlock[Optional[Tensor], Optional[Rate]]):
    """timm's Block with MCTF's fusion at its start (one-step-ahead). setting: r (None: a plain block); state: token
    sizes `(B, N, 1)`, None before the first merge. The knobs are set by `MCTFStudent`."""

    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True
    one_step_ahead: int = 1
    pooling_type: int = 1
    prop_attn: bool = True

    def reduce(self, x: Tensor, size: Optional[Tensor], r: Optional[Rate], record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        bias = size_bias(size, x.dtype) if self.prop_attn else None  # (B, 1, 1, N): towards each key j
        count = 0 if r is None else merge_count(x.shape[1], r, self.num_prefix)
        if count == 0:  # a plain block (with the size bias)
            attn = self.attn.forward_reduce(self.norm1(x), bias, rope=rope)
            return self.mlp_residual(x + self.drop_path1(self.ls1(attn.x))), size, None
        precise = self.one_step_ahead == 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and not precise):  # "precise" attends anew below
            probs = self.attn.attention_probs(self.norm1(x), bias, rope)  # (B, H, T, T): q, k of every token
        with torch.no_grad():
            received = probs.detach().mean(dim=(1, 2))  # (B, T) attention each token receives
            scores = mctf_scores(x, received if self.tau_info else None, size, self.num_prefix, self.tau_sim,
                                 self.tau_info, self.tau_size)
            fusion = match(scores, count, self.num_prefix, self.bidirection)
        # A' v' without building A' (types 0, 1, 3 pool linearly; attention dropout would act on A' itself)
        direct = not precise and self.pooling_type != 2 and not (self.training and self.attn.attn_drop.p > 0)
        dest = fusion.dest(x.shape[1]) if record or direct else None
        entering = size if size is not None else torch.ones_like(x[..., :1])
        x, size, ahead = fuse(fusion, x, entering, probs, self.pooling_type, one_step_ahead=not (precise or direct))
        h = self.norm1(x)
        if precise:  # a new attention on the fused tokens, with their sizes
            branch = self.attn.forward_reduce(h, size_bias(size, x.dtype) if self.prop_attn else None).x
        elif ahead is not None:
            branch = self.attn.attend_probs(h, ahead)
        else:
            assert dest is not None
            weight, total = pooling_weights(fusion, entering, received, self.pooling_type)
            branch = self.attn.project(h, attend_ahead(fusion, probs, self.attn.values(h), dest, weight, total))
        return self.mlp_residual(x + self.drop_path1(self.ls1(branch))), size, dest if record else None


# ------------------------------------------------------------------------------------------------ student
@dataclass
class MCTFState:
    """Where a pass ends: the student's token sizes and, in training with the teacher branch, that branch's
    final-norm tokens and sizes."""

    size: Optional[Tensor]
    teacher_tokens: Optional[Tensor] = None
    teacher_size: Optional[Tensor] = None


@dataclass
class TeacherBranch:
    """What MCTF's training losses read (`loss_inputs` of a training pass with the branch)."""

    logits: Tensor  # (B, classes) the branch's head
    cls: Tensor  # (B, C) its final-norm class token
    student_cls: Tensor  # (B, C) the student's


class MCTFStudent(ViTStudent):
    """A timm ViT with MCTF blocks merging `r` tokens (int, or a fraction < 1) at `reduction_layers`. In training
    with `teacher_branch`, a second pass of the same network at a random r up to `r_teacher_max` runs first."""

    def __init__(self, vit: Any, r: Rate = 16, reduction_layers: Optional[Sequence[int]] = None, tau_sim: float = 1.0,
                 tau_info: float = 20.0, tau_size: float = 40.0, bidirection: bool = True, one_step_ahead: int = 1,
                 pooling_type: int = 1, prop_attn: bool = True, r_teacher_max: Rate = 0,
                 teacher_branch: bool = False) -> None:
        super().__init__(vit)
        self.r = r
        self.strength = 1.0
        layers = range(1, len(vit.blocks)) if reduction_layers is None else reduction_layers  # every block but the first
        self.reduction_layers = check_reduction_layers(layers, len(vit.blocks))
        self.r_teacher_max = r_teacher_max
        self.teacher_branch = teacher_branch
        for block in self.blocks_of(MCTFBlock):
            block.tau_sim, block.tau_info, block.tau_size = tau_sim, tau_info, tau_size
            block.bidirection, block.one_step_ahead, block.pooling_type = bidirection, one_step_ahead, pooling_type
            block.prop_attn = prop_attn

    def layer_r(self) -> Rate:
        """r under the reduction schedule's strength (an int r rounds)."""
        if self.strength >= 1.0:
            return self.r
        return self.strength * self.r if self.r < 1 else int(round(self.strength * self.r))

    def layer_settings(self, r: Optional[Rate] = None) -> list[Optional[Rate]]:
        rate = self.layer_r() if r is None else r
        return [rate if layer in self.reduction_layers else None for layer in range(self.depth)]

    def teacher_r(self) -> Rate:
        """The teacher branch's r for one pass, from the global RNG as the official code draws it."""
        top = self.r_teacher_max
        if not top:
            return 0
        if top < 1:
            return int(torch.randint(0, int(top * 100), size=(1,))) / 100
        return int(torch.randint(0, int(top), size=(1,)))

    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder], rope: Optional[Tensor] = None,
                       train: bool = False) -> tuple[Tensor, MCTFState]:
        if not (train and self.teacher_branch):
            x, size = self.block_loop(x, recorder, rope, self.layer_settings())
            return x, MCTFState(size)
        follower = None  # RoPE follows the branch's own merges
        if recorder is not None and rope is not None:
            follower = TraceRecorder.start(x.shape[0], recorder.grid_size, self.num_prefix_tokens, x.device)
        teacher, teacher_size = self.block_loop(x, follower, rope, self.layer_settings(self.teacher_r()))
        x, size = self.block_loop(x, recorder, rope, self.layer_settings())
        return x, MCTFState(size, self.vit.norm(teacher), teacher_size)

    def forward_head(self, x: Tensor, state: MCTFState) -> Tensor:
        return self.size_weighted_head(x, state.size)

    def loss_inputs(self, x: Tensor, state: MCTFState) -> Optional[TeacherBranch]:
        if state.teacher_tokens is None:
            return None
        logits = self.size_weighted_head(state.teacher_tokens, state.teacher_size)
        return TeacherBranch(logits, state.teacher_tokens[:, 0], x[:, 0])

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """In each block that merged (T in, T' = T - r out), what differs from a plain block on T tokens:
        v, proj (and gate) run on T' tokens (QK^T and the attention-times-values product on T, see `attend_ahead`);
        the pair scores add ceil(T/2) x floor(T/2) x C. Max pooling and attention dropout in training build A' and
        multiply it on T' tokens instead. The "precise" variant runs q, k and QK^T on T tokens, then the whole
        attention on T'."""
        tokens, mlp_tokens = trace.tokens[:, :-1].double(), trace.mlp_tokens.double()
        attn = self.attention()
        width, dim = attn.heads_width, self.embed_dim
        qk = 2 * width * dim
        merged = mlp_tokens < tokens
        scores = torch.ceil(tokens / 2) * torch.floor(tokens / 2) * dim
        if self.blocks_of(MCTFBlock)[0].one_step_ahead == 2:
            extra = (tokens * qk + tokens ** 2 * width - (tokens - mlp_tokens) * linear_macs(attn)
                     - 2 * (tokens ** 2 - mlp_tokens ** 2) * width)
        else:
            extra = -(tokens - mlp_tokens) * (linear_macs(attn) - qk)
            block = self.blocks_of(MCTFBlock)[0]
            if block.pooling_type == 2 or (block.training and attn.attn_drop.p > 0):  # A' built: A'V on T'
                extra = extra - (tokens ** 2 - mlp_tokens ** 2) * width
        return ((extra + scores) * merged).sum(1)


# ------------------------------------------------------------------------------------------------ module
def class_logits(logits: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """The class head's logits (a distilled DeiT training with a teacher returns both heads')."""
    return logits[0] if isinstance(logits, tuple) else logits


class MCTFModule(ReductionModule):
    """`METHODS["mctf"]`: merge `r` tokens (or a fraction `r` < 1 of them) at `reduction_layers` (default: every block
    but the first, the official [1, ..., 11] on 12 blocks) by the product of similarity (`tau_sim`), informativeness
    (`tau_info`) and size (`tau_size`) scores, `bidirection`-ally, fused by `pooling_type`, with the
    `one_step_ahead` attention (1; 2: "precise") and proportional attention (`prop_attn`). MCTF-Fast: r 0.35 at
    [3, 6, 9].

    Training (the official fine-tuning): a teacher branch of the same network at r drawn from [0, `r_teacher_max`)
    adds `teacher` (its cross-entropy, weight `teacher_weight`) and `consistency` (the squared distance of the
    student's final class token to the branch's, on images whose true-label probability exceeds
    `consistency_threshold`, weight `consistency_weight`); it runs when either weight is > 0."""

    static_shapes = True
    setting_keys = ("r",)
    off_settings = {"r": 0}
    demo_settings = {"r": 6}  # every block but the first merges, at any depth

    student: MCTFStudent

    def __init__(
        self,
        *,
        r: Rate = 16,
        reduction_layers: Optional[Sequence[int]] = None,
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirection: bool = True,
        one_step_ahead: int = 1,
        pooling_type: int = 1,
        prop_attn: bool = True,
        r_teacher_max: Rate = 8,
        teacher_weight: float = 1.0,
        consistency_threshold: float = 0.4,
        consistency_weight: float = 3.0,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if r < 0:
            raise ValueError(f"model.r: expected tokens to merge per block (>= 1) or a fraction in [0, 1), got {r!r}")
        if one_step_ahead not in (1, 2):
            raise ValueError(f"model.one_step_ahead: expected 1 (the official one-step-ahead attention) or 2 "
                             f"(precise), got {one_step_ahead!r}; 0 (merging after the MLP) is not supported")
        if pooling_type not in (0, 1, 2, 3):
            raise ValueError(f"model.pooling_type: expected 0 (size), 1 (attention x size), 2 (max) or 3 (mean), "
                             f"got {pooling_type!r}")
        for key, value in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size),
                           ("r_teacher_max", r_teacher_max), ("teacher_weight", teacher_weight),
                           ("consistency_threshold", consistency_threshold), ("consistency_weight", consistency_weight)):
            if value < 0:
                raise ValueError(f"model.{key}: expected a value >= 0, got {value!r}")
        self.target_r = r
        self.teacher_weight = teacher_weight
        self.consistency_threshold = consistency_threshold
        self.consistency_weight = consistency_weight
        self.build_student(MCTFStudent, block_fn=MCTFBlock, r=r,
                           reduction_layers=None if reduction_layers is None else tuple(reduction_layers), tau_sim=tau_sim,
                           tau_info=tau_info, tau_size=tau_size, bidirection=bidirection, one_step_ahead=one_step_ahead,
                           pooling_type=pooling_type, prop_attn=prop_attn, r_teacher_max=r_teacher_max,
                           teacher_branch=teacher_weight > 0 or (consistency_threshold > 0 and consistency_weight > 0))

    def reduction_terms(self, out: StudentOutput[TeacherBranch], images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """`teacher` and `consistency` from the teacher branch (none without it)."""
        branch = out.loss_inputs
        if branch is None:
            return {}
        terms = {"teacher": self.classification_loss(class_logits(branch.logits), targets)}
        with torch.no_grad():
            probs = class_logits(out.logits).float().softmax(dim=-1)
            # the probability of the true label (with mixup: of both mixed labels, as the official flip)
            labels = targets if targets.ndim == 2 else F.one_hot(targets, probs.shape[-1])
            confidence = (probs * (labels > labels.amin(dim=-1, keepdim=True))).sum(-1)
            passed = (confidence > self.consistency_threshold).to(probs.dtype)  # (B,)
        distance = (branch.cls.detach().float() - branch.student_cls.float()).pow(2).mean(dim=1)  # (B,)
        terms["consistency"] = (distance * passed).sum() / passed.sum().clamp(min=1)
        return terms

    def loss_weights(self) -> dict[str, float]:
        return super().loss_weights() | {"teacher": self.teacher_weight, "consistency": self.consistency_weight}

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.student.strength = alpha
        return {"r": float(self.student.layer_r())}
