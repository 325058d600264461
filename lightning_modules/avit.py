"""A-ViT: adaptive token halting (Yin et al., CVPR 2022), faithful to NVlabs/A-ViT - and fast.

After each block every token gets a halting score `h = sigmoid(gate_scale * x[:, :, 0] - gate_center)` from
its raw output; a token halts once its cumulative score reaches `1 - eps` (every token halts at the last
block). Its output is the ACT-weighted sum of its block outputs (h while running, the remainder R at the
halting block), which feeds the final norm and the head. No parameters are added.

Training (`run(train=True)`, `forward_masked`) is the official computation: every token stays, halted ones are zeroed
before each block, get a -1000 key bias, and their outputs are zeroed. The official code never removes a
token, so it is no faster. Inference here does: each image runs only its active tokens, packed across the
batch into one varlen sequence (the linear layers see no padding; attention pads per image), and an image
stops as soon as the tokens its head reads (the class token) have halted. Both give the same logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_modules.base import PerStage, ReductionModule
from lightning_modules.layers import ReductionAttentionOps, ReductionBlock
from lightning_modules.ops import identity_rope
from lightning_modules.trace import TokenTrace, TraceRecorder
from lightning_modules.vit import StudentOutput, ViTStudent

MASKED_KEY_BIAS = -1000.0  # the official additive logit for halted keys


# ------------------------------------------------------------------------------------------------ pure ops
def halting_score(x: Tensor, gate_scale: float, gate_center: float) -> Tensor:
    """A-ViT's parameter-free halting score from channel 0 of a block's raw output: (..., C) -> (...)."""
    return torch.sigmoid(x[..., 0] * gate_scale - gate_center)


@dataclass
class ACTStep:
    """One layer of A-ViT's halting bookkeeping, for tokens that were active entering the layer."""

    c: Tensor  # cumulative halting score after this layer
    R: Tensor  # remainder after this layer
    weight: Tensor  # weight of this layer's output in the token's output (h, or R at the halting layer)
    ponder: Tensor  # ponder cost added by this layer (1 for running it, + R when halting)
    active: Tensor  # bool: still running after this layer


def act_step(c: Tensor, R: Tensor, h: Tensor, eps: float) -> ACTStep:
    """The official per-layer update for active tokens (all tensors of one shape):
    c += h; a token that reaches 1 - eps halts, contributing its remainder R; otherwise it contributes h
    and R -= h. (A token landing exactly on 1 - eps halts contributing nothing, as in the official code.)"""
    c = c + h
    reached = c > 1 - eps
    not_reached = c < 1 - eps
    weight = torch.where(reached, R, torch.zeros_like(R)) + torch.where(not_reached, h, torch.zeros_like(h))
    ponder = 1.0 + torch.where(reached, R, torch.zeros_like(R))
    R = R - not_reached.to(h.dtype) * h
    return ACTStep(c, R, weight, ponder, not_reached)


def gaussian_depth_prior(depth: int, target_depth: float = 8.0, buffer: float = 0.02) -> Tensor:
    """The official prior target: a unit Gaussian over layer indices centred on `target_depth`, scaled so
    its first `target_depth` entries sum to 1 - buffer (not normalised: ~3.26 in total for 12 layers)."""
    pdf = torch.tensor([math.exp(-0.5 * (i - target_depth) ** 2) / math.sqrt(2 * math.pi) for i in range(depth)],
                       dtype=torch.float64)
    return (pdf * (1.0 - buffer) / pdf[:int(target_depth)].sum()).float()


def depth_prior_kl(layer_scores: Tensor, target: Tensor) -> Tensor:
    """The official prior term: `KLDivLoss(batchmean)(log clamp(H / sum H, .01, .99), target)` over the
    per-layer mean halting scores H `(depth,)`; batchmean on this 1-D input divides by the depth."""
    distr = (layer_scores / layer_scores.sum()).clamp(0.01, 0.99)
    return F.kl_div(distr.log(), target.to(distr), reduction="batchmean")


