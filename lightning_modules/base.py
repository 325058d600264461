"""ReductionModule: what every method shares - student/teacher building, the training step around a
composite loss, metrics, optimiser and schedule.

A method subclasses it, builds its student with `build_student(StudentClass, block_fn=...)` (its blocks get
`layers.ReductionAttention`), maps the reduction schedule's strength onto its knob in `apply_reduction` and,
when its loss has more terms than classification (+ DeiT distillation), overrides `loss_terms` and
`loss_weights`. Facts about a method that other code reads are class attributes (`static_shapes`,
`setting_keys`, `off_settings`, `demo_settings`), so `METHODS` is the only list of methods.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Generic, Literal, Optional, Sequence, TypeVar, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.parsing import AttributeDict
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models.deit import VisionTransformerDistilled
from timm.optim import param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.layers import ReductionAttention
from lightning_modules.macs import count_macs
from lightning_modules.schedule import ReductionSchedule
from lightning_modules.trace import TokenTrace, patch_regions, region_keep_counts
from lightning_modules.vit import StudentOutput, ViTStudent, create_teacher, create_vit, load_weights
from lightning_modules.zero_shot import ZeroShotHead, check_zero_shot, class_weights, embedding_width

Distillation = Literal["none", "soft", "hard"]


def deit_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mode: Distillation, tau: float) -> Tensor:
    """DeiT's distillation term. soft: KL(teacher || student) at temperature tau, `sum / numel * tau^2`
    exactly as DeiT's `DistillationLoss`; hard: cross-entropy to the teacher's argmax."""
    if mode == "soft":
        return F.kl_div(
            F.log_softmax(student_logits / tau, dim=1),
            F.log_softmax(teacher_logits / tau, dim=1),
            reduction="sum",
            log_target=True,
        ) * (tau * tau) / student_logits.numel()
    if mode == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    raise ValueError(f"distillation: expected 'soft' or 'hard', got {mode!r}")


class NonFiniteLossError(ArithmeticError):
    """A loss term became NaN or inf; training stopped before it reached the weights."""


def default_teacher_weights(teacher: Optional[str], weights: Optional[str],
                            teacher_weights: Optional[str]) -> Optional[str]:
    """A teacher that is the backbone itself (no `teacher` named) starts from the student's `weights` file unless
    `teacher_weights` says otherwise - as DynamicViT's teacher is its pretrained DeiT."""
    if teacher_weights is None and teacher is None:
        return weights
    return teacher_weights


def check_shared_args(hp: Any) -> None:
    """Values no training can run with -> a ValueError naming the `model.` key and what it expects."""
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"model.{key}: expected {expected}, got {hp[key]!r}")

    need(hp.num_classes >= 2, "num_classes", "2 classes or more")
    need(hp.img_size is None or hp.img_size >= 1, "img_size", "a positive number of pixels (or null: the backbone's)")
    need(hp.lr > 0, "lr", "a positive learning rate")
    need(hp.lr_reference_batch is None or hp.lr_reference_batch >= 1, "lr_reference_batch",
         "a positive batch size (lr x total batch / it) or null (lr as given)")
    for key in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "mixup", "cutmix", "opt_eps"):
        need(hp[key] >= 0, key, "a value >= 0")
    for key in ("drop_path_rate", "drop_rate", "label_smoothing"):
        need(0 <= hp[key] < 1, key, "a rate in [0, 1)")
    for key in ("mixup_prob", "mixup_switch_prob", "distill_alpha"):
        need(0 <= hp[key] <= 1, key, "a value in [0, 1]")
    need(hp.distill_tau > 0, "distill_tau", "a positive temperature")
    need(len(hp.betas) == 2 and all(0 <= b < 1 for b in hp.betas), "betas", "[beta1, beta2] in [0, 1)")
    need(hp.optimizer in ("adamw", "sgd"), "optimizer", "adamw (DeiT) or sgd (with momentum: Segmenter)")
    need(0 <= hp.momentum < 1, "momentum", "a value in [0, 1)")
    need(hp.lr_schedule in ("cosine", "poly"), "lr_schedule", "cosine (DeiT) or poly (Segmenter: (1 - t/T)^poly_power)")
    need(hp.poly_power > 0, "poly_power", "a positive power, e.g. 0.9")
    need(hp.ema_decay is None or 0 < hp.ema_decay < 1, "ema_decay", "a decay in (0, 1), e.g. 0.99996 (or null: no EMA)")


