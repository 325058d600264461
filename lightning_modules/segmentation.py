"""Semantic segmentation with any method's student as the encoder (`task: segmentation`).

`segmentation_module(METHODS[name])` is that method's module with a Segmenter decode head (Strudel et al., ICCV 2021,
rstrudel/segmenter) on the student's dense output (`ViTStudent.forward_dense`: every patch's final-norm features,
restored from the token trace), per-pixel cross-entropy (ignore index 255), mean IoU and pixel accuracy. The
method's own loss terms (DynamicViT's ratio loss, A-ViT's ponder and prior, DiffRate's FLOPs term) add to the
segmentation loss; its reduction schedule keeps working; DynamicViT's teacher is the dense segmentation model
(`teacher_weights`, default `weights`): KL of the patch-level class scores and MSE of the kept tokens.

Heads (`decode_head`):
- `linear`: a per-patch linear classifier, upsampled bilinearly (Segmenter's linear baseline);
- `mask_transformer`: Segmenter's decoder - the patches and one learned embedding per class through `head_layers`
  transformer blocks (width = the encoder's, heads = width / 64, MLP 4x), class masks as the scalar products of
  the L2-normalised, projected patch and class embeddings, a LayerNorm over classes.

Inference (`inference`): `whole` (the image as it comes) or `slide` (Segmenter's sliding window: windows of the
model's input size at `slide_stride`, the last one aligned to the edge, overlapping scores averaged), upsampled
bilinearly to the label map's size.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal, Optional, cast

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_modules.base import PerStage, ReductionModule
from lightning_modules.macs import count_macs, linear_macs
from lightning_modules.trace import TokenTrace, patch_regions, region_keep_counts
from lightning_modules.vit import StudentOutput, ViTStudent, read_checkpoint_object

IGNORE_INDEX = 255
DecodeHead = Literal["linear", "mask_transformer"]
Inference = Literal["whole", "slide"]


# ------------------------------------------------------------------------------------------------ heads
class Decoder(nn.Module):
    """A decode head: `(B, N0, C)` patch features and the patch grid `(h, w)` -> class scores `(B, K, h, w)`."""

    def macs(self, num_patches: int) -> int:
        """Multiply-accumulates of one image's pass over `num_patches` patches."""
        raise NotImplementedError