# ------------------------------------------------------------------------------------------------ layers
@dataclass
class PackedLayout:
    """Active tokens of several images as one flat sequence `(T, C)`, ordered by image then position.
    Attention scatters them into a padded `(B', L, ...)` batch of the images that still run."""

    image: Tensor  # (T,) image of each token in the original batch
    position: Tensor  # (T,) position of each token in its image's original sequence
    row: Tensor  # (T,) row in the padded batch
    rank: Tensor  # (T,) position within its row (= within its image's active tokens)
    counts: Tensor  # (B,) active tokens of every image of the batch, 0 once finished
    lengths: Tensor  # (B',) active tokens per running image
    uniform: bool  # every running image has all its tokens at the same count: no padding at all

    length: int  # the longest running image's token count (the padded length)

    @classmethod
    def build(cls, image: Tensor, position: Tensor, batch: int) -> PackedLayout:
        """One host sync (the three sizes the padded shapes need); bincount and boolean indexing would each add
        one on a GPU."""
        counts = torch.zeros(batch, dtype=torch.long, device=image.device).scatter_add_(0, image, torch.ones_like(image))
        running = counts > 0
        longest = counts.max()
        shortest = torch.where(running, counts, longest).min()
        rows, length, short = torch.stack([running.sum(), longest, shortest]).tolist()  # the one sync
        row_of_image = torch.cumsum(running, 0) - 1
        starts = torch.cumsum(counts, 0) - counts
        running_images = torch.argsort((~running).to(torch.uint8), stable=True)[:rows]  # (B',) in image order
        rank = torch.arange(image.shape[0], device=image.device) - starts[image]
        return cls(image, position, row_of_image[image], rank, counts, counts[running_images], short == length,
                   length)


