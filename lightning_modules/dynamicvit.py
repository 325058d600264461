"""DynamicViT: learned token sparsification (Rao et al., NeurIPS 2021), faithful to raoyongming/DynamicViT.

Before `reduction_layers` (default 3, 6, 9) a small predictor scores the patch tokens. In training nothing
is removed: a Gumbel-softmax keep mask (cumulative over the stages) enters every block's attention through
the float32 policy softmax. At inference the top `int(N0 * rho^s)` tokens are gathered (class token first)
and the blocks run plain fused attention on them. The loss: classification + keep-ratio + KL to the dense
teacher's logits + MSE to its final tokens at the kept positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from timm.layers import trunc_normal_
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from lightning_modules.base import ReductionModule, check_keep_rate, check_reduction_layers
from lightning_modules.layers import ReductionBlock
from lightning_modules.ops import keep_topk, policy_softmax
from lightning_modules.trace import TokenTrace, TraceRecorder
from lightning_modules.vit import StudentOutput, ViTStudent


# ------------------------------------------------------------------------------------------------ pure ops
def keep_ratios(rho: float, stages: int) -> list[float]:
    """Keep ratios per stage, relative to the original patch count: rho, rho^2, rho^3, ..."""
    return [rho ** (s + 1) for s in range(stages)]


class PredictorLG(nn.Module):
    """The official local-global score predictor (module names match its checkpoints).

    x: (B, N, C) patch tokens, policy: (B, N, 1) current keep mask -> log-probabilities (B, N, 2),
    channel 0 = keep. The last C/2 channels are averaged over the kept tokens and broadcast (global).
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1),
        )
        # the official model's `_init_weights` (applied after the predictors exist): truncated normal std 0.02,
        # zero biases. Keep probabilities start near 0.5 for every token; PyTorch's default init starts them
        # spread out and training can lock them at "keep all"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        B, N, C = x.shape
        local_x = x[:, :, :C // 2]
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1))


# ------------------------------------------------------------------------------------------------ layers
class DynamicViTBlock(ReductionBlock[Optional[Tensor], None]):
    """timm's Block whose attention takes the keep policy `(B, N)` (state, training) through the policy softmax
    (eps `policy_eps`, set by the student); None (inference): timm's block unchanged. It removes no token."""

    policy_eps: float = 1e-6

    def reduce(self, x: Tensor, policy: Optional[Tensor], setting: None = None, record: bool = False,
               rope: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], None]:
        if policy is None:
            return self.dense(x, rope), None, None
        softmax = partial(policy_softmax, policy=policy, eps=self.policy_eps)
        x = x + self.drop_path1(self.ls1(self.attn.forward_reduce(self.norm1(x), softmax=softmax, rope=rope).x))
        return self.mlp_residual(x), policy, None


@dataclass
class PruningOutput:
    """What the training loss needs from one masked forward pass (`loss_inputs` of a training `run`)."""

    tokens: Tensor  # (B, N0, C) final-norm patch tokens
    decisions: list[Tensor]  # per stage (B, N0) cumulative hard keep masks