class LinearDecoder(Decoder):
    """Segmenter's linear baseline: one linear classifier per patch. `(B, N0, C)` -> `(B, K, h, w)`."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.head(x).transpose(1, 2).reshape(x.shape[0], -1, *grid)

    def macs(self, num_patches: int) -> int:
        return num_patches * linear_macs(self)


class MaskTransformer(Decoder):
    """Segmenter's mask transformer. `(B, N0, C)` patch features -> `(B, K, h, w)` class masks."""

    def __init__(self, dim: int, num_classes: int, layers: int = 2, dropout: float = 0.1,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        heads = max(1, dim // 64)
        rates = torch.linspace(0, drop_path_rate, layers).tolist()
        self.proj_dec = nn.Linear(dim, dim)
        # Segmenter's blocks: pre-norm (torch's LayerNorm, eps 1e-5: timm's Block defaults to 1e-6), qkv with bias,
        # dropout on the attention weights and both projections
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, attn_drop=dropout,
                                          proj_drop=dropout, drop_path=rate, norm_layer=nn.LayerNorm) for rate in rates)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim))
        scale = dim ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = torch.cat([self.proj_dec(x), self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)  # (B, N0 + K, C)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :-self.num_classes] @ self.proj_patch, dim=-1)  # (B, N0, C)
        classes = F.normalize(x[:, -self.num_classes:] @ self.proj_classes, dim=-1)  # (B, K, C)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N0, K)
        return masks.transpose(1, 2).reshape(x.shape[0], self.num_classes, *grid)

    def macs(self, num_patches: int) -> int:
        tokens = num_patches + self.num_classes
        dim = self.proj_dec.in_features
        blocks = sum(tokens * linear_macs(b) + 2 * tokens * tokens * dim for b in self.blocks)
        return num_patches * dim * dim + blocks + tokens * dim * dim + num_patches * self.num_classes * dim


def _init_weights(module: nn.Module) -> None:
    """Segmenter's initialisation: truncated normal linear weights (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_decode_head(kind: str, dim: int, num_classes: int, layers: int, dropout: float) -> Decoder:
    if kind == "linear":
        return LinearDecoder(dim, num_classes)
    if kind == "mask_transformer":
        return MaskTransformer(dim, num_classes, layers, dropout)
    raise ValueError(f"model.decode_head: expected linear or mask_transformer, got {kind!r}")


# ------------------------------------------------------------------------------------------------ inference
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Segmenter's window anchors along one side: every `stride` from 0, the last window moved back to end at the
    edge (one window when the side fits in it)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + stride, stride))
    return sorted({min(s, size - window) for s in starts})


def sliding_window(forward: Any, images: Tensor, window: int, stride: int, num_classes: int) -> Tensor:
    """Segmenter's sliding-window inference: `forward(crops (b, 3, window, window)) -> (b, K, window, window)` over
    every window of `images (B, 3, H, W)` (padded with zeros when a side is shorter than the window), scores of
    overlapping windows averaged -> `(B, K, H, W)`."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (0, max(window - width, 0), 0, max(window - height, 0)))
    H, W = padded.shape[-2:]
    scores = images.new_zeros(batch, num_classes, H, W)
    counts = images.new_zeros(1, 1, H, W)
    for top in window_starts(H, window, stride):
        for left in window_starts(W, window, stride):
            crop = padded[:, :, top:top + window, left:left + window]
            scores[:, :, top:top + window, left:left + window] += forward(crop)
            counts[:, :, top:top + window, left:left + window] += 1
    return (scores / counts)[:, :, :height, :width]


# ------------------------------------------------------------------------------------------------ module
class SegmentationTask(ReductionModule):
    """The segmentation half of `segmentation_module(method)` (placed before the method in its MRO). Its keywords
    join the method's `model:` keys."""

    def __init__(
        self,
        *,
        decode_head: DecodeHead = "mask_transformer",
        head_layers: int = 2,
        head_dropout: float = 0.1,
        inference: Inference = "whole",
        slide_stride: Optional[int] = None,
        ignore_index: int = IGNORE_INDEX,
        **method: Any,
    ) -> None:
        for key, bad, why in (("distillation", method.get("distillation", "none") != "none", "none"),
                              ("ema_decay", method.get("ema_decay") is not None, "null"),
                              ("linear_probe", bool(method.get("linear_probe")), "false"),
                              ("zero_shot", bool(method.get("zero_shot")), "null")):
            if bad:
                raise ValueError(f"model.{key}: {method[key]!r} is for image classification; segmentation needs "
                                 f"{key}={why}")
        if method.get("teacher") is not None:
            raise ValueError("model.teacher: a segmentation teacher is the dense segmentation model of the same "
                             "backbone (model.teacher_weights); remove model.teacher")
        if inference not in ("whole", "slide"):
            raise ValueError(f"model.inference: expected whole or slide, got {inference!r}")
        if head_layers < 1:
            raise ValueError(f"model.head_layers: expected 1 or more decoder blocks, got {head_layers}")
        super().__init__(**method)
        if getattr(self.student, "teacher_branch", False):
            raise ValueError("model.teacher_weight: MCTF's teacher branch trains on image labels; for segmentation "
                             "set teacher_weight=0 and consistency_weight=0")
        student = self.student
        student.reads_patches = True  # every patch is read (A-ViT runs each image until all its tokens halt)
        student.vit.reset_classifier(0)  # no image classifier: under DDP an unused head stops the run
        if getattr(student.vit, "attn_pool", None) is not None:
            setattr(student.vit, "attn_pool", None)  # a MAP head pools for the classifier only
        self.decode_head: Decoder = build_decode_head(decode_head, student.embed_dim, self.num_classes, head_layers,
                                             head_dropout)
        weights = self.hp.weights
        if weights is not None:
            load_decode_head(self.decode_head, weights)
        self.inference = inference
        self.slide_stride = slide_stride
        self.ignore_index = ignore_index
        classes = self.num_classes
        self.miou = PerStage(lambda: MulticlassJaccardIndex(classes, average="macro", ignore_index=ignore_index))
        self.pixel_acc = PerStage(lambda: MulticlassAccuracy(classes, average="micro", ignore_index=ignore_index))
        self.teacher_head: Optional[nn.Module] = None

    # ------------------------------------------------------------------------------------------ forward
    def patch_scores(self, out: StudentOutput[Any], images: Tensor) -> Tensor:
        """The decode head on a pass's dense output -> `(B, K, h, w)` at patch resolution."""
        assert out.dense is not None
        return self.decode_head(out.dense, self.student.grid_size(images))

    def forward(self, images: Tensor) -> Tensor:
        """`(B, 3, H, W)` -> per-pixel class scores `(B, K, H, W)` (the inference pass, one window)."""
        return self.inference_model(self.student)(images)

    def inference_model(self, student: ViTStudent) -> nn.Module:
        """The student's dense output through this module's decode head (its own, or a dense twin's encoder with
        a copy of it), upsampled to the image: what the throughput callback and the benchmarks time."""
        head = self.decode_head if student is self.student else copy.deepcopy(self.decode_head)
        return DenseHead(student, head)

    def inference_macs(self, student: ViTStudent, trace: TokenTrace) -> Tensor:
        return count_macs(student, trace) + self.head_macs(trace)

    def window_size(self) -> int:
        size = self.student.vit.patch_embed.img_size
        return int(size[0]) if size is not None else int(self.img_size or 0)

    def predict_scores(self, images: Tensor) -> tuple[Tensor, list[TokenTrace]]:
        """Inference as configured (`whole` or `slide`) -> `(B, K, H, W)` and the token trace of every window."""
        traces: list[TokenTrace] = []

        def run(crop: Tensor) -> Tensor:
            out = self.student.run(crop, trace=True, dense=True)
            assert out.trace is not None
            traces.append(out.trace)
            return F.interpolate(self.patch_scores(out, crop), size=crop.shape[-2:], mode="bilinear")

        if self.inference == "whole":
            return run(images), traces
        window = self.window_size()
        return sliding_window(run, images, window, self.slide_stride or window, self.num_classes), traces

    @torch.no_grad()
    def predict_masks(self, images: Tensor) -> Tensor:
        """`(B, 3, H, W)` -> predicted label maps `(B, H, W)` (inference as configured, eval mode)."""
        was_training = self.training
        self.eval()
        try:
            return self.predict_scores(images)[0].argmax(dim=1)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------ loss
    def loss_terms(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """`seg` (per-pixel cross-entropy at image resolution, ignore index) and the method's own terms, which read
        the pass with the patch-level class scores `(B x h x w, K)` as its logits."""
        out = self.student.run(images, train=True, dense=True)
        scores = self.patch_scores(out, images)  # (B, K, h, w)
        pixels = F.interpolate(scores, size=targets.shape[-2:], mode="bilinear")
        terms = {"seg": F.cross_entropy(pixels.float(), targets, ignore_index=self.ignore_index)}
        per_patch = dataclasses.replace(out, logits=scores.permute(0, 2, 3, 1).flatten(0, 2))
        return terms | self.reduction_terms(per_patch, images, targets)

    def loss_weights(self) -> dict[str, float]:
        return {"seg": 1.0} | super().loss_weights()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.mixup_fn = None  # mixup and cutmix mix image labels; never label maps
        return super().training_step(batch, batch_idx)

    # ------------------------------------------------------------------------------------------ teacher
    def prepare_teacher(self) -> None:
        """DynamicViT's teacher: the dense segmentation model (its student and decode head) from
        `teacher_weights` (default: `weights`, the dense segmentation checkpoint this run fine-tunes)."""
        if self.teacher is not None or not self.needs_teacher():
            return
        if self.teacher_weights is None:
            raise ValueError("model.teacher_weights: a segmentation teacher needs the dense segmentation checkpoint "
                             "(model.teacher_weights=FILE or model.weights=FILE)")
        from lightning_modules.dense import DenseModule

        dense = cast(SegmentationTask, segmentation_module(DenseModule)(**self.teacher_hparams()))
        if not has_decode_head(self.teacher_weights):
            raise ValueError(f"model.teacher_weights: {self.teacher_weights!r} has no decode head: the teacher is a "
                             f"dense segmentation checkpoint (task: segmentation, method: dense)")
        teacher = DenseHead(dense.student, dense.decode_head)
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()

    def teacher_hparams(self) -> dict[str, Any]:
        hp = self.hp
        keep = ("backbone", "backbone_kwargs", "num_classes", "img_size", "decode_head", "head_layers", "head_dropout")
        return {k: hp[k] for k in keep} | {"weights": self.teacher_weights, "drop_path_rate": 0.0}

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The dense segmentation teacher's patch-level class scores `(B x h x w, K)` and its patch features
        `(B, N0, C)` (what DynamicViT's `kl` and `distill` compare)."""
        teacher = cast(DenseHead, self.teacher)
        features = teacher.student.forward_dense(images)
        scores = teacher.head(features, teacher.student.grid_size(images))
        return scores.permute(0, 2, 3, 1).flatten(0, 2).float(), features

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        images, targets = batch
        scores, traces = self.predict_scores(images)
        if scores.shape[-2:] != targets.shape[-2:]:  # the label map's own size (resized images, Segmenter)
            scores = F.interpolate(scores, size=targets.shape[-2:], mode="bilinear")
        preds = scores.argmax(dim=1)
        self.miou[stage].update(preds, targets)
        self.pixel_acc[stage].update(preds, targets)
        self.eval_loss[stage].update(F.cross_entropy(scores.float(), targets, ignore_index=self.ignore_index),
                                     weight=images.shape[0])
        tokens = torch.stack([t.tokens for t in traces]).float().mean(0)  # (B, depth + 1) per window, averaged
        self.token_stats[stage].update(tokens)
        macs = sum(count_macs(self.student, t) + self.head_macs(t) for t in traces)
        self.gmacs[stage].update(cast(Tensor, macs).float() / 1e9)  # per image, every window
        for trace in traces:
            self.eval_trace_hook(stage, trace)
        foreground = self.foreground_mask(images) if self.inference == "whole" else None
        if foreground is not None:
            trace = traces[0]
            self.foreground_keep[stage].update(*region_keep_counts(trace, patch_regions(foreground, trace.grid_size)))

    def head_macs(self, trace: TokenTrace) -> Tensor:
        """(B,) the decode head's MACs on the restored dense map (the same for every method)."""
        patches = trace.owner[0].shape[1]
        return trace.tokens.new_full((trace.tokens.shape[0],), float(self.decode_head.macs(patches)),
                                     dtype=torch.float64)

    def _log_eval_epoch(self, stage: str) -> None:
        self.log(f"{stage}/miou", self.miou[stage].compute() * 100, prog_bar=True)
        self.log(f"{stage}/pixel_acc", self.pixel_acc[stage].compute() * 100)
        for layer, tokens in enumerate(self.token_stats[stage].compute()):
            self.log(f"tokens/layer_{layer}", tokens.float())
        gmacs = self.gmacs[stage].compute()
        self.log(f"{stage}/gmacs", gmacs)
        self.log("flops/gmacs", gmacs)
        self.log(f"{stage}/loss", self.eval_loss[stage].compute())
        metrics = [self.miou[stage], self.pixel_acc[stage], self.token_stats[stage],
                   self.gmacs[stage], self.eval_loss[stage], self.foreground_keep[stage]]
        if self.foreground_keep[stage].update_called:
            inside, outside = self.foreground_keep[stage].compute()
            self.log(f"{stage}/keep_on_foreground", inside.float())
            self.log(f"{stage}/keep_on_background", outside.float())
        for metric in metrics:
            metric.reset()

    # ------------------------------------------------------------------------------------------ optimiser
    def param_groups(self) -> list[dict[str, Any]]:
        """The method's groups for the student, and the decode head's (no weight decay on norms, biases and the
        class embeddings)."""
        head = param_groups_weight_decay(self.decode_head, self.hp.weight_decay, no_weight_decay_list=("cls_emb",))
        return super().param_groups() + head


class DenseHead(nn.Module):
    """A student and a decode head as one inference model: images `(B, 3, H, W)` -> scores `(B, K, H, W)`."""

    def __init__(self, student: ViTStudent, head: Decoder) -> None:
        super().__init__()
        self.student = student
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        features = self.student.forward_dense(images)
        scores = self.head(features, self.student.grid_size(images))
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear")


def has_decode_head(path: str) -> bool:
    """Whether a weights file is a leanvit segmentation checkpoint (it holds `decode_head.*`)."""
    state = read_checkpoint_object(path).get("state_dict", {})
    return any(k.startswith("decode_head.") for k in state)


def load_decode_head(head: nn.Module, path: str) -> None:
    """The decode head's weights from a leanvit segmentation checkpoint (`decode_head.*`); a classification
    checkpoint (an ImageNet backbone) has none: the head starts fresh."""
    state = read_checkpoint_object(path).get("state_dict", {})
    own = {k[len("decode_head."):]: v for k, v in state.items() if k.startswith("decode_head.")}
    if not own:
        return
    try:
        head.load_state_dict(own)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"weights: the decode head in {path!r} does not fit this one ({first}); "
                         f"check model.decode_head, model.head_layers and model.num_classes") from err


_CLASSES: dict[type[ReductionModule], type[ReductionModule]] = {}


def segmentation_module(method: type[ReductionModule]) -> type[ReductionModule]:
    """The segmentation module of a method: `SegmentationTask` first, then the method (one class per method)."""
    if method in _CLASSES:
        return _CLASSES[method]
    name = method.__name__.removesuffix("Module") + "Segmentation"
    cls = type(name, (SegmentationTask, method), {"__module__": __name__, "__doc__": f"{method.__name__} as the "
               f"encoder of a Segmenter decode head (`task: segmentation`)."})
    globals()[name] = cls  # importable by name (pickling, messages)
    _CLASSES[method] = cls
    return cls


__all__ = ["SegmentationTask", "segmentation_module", "sliding_window", "window_starts"]