def attend_packed(attn: ReductionAttentionOps, x: Tensor, layout: PackedLayout, rope: Optional[Tensor] = None) -> Tensor:
    """timm's attention on packed tokens. x: (T, C) active tokens of all running images -> (T, C); each image's
    tokens attend only to each other (the linear layers see no padding; the attention pads per image).
    rope: None or `(T, 1 or H, D)` every packed token's RoPE table (prefix tokens: the identity)."""
    qkv = attn.packed_qkv(x)  # (T, 3C)
    rows, length = layout.lengths.shape[0], layout.length

    def pad(t: Tensor) -> Tensor:  # (T, ...) -> (B', L, ...)
        if layout.uniform:
            return t.reshape(rows, length, *t.shape[1:])
        padded = t.new_zeros(rows, length, *t.shape[1:])
        padded[layout.row, layout.rank] = t
        return padded

    mask = None
    if not layout.uniform:
        mask = (torch.arange(length, device=x.device) < layout.lengths[:, None])[:, None, None, :]  # (B', 1, 1, L)
    qkv = pad(qkv).reshape(rows, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    rope = None if rope is None else pad(rope).transpose(1, 2)  # (B', 1 or H, L, D)
    out = attn.attend(qkv, mask, rope=rope)[0].transpose(1, 2).reshape(rows, length, attn.heads_width)  # (B', L, C)
    out = out.reshape(-1, attn.heads_width) if layout.uniform else out[layout.row, layout.rank]
    return attn.project(x, out)


class AViTBlock(ReductionBlock[Optional[Tensor], None]):
    """timm's Block with A-ViT's masking (official, training: `reduce`) and a packed varlen path (inference)."""

    def reduce(self, x: Tensor, halted: Optional[Tensor], setting: None = None, record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], None]:
        """x: (B, N, C); halted (state): (B, N) float, 1 for halted tokens (zeroed at every sub-layer input); the
        student updates it from the halting scores. None: timm's block."""
        if halted is None:
            return self.dense(x, rope), None, None
        keep = (1.0 - halted)[..., None]
        bias = (halted * MASKED_KEY_BIAS)[:, None, None, :].to(x.dtype)
        x = x + self.drop_path1(self.ls1(self.attn.forward_reduce(self.norm1(x * keep) * keep, bias, rope=rope).x))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x * keep) * keep))), halted, None

    def forward_packed(self, x: Tensor, layout: PackedLayout, rope: Optional[Tensor] = None) -> Tensor:
        x = x + self.ls1(attend_packed(self.attn, self.norm1(x), layout, rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


@dataclass
class HaltingOutput:
    """The masked forward pass: final features and what the losses and statistics need."""

    features: Tensor  # (B, N, C) ACT-weighted token outputs
    ponder: Tensor  # (B, N) rho: layers run + remainder at halting
    depth: Tensor  # (B, N) layers each token ran
    layer_scores: list[Tensor]  # per layer, the (B, N) halting scores of the block's outputs


# ------------------------------------------------------------------------------------------------ student
class AViTStudent(ViTStudent):
    """A timm ViT that halts tokens adaptively; `gate_scale`, `gate_center`, `eps` are fixed hyperparameters."""

    def __init__(self, vit: Any, gate_scale: float = 10.0, gate_center: float = 30.0, eps: float = 0.01) -> None:
        super().__init__(vit)
        self.gate_scale = gate_scale
        self.gate_center = gate_center
        self.eps = eps

    dense_from_trace = False  # its tokens never move: each patch's ACT output is its dense feature

    def head_tokens(self) -> int:
        """How many leading tokens the head reads: an image is finished once they have halted
        (0: global pooling or a dense head reads every token, so an image runs until all halt)."""
        if self.reads_patches:
            return 0
        if self.vit.global_pool == "token" or hasattr(self.vit, "dist_token"):
            return 2 if getattr(self.vit, "dist_token", None) is not None else 1
        return 0

    # -------------------------------------------------------------------------------------- masked (official)
    def forward_masked(self, x: Tensor, recorder: Optional[TraceRecorder] = None,
                       rope: Optional[Tensor] = None) -> HaltingOutput:
        """The official computation on embedded tokens x (B, N, C): nothing is removed (nor moved: RoPE as timm's)."""
        B, N, _ = x.shape
        c, R = x.new_zeros(B, N), x.new_ones(B, N)
        active = x.new_ones(B, N)
        ponder, depth = x.new_zeros(B, N), x.new_zeros(B, N)
        output = torch.zeros_like(x)
        scores: list[Tensor] = []
        out = x
        for layer, block in enumerate(self.blocks_of(AViTBlock)):
            # the official code zeroes `out.data`: halted values are masked, their gradients are not
            out = out + (out * active[..., None] - out).detach()
            if recorder is not None:
                recorder.drop(active > 0.5)
                recorder.block(active.sum(1))
            block_out, _, _ = self.run_block(block.reduce, out, 1.0 - active, None, False, self.layer_rope(rope, layer))
            h = halting_score(block_out, self.gate_scale, self.gate_center)
            scores.append(h)
            if layer == len(self.vit.blocks) - 1:
                h = torch.ones_like(h)
            step = act_step(c, R, h, self.eps)
            ponder = ponder + active * step.ponder
            depth = depth + active
            output = output + block_out * (active * step.weight)[..., None]
            c, R = step.c, step.R
            active = step.active.to(x.dtype)
            out = block_out
        if recorder is not None:
            recorder.drop(active > 0.5)
        return HaltingOutput(output, ponder, depth, scores)

    # -------------------------------------------------------------------------------------- packed (fast)
    def forward_packed(self, x: Tensor, recorder: Optional[TraceRecorder] = None,
                       rope: Optional[Tensor] = None) -> Tensor:
        """Inference on the active tokens only. x: (B, N, C) embedded -> (B, N, C) ACT outputs (tokens of
        finished images that never ran stay 0; the head does not read them). Each packed token takes its own
        patch's RoPE (the prefix tokens an identity rotation)."""
        B, N, C = x.shape
        device = x.device
        head = self.head_tokens()
        image = torch.arange(B, device=device).repeat_interleave(N)
        position = torch.arange(N, device=device).repeat(B)
        tokens = x.reshape(B * N, C)
        c, R = tokens.new_zeros(B * N), tokens.new_ones(B * N)
        output = torch.zeros_like(x)
        depth = len(self.vit.blocks)
        for layer, block in enumerate(self.blocks_of(AViTBlock)):
            layout = PackedLayout.build(image, position, B)
            if recorder is not None:
                self._record(recorder, layout, B, N)
            tokens = block.forward_packed(tokens, layout, self.packed_rope(rope, layer, position))
            h = halting_score(tokens, self.gate_scale, self.gate_center)
            if layer == depth - 1:
                h = torch.ones_like(h)
            step = act_step(c, R, h, self.eps)
            output.index_put_((image, position), tokens * step.weight[:, None], accumulate=True)
            keep = step.active  # (T,)
            if head:  # an image is finished once the tokens its head reads have halted
                reads = (keep & (position < head)).to(torch.uint8)
                alive = reads.new_zeros(B).scatter_reduce_(0, image, reads, "amax")  # (B,) 1 while it runs
                keep = keep & alive[image].bool()
            kept = keep.nonzero().squeeze(1)  # (T',) the block's one other host sync; then only gathers
            image, position, tokens = image[kept], position[kept], tokens[kept]
            c, R = step.c[kept], step.R[kept]
            if kept.numel() == 0:
                break
        if recorder is not None:
            finished = PackedLayout.build(image, position, B)
            for _ in range(len(recorder.counts), depth):  # images all finished early: nothing runs any more
                self._record(recorder, finished, B, N)
            self._record(recorder, finished, B, N, block=False)
        return output

    def packed_rope(self, rope: Optional[Tensor], layer: int, position: Tensor) -> Optional[Tensor]:
        """Block `layer`'s RoPE table for packed tokens at sequence `position (T,)` -> None or `(T, 1 or H, D)`."""
        table = self.layer_rope(rope, layer)  # (N0, D) or (H, N0, D)
        if table is None:
            return None
        full = torch.cat([identity_rope(table, self.num_prefix_tokens), table], dim=-2)  # (..., N, D)
        rows = full[..., position, :]  # (T, D) or (H, T, D)
        return rows[:, None] if rows.dim() == 2 else rows.transpose(0, 1)

    @staticmethod
    def _record(recorder: TraceRecorder, layout: PackedLayout, B: int, N: int, block: bool = True) -> None:
        """Point the owner map at the packed positions of the active tokens (and record a block's counts)."""
        where = torch.full((B, N), -1, dtype=torch.long, device=layout.image.device)
        where[layout.image, layout.position] = layout.rank
        recorder.place(where[:, recorder.num_prefix_tokens:])
        if block:
            recorder.block(layout.counts)

    # -------------------------------------------------------------------------------------- student API
    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder], rope: Optional[Tensor] = None,
                       train: bool = False) -> tuple[Tensor, Optional[HaltingOutput]]:
        """Training: the official masked computation (state: its halting statistics); inference: packed."""
        if train:
            out = self.forward_masked(x, recorder, rope)
            return out.features, out
        return self.forward_packed(x, recorder, rope), None

    def loss_inputs(self, x: Tensor, state: Optional[HaltingOutput]) -> Optional[HaltingOutput]:
        return state

    def dense_features(self, x: Tensor, state: Optional[HaltingOutput], recorder: Optional[TraceRecorder]) -> Tensor:
        """A-ViT's own dense rule: each patch's halting-weighted (ACT) output - the sum of its block outputs
        weighted as the class token's is for the head - through the final norm. Tokens never move, so this is
        `x` at the patch positions: a halted patch keeps what it contributed up to halting."""
        return self.vit.norm(x[:, self.num_prefix_tokens:])

    def tokens_out(self, x: Tensor, state: Optional[HaltingOutput]) -> Tensor:
        return x.new_zeros(x.shape[0], dtype=torch.long)  # every token has halted after the last block

    def tokens_to_head(self, trace: TokenTrace) -> Tensor:
        """Every token: each one's ACT output reaches the final norm and the head."""
        return torch.full_like(trace.tokens[:, -1], trace.owner[0].shape[1] + trace.num_prefix_tokens)