# ------------------------------------------------------------------------------------------------ student
class DynamicViTStudent(ViTStudent):
    """A timm ViT with DynamicViT's score predictors (`score_predictor.{s}`) before `reduction_layers`."""

    added_modules = ("score_predictor",)

    def __init__(self, vit: Any, keep_rate: float = 0.7, reduction_layers: tuple[int, ...] = (3, 6, 9),
                 policy_eps: float = 1e-6) -> None:
        super().__init__(vit)
        self.keep_rate = keep_rate
        for block in vit.blocks:
            block.policy_eps = policy_eps
        self.reduction_layers = check_reduction_layers(reduction_layers, len(vit.blocks))
        self.score_predictor = nn.ModuleList(PredictorLG(vit.embed_dim) for _ in self.reduction_layers)

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """Each predictor's linear layers on the patch tokens present before its stage drops any."""
        from lightning_modules.macs import linear_macs

        total = trace.tokens.new_zeros(trace.tokens.shape[0], dtype=torch.float64)
        for stage, layer in enumerate(self.reduction_layers):
            before = trace.tokens[:, layer - 1] if layer > 0 else trace.tokens[:, 0]
            total += (before - self.num_prefix_tokens).double() * linear_macs(self.score_predictor[stage])
        return total

    def extra_checkpoint_keys(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in state_dict.items() if k.startswith("score_predictor.")}

    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder], rope: Optional[Tensor] = None,
                       train: bool = False) -> tuple[Tensor, Optional[list[Tensor]]]:
        """Inference gathers the kept tokens (state None); training masks them (state: every stage's decisions)."""
        if train:
            return self.masked_blocks(x, recorder, rope)
        x, _ = super().forward_blocks(x, recorder, rope)
        return x, None

    def before_block(self, layer: int, x: Tensor, state: None, recorder: Optional[TraceRecorder],
                     num_patches: int) -> tuple[Tensor, None]:
        """Inference: before a reduction layer keep the top `int(N0 * rho^s)` patch tokens by the predictor's
        keep score (N0 = `num_patches`, the patch tokens entering the first block)."""
        if layer not in self.reduction_layers:
            return x, None
        prefix = self.num_prefix_tokens
        stage = self.reduction_layers.index(layer)
        tokens = x[:, prefix:]
        score = self.score_predictor[stage](tokens, tokens.new_ones(*tokens.shape[:2], 1))[..., 0]  # (B, N) keep log-prob
        keep = min(int(num_patches * keep_ratios(self.keep_rate, stage + 1)[stage]), score.shape[1])
        if keep < score.shape[1]:
            # descending score, as the official argsort; the official mask is all ones at inference
            entering = x
            x, dest = keep_topk(x, score, keep, prefix)
            if recorder is not None:
                recorder.remap(dest, entering)
        return x, None

    def masked_blocks(self, x: Tensor, recorder: Optional[TraceRecorder] = None,
                      rope: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
        """Training: every token stays (RoPE too), a cumulative Gumbel keep mask gates all attention (policy
        softmax) -> the tokens and every stage's `(B, N0)` hard keep decisions."""
        prefix = self.num_prefix_tokens
        batch, n = x.shape[:2]
        decision = x.new_ones(batch, n - prefix, 1)
        policy = x.new_ones(batch, n)  # the official code uses the policy softmax from the first block
        decisions = []
        for layer, block in enumerate(self.blocks_of(DynamicViTBlock)):
            if layer in self.reduction_layers:
                stage = self.reduction_layers.index(layer)
                log_probs = self.score_predictor[stage](x[:, prefix:], decision)
                decision = F.gumbel_softmax(log_probs, hard=True)[:, :, 0:1] * decision
                decisions.append(decision[..., 0])
                policy = torch.cat([x.new_ones(batch, prefix), decision[..., 0]], dim=1)
                if recorder is not None:
                    recorder.drop(policy > 0.5, x)
            if recorder is not None:
                recorder.block(policy.sum(1))
            x, _, _ = self.run_block(block.reduce, x, policy, None, False, self.layer_rope(rope, layer))
        return x, decisions

    def tokens_out(self, x: Tensor, decisions: Optional[list[Tensor]]) -> Tensor | int:
        if not decisions:
            return x.shape[1]
        return decisions[-1].sum(1) + self.num_prefix_tokens  # (B,) tokens taking part after the last stage

    def loss_inputs(self, x: Tensor, decisions: Optional[list[Tensor]]) -> Optional[PruningOutput]:
        if decisions is None:
            return None
        return PruningOutput(x[:, self.num_prefix_tokens:], decisions)


# ------------------------------------------------------------------------------------------------ module
class DynamicViTModule(ReductionModule):
    """`METHODS["dynamicvit"]`: keep ratios `keep_rate^s` at `reduction_layers`; a frozen dense teacher
    (the backbone itself unless `teacher` names another; its weights: `teacher_weights` or timm's hub).

    Loss terms (unweighted, logged as train/loss_<term>): `cls`, `ratio` (mean over stages of the batch
    mean of (kept fraction - target)^2), `kl` (KL(teacher || student) of the logits), `distill` (MSE of the
    final tokens kept at the last stage). Weights: 1, `ratio_weight`, `kl_weight`, `distill_weight`.
    Optimiser as the official recipes: the predictors at the scheduled lr; the backbone at 0 for the first
    `backbone_freeze_epochs`, then (`optimizer_recipe: main`, the current repository's `main.py`)
    `backbone_lr_scale x` the scheduled lr, with no weight decay on the predictors' biases and norms, or
    (`neurips`, the NeurIPS 2021 `main_dynamic_vit.py`) `min(backbone_lr_scale x peak lr, scheduled lr)`, with
    weight decay on every predictor parameter; cls_token and pos_embed frozen. `policy_eps`: the eps of the
    training forward's policy softmax (official 1e-6; larger keeps some attention on rows whose kept mass is tiny).
    """

    student: DynamicViTStudent

    static_shapes = True
    setting_keys = ("keep_rate",)
    off_settings = {"keep_rate": 1.0}
    demo_settings = {"keep_rate": 0.6, "reduction_layers": [1, 2]}

    def __init__(
        self,
        *,
        keep_rate: float = 0.7,
        reduction_layers: Sequence[int] = (3, 6, 9),
        ratio_weight: float = 2.0,
        kl_weight: float = 0.5,
        distill_weight: float = 0.5,
        backbone_lr_scale: float = 0.01,
        backbone_freeze_epochs: float = 5.0,
        optimizer_recipe: Literal["main", "neurips"] = "main",
        policy_eps: float = 1e-6,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        check_keep_rate(keep_rate)
        if self.distillation != "none":
            raise ValueError("model.distillation: DynamicViT distils from its teacher through kl_weight and "
                             "distill_weight; leave distillation at none")
        self.target_keep_rate = keep_rate
        self.ratio_weight = ratio_weight
        self.kl_weight = kl_weight
        self.distill_weight = distill_weight
        self.backbone_lr_scale = backbone_lr_scale
        self.backbone_freeze_epochs = backbone_freeze_epochs
        if optimizer_recipe not in ("main", "neurips"):
            raise ValueError(f"model.optimizer_recipe: expected main or neurips, got {optimizer_recipe!r}")
        self.optimizer_recipe = optimizer_recipe
        if not policy_eps > 0:
            raise ValueError(f"model.policy_eps: expected a positive value (official: 1e-6), got {policy_eps!r}")
        self.build_student(DynamicViTStudent, block_fn=DynamicViTBlock, keep_rate=keep_rate,
                           reduction_layers=tuple(reduction_layers), policy_eps=policy_eps)
        for frozen in (self.student.vit.cls_token, self.student.vit.pos_embed):
            if frozen is not None:
                frozen.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ teacher
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.distill_weight > 0

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The dense teacher's logits and final-norm patch tokens."""
        teacher: Any = self.teacher  # a timm ViT (the backbone's architecture unless `teacher` names another)
        assert teacher is not None
        features = teacher.forward_features(images)
        return teacher.forward_head(features).float(), features[:, teacher.num_prefix_tokens:]

    # ------------------------------------------------------------------------------------------ loss
    def reduction_terms(self, out: StudentOutput[PruningOutput], images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """`ratio`, and with the teacher `kl` and `distill` (`cls` comes from the shared classification terms)."""
        assert out.loss_inputs is not None
        decisions = out.loss_inputs.decisions
        terms = {"ratio": pruning_ratio_loss(decisions, keep_ratios(self.student.keep_rate, len(decisions)))}
        if self.needs_teacher():
            teacher_logits, teacher_tokens = self.teacher_outputs(images)
            terms["kl"] = F.kl_div(F.log_softmax(out.logits.float(), dim=-1), F.log_softmax(teacher_logits, dim=-1),
                                   reduction="batchmean", log_target=True)
            terms["distill"] = kept_token_mse(out.loss_inputs.tokens, teacher_tokens, decisions[-1])
        return terms

    def loss_weights(self) -> dict[str, float]:
        return {"cls": 1.0, "ratio": self.ratio_weight, "kl": self.kl_weight, "distill": self.distill_weight}

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        self.student.keep_rate = 1.0 - alpha * (1.0 - self.target_keep_rate)
        return {"keep_rate": self.student.keep_rate}

    # ------------------------------------------------------------------------------------------ optimiser
    def param_groups(self) -> list[dict[str, Any]]:
        wd = self.hp.weight_decay
        if self.optimizer_recipe == "neurips":
            predictors = [{"params": list(self.student.score_predictor.parameters()), "weight_decay": wd}]
        else:
            predictors = param_groups_weight_decay(self.student.score_predictor, wd)
        backbone = param_groups_weight_decay(self.student.vit, wd, no_weight_decay_list=self.student.vit.no_weight_decay())
        return predictors + [dict(group, backbone=True) for group in backbone]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        config = super().configure_optimizers()
        self._backbone_lr(config["optimizer"], epoch=0.0)
        return config

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        super().lr_scheduler_step(scheduler, metric)
        self._backbone_lr(scheduler.optimizer, self.schedule_epoch())

    def _backbone_lr(self, optimizer: torch.optim.Optimizer, epoch: float) -> None:
        """The official rules, on the lr the schedule just gave every group: 0 while frozen, then
        scale x scheduled (main) or min(scale x peak lr, scheduled) (neurips)."""
        peak = self.learning_rate()
        for group in optimizer.param_groups:
            if not group.get("backbone"):
                continue
            if epoch < self.backbone_freeze_epochs:
                group["lr"] = 0.0
            elif self.optimizer_recipe == "main":
                group["lr"] = self.backbone_lr_scale * group["lr"]
            else:
                group["lr"] = min(self.backbone_lr_scale * peak, group["lr"])


def pruning_ratio_loss(decisions: list[Tensor], targets: list[float]) -> Tensor:
    """mean over stages of mean over images of (kept fraction - target)^2. decisions: (B, N0) masks."""
    terms = [((mask.mean(dim=1) - target) ** 2).mean() for mask, target in zip(decisions, targets)]
    return torch.stack(terms).mean()


def kept_token_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """MSE between student and teacher tokens `(B, N, C)` over the tokens kept by `mask (B, N)`
    (the official `pow(diff, 2).mean()` on the selected rows; 0 when nothing is kept)."""
    keep = mask.reshape(-1) > 0.5
    if not keep.any():
        return student.new_zeros(())
    c = student.shape[-1]
    return (student.reshape(-1, c)[keep].float() - teacher.reshape(-1, c)[keep].float()).pow(2).mean()