def check_reduction_schedule(method: type[ReductionModule], schedule: Optional[dict[str, float]],
                             key: str = "reduction_schedule") -> Optional[dict[str, float]]:
    """`reduction_schedule: {start_epoch, shrink_epochs}` (epochs >= 0), for a method with a reduction to schedule."""
    if not schedule:
        return None
    if method.apply_reduction is ReductionModule.apply_reduction:
        raise ValueError(f"model.{key}: {method.__name__} has no reduction to schedule; remove it")
    unknown = sorted(set(schedule) - {"start_epoch", "shrink_epochs"})
    if unknown:
        raise ValueError(f"model.{key}: unknown key(s) {unknown}; expected start_epoch and shrink_epochs")
    for name, value in schedule.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"model.{key}.{name}: expected epochs >= 0, got {value!r}")
    return dict(schedule)


def check_keep_rate(keep_rate: float) -> None:
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"model.keep_rate: expected a value in (0, 1], got {keep_rate}")


def check_reduction_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices a method reduces at (before or inside): each in [0, depth)."""
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise ValueError(f"model.reduction_layers: {bad} outside the {depth} blocks")
    return tuple(int(layer) for layer in layers)


M = TypeVar("M", bound=nn.Module)


class PerStage(nn.ModuleDict, Generic[M]):
    """One module per evaluation stage (`val`, `test`), typed: `metrics[stage]` is an `M`."""

    def __init__(self, make: Callable[[], M], stages: Sequence[str] = ("val", "test")) -> None:
        super().__init__({stage: make() for stage in stages})

    def __getitem__(self, stage: str) -> M:
        return cast(M, super().__getitem__(stage))


class MeanVector(Metric):
    """Mean of a per-sample vector over every sample seen (all ranks): `(B, K)` updates -> `(K,)`."""

    full_state_update = False
    total: Tensor  # (K,) metric states (`add_state`)
    count: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        self.total += values.to(torch.float64).sum(0)
        self.count += values.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class RegionKeep(Metric):
    """The share of (patch, block) pairs where a patch keeps its own token, inside a region (the foreground)
    and outside it, over every image seen (all ranks): `compute()` -> `(2,)` [inside, outside]."""

    full_state_update = False
    kept: Tensor  # (2,) metric states (`add_state`)
    total: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("kept", default=torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, kept: Tensor, total: Tensor) -> None:
        self.kept += kept
        self.total += total

    def compute(self) -> Tensor:
        return self.kept / self.total.clamp(min=1)


class ReductionModule(pl.LightningModule):
    """Shared LightningModule. The constructor's keyword arguments are the YAML `model:` section."""

    # What the rest of leanvit needs to know about a method (each method class sets its own):
    static_shapes: bool = True  # inference has the same shapes for every input: torch.compile and CUDA graphs apply
    setting_keys: tuple[str, ...] = ()  # the `model:` keys that label a run of this method in reports
    off_settings: dict[str, Any] = {}  # constructor keywords that turn the reduction off: timm's logits exactly
    demo_settings: dict[str, Any] = {}  # keywords under which a micro ViT of 3 blocks or more visibly reduces (tests)
    needs_class_token: bool = False  # ranks tokens by the class token's attention: refuses backbones without one

    def __init__(
        self,
        *,
        backbone: str = "deit_small_patch16_224",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        num_classes: int = 1000,
        img_size: Optional[int] = None,
        pretrained: bool = False,
        weights: Optional[str] = None,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        grad_checkpointing: bool = False,
        teacher: Optional[str] = None,
        teacher_weights: Optional[str] = None,
        distillation: Distillation = "none",
        distill_alpha: float = 0.5,
        distill_tau: float = 1.0,
        lr: float = 5e-4,
        lr_reference_batch: Optional[int] = 512,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        opt_eps: float = 1e-8,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        warmup_prefix: bool = False,
        min_lr: float = 1e-5,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        ema_decay: Optional[float] = None,
        train_mode: bool = True,
        reduction_schedule: Optional[dict[str, float]] = None,
        keep_rate_schedule: Optional[dict[str, float]] = None,
        linear_probe: bool = False,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
        lr_schedule: Literal["cosine", "poly"] = "cosine",
        poly_power: float = 0.9,
        zero_shot: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        # Plain containers only: the hyperparameters go into every checkpoint (read with weights_only=True).
        self.save_hyperparameters(logger=False)
        check_shared_args(self.hp)
        if distillation != "none" and teacher is None:
            raise ValueError("model.distillation: a teacher is needed (set model.teacher)")
        if distillation not in ("none", "soft", "hard"):
            raise ValueError(f"model.distillation: expected none, soft or hard, got {distillation!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.img_size = img_size
        self.distillation = distillation
        self.distill_alpha = distill_alpha
        self.distill_tau = distill_tau
        self.teacher_name = teacher
        self.teacher_weights = default_teacher_weights(teacher, weights, teacher_weights)
        self.train_mode = train_mode
        if keep_rate_schedule is not None:  # its earlier name (older checkpoints store it): the same setting
            if reduction_schedule is not None:
                raise ValueError("model.keep_rate_schedule: the old name of reduction_schedule; give one of them")
            reduction_schedule, schedule_key = keep_rate_schedule, "keep_rate_schedule"
        else:
            schedule_key = "reduction_schedule"
        self.reduction_schedule = check_reduction_schedule(type(self), reduction_schedule, schedule_key)
        # Built in setup("fit") only: evaluation never needs it (nor its hub weights).
        self.teacher: Optional[nn.Module] = None
        self.mixup_fn = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                  label_smoothing=label_smoothing, num_classes=num_classes)
            if (mixup > 0 or cutmix > 0) and mixup_prob > 0 else None
        )
        self.soft_target_loss = SoftTargetCrossEntropy()
        top5 = min(5, num_classes)
        self.acc1 = PerStage(lambda: MulticlassAccuracy(num_classes, top_k=1, average="micro"))
        self.acc5 = PerStage(lambda: MulticlassAccuracy(num_classes, top_k=top5, average="micro"))
        self.student: ViTStudent
        self.student_ema: Optional[ModelEmaV3] = None
        self.token_stats: PerStage[MeanVector]  # tokens per layer: built with the student (its depth)
        self.gmacs = PerStage(MeanMetric)
        self.eval_loss = PerStage(MeanMetric)
        self.foreground_keep = PerStage(RegionKeep)
        self.ema_acc1: Optional[PerStage[MulticlassAccuracy]] = None

    @property
    def hp(self) -> AttributeDict:
        """The saved constructor arguments (the `model:` section), read by attribute."""
        return cast(AttributeDict, self.hparams)

    def datamodule(self) -> Optional[pl.LightningDataModule]:
        """The trainer's DataModule (None outside a trainer, or when it was given loaders)."""
        return getattr(self._trainer, "datamodule", None)

    # ------------------------------------------------------------------------------------------ building
    def build_student(self, student_cls: type[ViTStudent] = ViTStudent,
                      block_fn: Optional[Callable[..., nn.Module]] = None, vit_kwargs: Optional[dict[str, Any]] = None,
                      **student_kwargs: Any) -> None:
        """Create the timm ViT with the method's blocks (and `vit_kwargs`, e.g. `attn_layer`), wrap it in
        `student_cls(vit, **student_kwargs)`, load `weights`, and set up EMA."""
        hp = self.hp
        if block_fn is not None:  # a method's blocks: attention with what reduction needs beside fused SDPA
            vit_kwargs = {"attn_layer": ReductionAttention} | (vit_kwargs or {})
        prompts = check_zero_shot(dict(hp.zero_shot), hp.backbone, hp.num_classes) if hp.zero_shot else None
        width = embedding_width(hp.backbone) if prompts else hp.num_classes
        vit = create_vit(  # zero-shot: the image tower with its projection head, the text weights come after
            hp.backbone, num_classes=width, img_size=hp.img_size,
            pretrained=hp.pretrained and hp.weights is None, drop_path_rate=hp.drop_path_rate,
            drop_rate=hp.drop_rate, block_fn=block_fn, **(vit_kwargs or {}), **(hp.backbone_kwargs or {}),
        )
        if hp.grad_checkpointing:
            vit.set_grad_checkpointing(True)
        if self.distillation != "none" and isinstance(vit, VisionTransformerDistilled):
            vit.set_distilled_training(True)  # distilled DeiT: the dist token's head learns from the teacher
        student = student_cls(vit, **student_kwargs)
        if prompts is not None:  # the projection, normalised, against the prompts' text embeddings
            if hp.pretrained or hp.weights is not None:
                texts = class_weights(hp.backbone, hp.weights, *prompts, batch_size=int(hp.zero_shot.get("batch_size", 256)))
            else:  # a random image tower (benchmarks; a resumed run restores the weights): random unit class weights
                texts = nn.functional.normalize(torch.randn(hp.num_classes, width), dim=-1)
            setattr(vit, "head", ZeroShotHead(vit.head, texts))
        if hp.weights is not None:
            load_weights(student, hp.weights)
        if hp.linear_probe:  # a frozen backbone (DINOv3's evaluation): the classifier and the method's own modules train
            student.vit.requires_grad_(False)
            heads = student.vit.get_classifier()
            for head in heads if isinstance(heads, tuple) else (heads,):
                head.requires_grad_(True)
        self.student = student
        depth = student.depth
        self.token_stats = PerStage(lambda: MeanVector(depth + 1))
        if hp.ema_decay is not None:
            self.student_ema = ModelEmaV3(student, decay=hp.ema_decay)
            # updated by hand after each optimiser step, never by gradients: under DDP a parameter that
            # requires grad but gets none stops the run ("parameters that were not used in producing the loss")
            self.student_ema.requires_grad_(False)
            self.ema_acc1 = PerStage(lambda: MulticlassAccuracy(hp.num_classes, top_k=1, average="micro"))

    def needs_teacher(self) -> bool:
        return self.distillation != "none"

    def teacher_spec(self) -> tuple[str, dict[str, Any]]:
        """The teacher's timm name and creation kwargs: the backbone itself (with its `backbone_kwargs`) when
        `teacher` is unset (DynamicViT), else the named model as timm builds it."""
        if self.teacher_name is None:
            return self.hp.backbone, dict(self.hp.backbone_kwargs or {})
        return self.teacher_name, {}

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.prepare_teacher()

    def prepare_teacher(self) -> None:
        """Build the frozen teacher when training needs one (once; `fit` only, evaluation never needs it)."""
        if self.teacher is None and self.needs_teacher():
            name, kwargs = self.teacher_spec()
            zero_shot = bool(self.hp.zero_shot) and self.teacher_name is None  # the zero-shot backbone itself
            teacher = create_teacher(name, num_classes=embedding_width(name) if zero_shot else self.num_classes,
                                     img_size=self.img_size, weights=self.teacher_weights, **kwargs)
            if zero_shot:  # its projection against the student's class weights (the same prompts)
                classes = cast(ZeroShotHead, self.student.vit.head).classifier.weight.detach().clone()
                setattr(teacher, "head", ZeroShotHead(cast(nn.Module, teacher.head), classes).requires_grad_(False))
            self.teacher = teacher

    def train(self, mode: bool = True) -> ReductionModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is frozen: no dropout, no BatchNorm updates, ever
        if mode and not self.train_mode:
            # train_mode=false: the student trains in eval mode (dropout and drop path off), as the official
            # fine-tune scripts of DeiT-derived code do (`model.train(set_training_mode)`); the methods call
            # their training paths (masks, Gumbel noise, halting) explicitly, so only regularisation changes
            self.student.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def inference_model(self, student: ViTStudent) -> nn.Module:
        """What inference runs around a student - the student itself here; a segmentation module adds its decode
        head. The throughput callback and the benchmarks time this, for the student and for its dense twin."""
        return student

    def inference_macs(self, student: ViTStudent, trace: TokenTrace) -> Tensor:
        """(B,) MACs of `inference_model(student)` on a pass with this trace."""
        return count_macs(student, trace)

    # ------------------------------------------------------------------------------------------ loss
    def classification_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Soft targets (mixup/cutmix, smoothing) -> soft cross-entropy; class indices -> (smoothed) CE."""
        if targets.ndim == 2:
            return self.soft_target_loss(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.hp.label_smoothing)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        assert self.teacher is not None
        return self.teacher(images).float()

    def loss_terms(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Unweighted named loss terms for one batch, from the student's training pass: `cls` (and `distill` with a
        DeiT teacher), then the method's own `reduction_terms`."""
        out = self.student.run(images, train=True)
        return self.classification_terms(out.logits, images, targets) | self.reduction_terms(out, images, targets)

    def reduction_terms(self, out: StudentOutput[Any], images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The method's loss terms beyond classification, from its training pass (`out.loss_inputs`); none here."""
        return {}

    def classification_terms(self, out: Tensor | tuple[Tensor, Tensor], images: Tensor,
                             targets: Tensor) -> dict[str, Tensor]:
        """`cls` on the class head and, with DeiT distillation, `distill` on the distillation head (a distilled
        DeiT returns both heads' logits in training; others use one head for both)."""
        logits, logits_kd = out if isinstance(out, tuple) else (out, out)
        terms = {"cls": self.classification_loss(logits, targets)}
        if self.distillation != "none":
            terms["distill"] = deit_distillation_loss(
                logits_kd, self.teacher_logits(images), self.distillation, self.distill_tau)
        return terms

    def loss_weights(self) -> dict[str, float]:
        """Weights of `cls` and `distill` (DeiT: 1 - alpha and alpha); methods add their own terms."""
        if self.distillation == "none":
            return {"cls": 1.0}
        return {"cls": 1.0 - self.distill_alpha, "distill": self.distill_alpha}

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if self.mixup_fn is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix need an even batch size, got {images.shape[0]} (data.batch_size)")
            images, targets = self.mixup_fn(images, targets)
        terms = self.loss_terms(images, targets)
        self.check_finite(terms)
        weights = self.loss_weights()
        loss = cast(Tensor, sum(weights[name] * value for name, value in terms.items()))
        self.log("train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def check_finite(self, terms: dict[str, Tensor]) -> None:
        """Stop training, on every rank, before a non-finite loss term reaches the weights (`NonFiniteLossError`):
        no optimiser step is taken, so the checkpoints keep the last finite weights."""
        bad = [name for name, value in terms.items() if not bool(torch.isfinite(value).all())]
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                return
        elif not bad:
            return
        raise NonFiniteLossError(
            f"train: non-finite loss at step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{self.trainer.fit_loop.epoch_loop.batch_idx + 1}): "
            + (", ".join(f"loss_{n}={float(terms[n].detach().float()):g}" for n in bad) if bad else "on another rank")
            + "; training stopped, last.ckpt and best.ckpt hold the last finite weights")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.student_ema is not None:
            # once per optimiser step (not per micro-batch under accumulate_grad_batches), constant decay
            # from the initial weights, as DeiT's and the methods' ModelEma
            self.student_ema.update(self.student)

    def on_train_epoch_end(self) -> None:
        skipped = getattr(self.datamodule(), "skipped_images", None)
        if skipped is not None:  # unreadable images skipped by the loader (data.skip_unreadable)
            self.log("data/skipped_images", float(skipped), sync_dist=True, reduce_fx="sum")

    def on_fit_start(self) -> None:
        self.train()  # Lightning keeps the modes modules were built in; this applies train_mode and the teacher's eval
        if self.teacher is not None or self.student_ema is not None or not self.train_mode:
            # the frozen teacher, the EMA copy and a student with train_mode=false are in eval mode on purpose
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        images, targets = batch
        logits, trace = self.student(images, trace=True)
        self.acc1[stage].update(logits, targets)
        self.acc5[stage].update(logits, targets)
        self.token_stats[stage].update(trace.tokens)
        self.gmacs[stage].update(count_macs(self.student, trace).float() / 1e9)  # per image, as it ran
        # a mean over images (not over per-rank batch means), so it equals a single-process evaluation
        self.eval_loss[stage].update(F.cross_entropy(logits, targets), weight=images.shape[0])
        self.eval_trace_hook(stage, trace)
        foreground = self.foreground_mask(images)
        if foreground is not None:
            self.foreground_keep[stage].update(*region_keep_counts(trace, patch_regions(foreground, trace.grid_size)))
        if self.student_ema is not None and self.ema_acc1 is not None:
            self.ema_acc1[stage].update(self.student_ema.module(images), targets)

    def foreground_mask(self, images: Tensor) -> Optional[Tensor]:
        """`(B, H, W)` bool, the pixels the data set knows to be foreground (the canvas digits: the digit's ink),
        or None: the DataModule's `foreground(images)` when it has one."""
        foreground = getattr(self.datamodule(), "foreground", None)
        return None if foreground is None else foreground(images)

    def eval_trace_hook(self, stage: str, trace: TokenTrace) -> None:
        """Per-batch statistics a method adds from the token trace during validation/test (none here)."""

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    def _log_eval_epoch(self, stage: str) -> None:
        # compute() gathers over all DDP ranks; percent, as the papers report
        self.log(f"{stage}/acc1", self.acc1[stage].compute() * 100, prog_bar=True)
        self.log(f"{stage}/acc5", self.acc5[stage].compute() * 100)
        for layer, tokens in enumerate(self.token_stats[stage].compute()):
            self.log(f"tokens/layer_{layer}", tokens.float())
        gmacs = self.gmacs[stage].compute()
        self.log(f"{stage}/gmacs", gmacs)  # this stage's own average (the throughput callback and reports read it)
        self.log("flops/gmacs", gmacs)  # the contract's key: the stage evaluated last
        self.log(f"{stage}/loss", self.eval_loss[stage].compute())
        metrics = [self.acc1[stage], self.acc5[stage], self.token_stats[stage], self.gmacs[stage], self.eval_loss[stage]]
        if self.foreground_keep[stage].update_called:  # the data set knows its foreground
            inside, outside = self.foreground_keep[stage].compute()
            self.log(f"{stage}/keep_on_foreground", inside.float())
            self.log(f"{stage}/keep_on_background", outside.float())
        metrics.append(self.foreground_keep[stage])
        if self.ema_acc1 is not None:
            self.log(f"{stage}/ema_acc1", self.ema_acc1[stage].compute() * 100)
            metrics.append(self.ema_acc1[stage])
        for metric in metrics:
            metric.reset()

    # ------------------------------------------------------------------------------------------ checkpoints
    def configure_callbacks(self) -> list[Any]:
        """The method's own callbacks: its reduction schedule when `reduction_schedule` is configured."""
        if not self.reduction_schedule:
            return []
        return [ReductionSchedule(**self.reduction_schedule)]

    def apply_reduction(self, alpha: float) -> dict[str, float]:
        """Set the reduction strength in [0, 1] (the reduction schedule); returns values to log."""
        raise NotImplementedError(f"{type(self).__name__} has no reduction to schedule")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is rebuilt from its config; never stored.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    # ------------------------------------------------------------------------------------------ optimiser
    def global_batch_size(self) -> int:
        trainer = self.trainer
        per_device = getattr(self.datamodule(), "batch_size", None)
        if per_device is None:
            raise ValueError("model.lr_reference_batch: the global batch is read from a DataModule's batch_size; "
                             "without one set lr_reference_batch to null and give the final lr")
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def learning_rate(self) -> float:
        """The configured lr, linearly scaled by the global batch when `lr_reference_batch` is set (DeiT rule)."""
        hp = self.hp
        if hp.lr_reference_batch is None:
            return hp.lr
        return hp.lr * self.global_batch_size() / hp.lr_reference_batch

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on norms, biases, pos_embed and prefix tokens (timm's rule)."""
        return param_groups_weight_decay(
            self.student, self.hp.weight_decay, no_weight_decay_list=self.student.no_weight_decay())

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hp
        lr = self.learning_rate()
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "sgd":  # Segmenter's: SGD with momentum (its weight decay 0 comes from the recipe)
            optimizer = torch.optim.SGD(self.param_groups(), lr=lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(self.param_groups(), lr=lr, betas=tuple(hp.betas), eps=hp.opt_eps)
        epochs = self.trainer.max_epochs
        if not epochs or epochs < 0:
            raise ValueError("trainer.max_epochs: must be set, the warm-up + cosine schedule spans it")
        # Epoch units, stepped with a fractional epoch after every update: the schedule needs no batch count
        # here (asking Lightning for one would build the train loader before a checkpoint is restored).
        # warmup_prefix: the warm-up comes before a cosine over the remaining epochs (DynamicViT's cosine_scheduler);
        # otherwise the cosine spans every epoch with the warm-up overriding its start (DeiT's timm scheduler)
        cosine_epochs = max(epochs - hp.warmup_epochs, 1e-3) if hp.warmup_prefix else epochs  # (a run inside its warm-up)
        # poly (Segmenter): lr = min_lr + (lr - min_lr) x (1 - t / T)^poly_power, per update as its PolynomialLR
        scheduler, _ = create_scheduler_v2(optimizer, sched=hp.lr_schedule, num_epochs=cosine_epochs,
                                           warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr,
                                           warmup_prefix=hp.warmup_prefix, min_lr=hp.min_lr, step_on_epochs=True,
                                           decay_rate=hp.poly_power if hp.lr_schedule == "poly" else 0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_epoch(self) -> float:
        """Fractional epochs of optimiser updates done (the schedule's clock)."""
        updates_per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        return self.global_step / max(1, updates_per_epoch)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # warm-up then cosine, per iteration: timm schedulers take fractional epochs
        scheduler.step(epoch=self.schedule_epoch())