def average_depth(trace: TokenTrace) -> Tensor:
    """(B,) mean number of blocks each token of an image ran, from the token trace."""
    n0 = trace.owner[0].shape[1] + trace.num_prefix_tokens
    return trace.tokens[:, :-1].sum(1).float() / n0


# ------------------------------------------------------------------------------------------------ module
class AViTModule(ReductionModule):
    """`METHODS["avit"]`: adaptive halting with `gate_scale`/`gate_center` (10/30 DeiT-T, 10/75 DeiT-S) and
    `eps`. Loss terms `cls`, `ponder` (mean rho over images and tokens), `prior` (the Gaussian depth
    prior's KL), weighted 1 / `ponder_weight` / `prior_weight`. `prior_mean_over`: "batch" is the official
    per-layer mean `h[1:]`, which indexes the batch (drops the first image); "tokens" is the intended mean
    over every image's patch tokens. The reduction schedule, when configured, ramps the ponder weight from 0
    (the official code's unused halting warm-up)."""

    student: AViTStudent

    static_shapes = False  # each image runs its own token counts
    setting_keys = ("gate_scale", "gate_center")
    off_settings = {"gate_center": 1e4}  # sigmoid(x * scale - 1e4) = 0: no token halts before the last block
    demo_settings = {"gate_center": 3.0}

    def __init__(
        self,
        *,
        gate_scale: float = 10.0,
        gate_center: float = 30.0,
        eps: float = 0.01,
        ponder_weight: float = 5e-4,
        prior_weight: float = 1e-3,
        prior_target_depth: float = 8.0,
        prior_mean_over: Literal["batch", "tokens"] = "batch",
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"model.eps: expected a value in (0, 1) (a token halts when its cumulative score "
                             f"reaches 1 - eps), got {eps!r}")
        if gate_scale <= 0:
            raise ValueError(f"model.gate_scale: expected a positive slope, got {gate_scale!r}")
        if prior_mean_over not in ("batch", "tokens"):
            raise ValueError(f"model.prior_mean_over: expected batch or tokens, got {prior_mean_over!r}")
        self.target_ponder_weight = ponder_weight
        self.ponder_weight = ponder_weight
        self.prior_weight = prior_weight
        self.prior_mean_over = prior_mean_over
        self.build_student(AViTStudent, block_fn=AViTBlock, gate_scale=gate_scale, gate_center=gate_center, eps=eps)
        self.prior_target: Tensor
        self.register_buffer("prior_target", gaussian_depth_prior(self.student.depth, prior_target_depth),
                             persistent=False)
        self.depth_stats = PerStage(MeanMetric)

    def reduction_terms(self, halting: StudentOutput[HaltingOutput], images: Tensor,
                        targets: Tensor) -> dict[str, Tensor]:
        """`ponder` and `prior`, added to `cls` (+ `distill` with a DeiT teacher: the official A-ViT wraps its criterion
        in DeiT's DistillationLoss and adds the halting terms to it)."""
        out = halting.loss_inputs
        assert out is not None
        if self.prior_mean_over == "batch":
            layer_means = torch.stack([h[1:].mean() for h in out.layer_scores])  # the official indexing
        else:
            prefix = self.student.num_prefix_tokens
            layer_means = torch.stack([h[:, prefix:].mean() for h in out.layer_scores])
        return {
            "ponder": out.ponder.mean(),
            # the official code adds the prior only when it is positive
            "prior": F.relu(depth_prior_kl(layer_means, self.prior_target)),
        }

    def loss_weights(self) -> dict[str, float]:
        return super().loss_weights() | {"ponder": self.ponder_weight, "prior": self.prior_weight}

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.ponder_weight = alpha * self.target_ponder_weight
        return {"ponder_weight": self.ponder_weight}

    def eval_trace_hook(self, stage: str, trace: TokenTrace) -> None:
        self.depth_stats[stage].update(average_depth(trace))

    def on_validation_epoch_end(self) -> None:
        self.log_depth("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self.log_depth("test")
        super().on_test_epoch_end()

    def log_depth(self, stage: str) -> None:
        """`<stage>/avg_depth`: the blocks a token runs, on average over the images of the epoch."""
        self.log(f"{stage}/avg_depth", self.depth_stats[stage].compute())
        self.depth_stats[stage].reset()
