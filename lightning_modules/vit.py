"""timm plumbing: build a student ViT with a method's blocks, run it block by block, load weights.

The student wraps a timm `VisionTransformer` built by `timm.create_model(name, block_fn=...)`, or a timm `Eva`
(EVA-02, DINOv3, Perception Encoder: RoPE, SwiGLU, registers, MAP heads) whose blocks `layers.convert_eva` turns
into the method's, so every timm ViT variant (LayerScale, qk-norm, distillation or register tokens, avg-pool
and MAP heads) keeps its own embedding, norms and head.

Every student has one entry point, `run(images, train, trace) -> StudentOutput` (logits, the token trace, what the
method's loss needs); `forward` is `run` in the module's mode. A method subclasses `ViTStudent` and fills in hooks of
that one pass: a method that reduces inside blocks gives `ReductionBlock`s and `layer_settings`, one that reduces
between blocks `before_block`; one whose loop differs (masks instead of removal, adaptive halting, a rate search)
overrides `forward_blocks`, which gets `train`; `forward_head` when the head must know about the reduction;
`loss_inputs` what the loss reads from the pass.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar, cast

import timm
import torch
from timm.models import (
    build_model_with_cfg,
    clean_state_dict,
    generate_default_cfgs,
    get_arch_name,
    is_model,
    model_entrypoint,
    register_model,
)
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.hub import (
    convert_hub_state,
    hub_weights,
    is_hub,
    is_hub_state,
    read_hub_vit,
    resample_dinov2_pos,
)
from lightning_modules.layers import ReductionAttentionOps, ReductionBlock, SplitBlock, convert_eva
from lightning_modules.ops import mean_rope
from lightning_modules.trace import TokenTrace, TraceRecorder

log = logging.getLogger(__name__)

# What official checkpoints pickle besides tensors: DeiT-style files carry the argparse `args`.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]


# ------------------------------------------------------------------------------------------- micro models
# Small ViTs for 32 px images (8x8 = 64 patches), registered with timm so that YAMLs, teachers and tests
# name them like any timm model. They have no pretrained weights.
_MICRO = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2)
default_cfgs = generate_default_cfgs({
    name: dict(input_size=(3, 32, 32), num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
               interpolation="bicubic", first_conv="patch_embed.proj", classifier=head)
    for name, head in (("vit_micro_patch4_32", "head"), ("deit_micro_distilled_patch4_32", ("head", "head_dist")))
})


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT, 6 blocks, width 64, 2 heads, 32 px, patch 4 (the quickstart model)."""
    return build_model_with_cfg(VisionTransformer, "vit_micro_patch4_32", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **(_MICRO | kwargs))


@register_model
def deit_micro_distilled_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """The same with DeiT's distillation token (2 prefix tokens, two heads)."""
    return build_model_with_cfg(VisionTransformerDistilled, "deit_micro_distilled_patch4_32", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **(_MICRO | kwargs))


def _hub_reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_weights(name: str, key: str, local_key: str) -> None:
    """Fail at once, naming the model and the way out, when timm's pretrained weights for `name` are not cached
    and cannot be downloaded (offline): otherwise the hub client retries for about a minute and then reports a
    connection problem that names no model. Unknown names and models without weights are left to timm."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from timm.models._hub import check_cached_file

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # an unknown name: timm.create_model says so
        return
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return
    if cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files):
            return
    if cfg.url and check_cached_file(cfg.url):
        return
    where = f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif not _hub_reachable(constants.ENDPOINT if cfg.hf_hub_id else str(cfg.url)):
        why = "the hub cannot be reached from here"
    else:
        return
    raise ValueError(f"{key}: the weights of {name} ({where}) are not in the local cache ({constants.HF_HUB_CACHE}) "
                     f"and {why}; download them once where there is internet, or give a local file with "
                     f"{local_key}=FILE")


ViT = VisionTransformer | Eva
LossInputs = TypeVar("LossInputs")
BlockT = TypeVar("BlockT", bound=nn.Module)


@dataclass
class StudentOutput(Generic[LossInputs]):
    """One forward pass of a student (`ViTStudent.run`)."""

    logits: Any  # (B, classes); a distilled DeiT training with a teacher returns (class head, distillation head)
    trace: Optional[TokenTrace] = None  # when asked for
    loss_inputs: Optional[LossInputs] = None  # what the method's loss reads (DynamicViT's decisions, A-ViT's halting)
    dense: Optional[Tensor] = None  # (B, N0, C) final-norm features per patch, when asked for (`dense_features`)


def is_eva(backbone: str) -> bool:
    """Whether timm builds `backbone` as its `Eva` class (which takes no `block_fn`)."""
    if is_hub(backbone):  # a transformers ViT: timm's VisionTransformer
        return False
    arch = get_arch_name(backbone)
    return is_model(arch) and model_entrypoint(arch).__module__ == "timm.models.eva"


def create_vit(
    backbone: str,
    *,
    num_classes: int,
    img_size: Optional[int] = None,
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
    block_fn: Optional[Callable[..., nn.Module]] = None,
    **kwargs: Any,
) -> ViT:
    """`timm.create_model` for a ViT, with the method's block class when given (an Eva's blocks are converted to
    it after building; its attention class follows from its own: `attn_layer` applies to VisionTransformers)."""
    if img_size is not None:
        kwargs["img_size"] = img_size
    if is_hub(backbone):
        return create_hub_vit(backbone, num_classes=num_classes, pretrained=pretrained, drop_path_rate=drop_path_rate,
                              block_fn=block_fn, **kwargs)
    if pretrained:
        check_hub_weights(backbone, "model.pretrained", "model.weights")
    if is_eva(backbone):  # takes neither: its blocks (and their attention) are converted after building
        kwargs.pop("attn_layer", None)
    elif block_fn is not None:
        kwargs["block_fn"] = block_fn
    try:
        model = timm.create_model(
            backbone, pretrained=pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"backbone: unknown timm model {backbone!r}") from err
        raise
    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(f"backbone: {backbone!r} is a {type(model).__name__}, not a timm VisionTransformer or Eva")
    if isinstance(model, Eva) and block_fn is not None:
        convert_eva(model.blocks, block_fn)
    embed = model.patch_embed
    if not getattr(embed, "dynamic_img_pad", False) and embed.img_size is not None:
        # (H, W) that the patch size does not divide: the convolution would silently drop the last pixels
        if any(size % patch for size, patch in zip(embed.img_size, embed.patch_size)):
            raise ValueError(f"model.img_size: {embed.img_size[0]} is not a multiple of {backbone}'s patch size "
                             f"{embed.patch_size[0]}")
    return model


def create_hub_vit(backbone: str, *, num_classes: int, pretrained: bool, drop_path_rate: float,
                   block_fn: Optional[Callable[..., nn.Module]], **kwargs: Any) -> ViT:
    """`hf:<dir or id>`: the timm VisionTransformer equal to a `transformers` ViT / DeiT checkpoint, with its converted
    weights when `pretrained` (a classifier of another size is left at its initialisation, as for timm weights)."""
    hub = read_hub_vit(backbone, need_weights=pretrained)
    if block_fn is not None:
        kwargs["block_fn"] = block_fn
    model = timm.create_model(hub.timm_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate,
                              **(hub.kwargs | kwargs))
    assert isinstance(model, VisionTransformer)
    if pretrained:
        state = hub_weights(hub)
        if hub.pos_antialias is not None:  # DINOv2: transformers' own resampling, once
            grid = cast(tuple[int, int], tuple(model.patch_embed.grid_size))
            state["pos_embed"] = resample_dinov2_pos(state["pos_embed"], grid, hub.pos_antialias)
        state = checkpoint_filter_fn(state, model)  # resizes pos_embed for another img_size
        _load_matching(model, state, backbone)
    return model


def backbone_name(vit: nn.Module) -> str:
    """timm's name of a built model (its architecture), for messages."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture", type(vit).__name__))


class ViTStudent(nn.Module):
    """A timm VisionTransformer (or Eva) driven block by block, so a method can reduce tokens between and inside
    blocks.

    `student(images)` -> logits `(B, num_classes)`; `student(images, trace=True)` -> `(logits, TokenTrace)`.
    This base class is the dense model: it gives timm's logits exactly.

    RoPE (an Eva with `rope`): every block gets the rotation table of the tokens entering it (`block_rope`): timm's
    table until a reduction moves tokens, then `ops.mean_rope` of the patches each token carries, from the
    positions the token trace follows (so a trace recorder runs in every forward pass of such a model).
    """

    # Modules a method adds to the dense ViT (DynamicViT's `score_predictor`): a weights file without them (a
    # dense DeiT checkpoint) initialises the backbone and leaves these at their fresh initialisation.
    added_modules: tuple[str, ...] = ()

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit
        for block in vit.blocks:
            if isinstance(block, ReductionBlock):
                block.num_prefix = vit.num_prefix_tokens  # class, distillation, registers: never reduced

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def blocks_of(self, kind: type[BlockT]) -> list[BlockT]:
        """The blocks as the method's block class `kind` (its student builds every block with it)."""
        return [cast(BlockT, block) for block in self.vit.blocks]

    def attention(self, layer: int = 0) -> ReductionAttentionOps:
        """Block `layer`'s attention: a reduction attention in every method's student (the dense model has timm's)."""
        return cast(SplitBlock, self.vit.blocks[layer]).attn

    def grid_size(self, images: Tensor) -> tuple[int, int]:
        if self.vit.dynamic_img_size:
            patch = self.vit.patch_embed.patch_size
            return images.shape[-2] // patch[0], images.shape[-1] // patch[1]
        return tuple(self.vit.patch_embed.grid_size)

    def no_weight_decay(self) -> set[str]:
        """timm's list (pos_embed, cls/dist/reg tokens), named from the student."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def embed(self, images: Tensor) -> Tensor:
        """images `(B, 3, H, W)` -> tokens `(B, prefix + N0, C)`, exactly as timm's `forward_features` starts."""
        return self.embed_rope(images)[0]

    def embed_rope(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The tokens and timm's RoPE table for them: `(N0, D)`, `(H, N0, D)`, or per block `(depth, H, N0, D)` for
        mixed RoPE; None without RoPE."""
        vit = self.vit
        x = vit.patch_embed(images)
        if isinstance(vit, Eva):
            x, rope = vit._pos_embed(x)  # (Eva's patch dropout is inside)
            return vit.norm_pre(x), rope
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x), None

    def forward(self, images: Tensor, trace: bool = False) -> Tensor | tuple[Tensor, TokenTrace]:
        """`run` in the module's mode: logits, or `(logits, trace)` with `trace=True`."""
        out = self.run(images, train=self.training, trace=trace)
        if not trace:
            return out.logits
        assert out.trace is not None
        return out.logits, out.trace

    def run(self, images: Tensor, train: bool = False, trace: bool = False, dense: bool = False) -> StudentOutput[Any]:
        """The one forward pass of every method. `train`: the method's training computation (DynamicViT's Gumbel
        masks, A-ViT's masked halting, DiffRate's rate search), independent of the module's mode (dropout);
        `trace`: record the token trace; `dense`: restore the patch features (`dense_features`)."""
        x, rope = self.embed_rope(images)
        recorder = None
        if trace or dense or rope is not None:  # RoPE follows the tokens through the positions the recorder keeps
            keep_left = x if dense and self.dense_from_trace else None
            recorder = TraceRecorder.start(x.shape[0], self.grid_size(images), self.num_prefix_tokens, x.device,
                                           keep_left=keep_left)
        x, state = self.forward_blocks(x, recorder, rope, train)
        features = self.dense_features(x, state, recorder) if dense else None
        x = self.vit.norm(x)
        logits = self.forward_head(x, state)
        finished = recorder.finish(self.tokens_out(x, state)) if trace and recorder is not None else None
        return StudentOutput(logits, finished, self.loss_inputs(x, state), features)

    # Dense outputs (segmentation): a method whose tokens stay in place with their own rule sets this False and
    # overrides `dense_features` (A-ViT)
    dense_from_trace: bool = True
    # Set by a dense task (segmentation): every patch's output is read, not only the head's tokens (A-ViT then
    # runs every image until all its tokens halt)
    reads_patches: bool = False

    def forward_dense(self, images: Tensor) -> Tensor:
        """`(B, N0, C)` final-norm features of every patch, in the module's mode (`dense_features`)."""
        features = self.run(images, train=self.training, dense=True).dense
        assert features is not None
        return features

    def dense_features(self, x: Tensor, state: Any, recorder: Optional[TraceRecorder]) -> Tensor:
        """The patch features a dense head reads, from the blocks' output `x (B, N, C)` (before the final norm):
        a patch carried by a token (its own, a merged or a fused one) takes that token's features; a patch that
        left (pruned) takes its token's output of the last block it completed, as the trace recorder stored it
        when it left. Both through the final norm -> `(B, N0, C)`."""
        assert recorder is not None and recorder.left is not None
        return self.vit.norm(recorder.dense(x))

    def forward_blocks(self, x: Tensor, recorder: Optional[TraceRecorder], rope: Optional[Tensor] = None,
                       train: bool = False) -> tuple[Tensor, Any]:
        """Run every block and keep the token trace; return the tokens and the state the head needs.

        The loop every fixed-count method shares: `before_block` may reduce between blocks (DynamicViT), a
        `ReductionBlock` gets its `layer_settings()` entry, the state it returned last and its RoPE table, and
        may reduce inside the block (ToMe, EViT); plain timm blocks run as they are.
        """
        return self.block_loop(x, recorder, rope, self.layer_settings())

    def block_loop(self, x: Tensor, recorder: Optional[TraceRecorder], rope: Optional[Tensor],
                   settings: list[Any]) -> tuple[Tensor, Any]:
        """`forward_blocks`' loop with the given per-block `settings` (a method may run it twice, as MCTF's
        training branch)."""
        state: Any = None
        num_patches = x.shape[1] - self.num_prefix_tokens
        for layer, (block, setting) in enumerate(zip(self.vit.blocks, settings)):
            x, state = self.before_block(layer, x, state, recorder, num_patches)
            if recorder is not None:
                recorder.block(x.shape[1])
            block_rope = self.block_rope(rope, layer, recorder, x.shape[1])
            if not isinstance(block, ReductionBlock):
                x = self.run_block(block, x) if block_rope is None else self.run_block(block, x, rope=block_rope)
                continue
            entering = x
            x, state, dest = self.run_block(block.reduce, x, state, setting, recorder is not None, block_rope)
            if recorder is not None and dest is not None:
                recorder.remap(dest, entering)  # a token dropped inside the block last completed the one before
                recorder.mlp(x.shape[1])
        return x, state

    def loss_inputs(self, x: Tensor, state: Any) -> Any:
        """What the method's loss needs from a pass, beside the logits (x: the final-norm tokens); none here."""
        return None

    def layer_rope(self, rope: Optional[Tensor], layer: int) -> Optional[Tensor]:
        """Block `layer`'s part of timm's RoPE table (mixed RoPE has one per block)."""
        if rope is None or not getattr(self.vit, "rope_mixed", False):
            return rope
        return rope[layer]

    def block_rope(self, rope: Optional[Tensor], layer: int, recorder: Optional[TraceRecorder],
                   num_tokens: int) -> Optional[Tensor]:
        """The RoPE table of the `num_tokens` tokens entering block `layer`: timm's until a reduction moved
        tokens, then each token's patches' mean (`ops.mean_rope`) -> None or `(..., num_tokens - prefix, D)`."""
        table = self.layer_rope(rope, layer)
        if table is None or recorder is None or recorder.moves == 0:
            return table
        return mean_rope(table, recorder.positions, num_tokens, self.num_prefix_tokens)

    def layer_settings(self) -> list[Any]:
        """What each block's reduction gets (None: that block runs dense)."""
        return [None] * self.depth

    def before_block(self, layer: int, x: Tensor, state: Any, recorder: Optional[TraceRecorder],
                     num_patches: int) -> tuple[Tensor, Any]:
        """A reduction between blocks, before block `layer` (reporting its token map to `recorder`; `num_patches`:
        the patch tokens entering the first block); none here."""
        return x, state

    def forward_head(self, x: Tensor, state: Any) -> Tensor:
        return self.vit.forward_head(x)

    def size_weighted_head(self, x: Tensor, size: Optional[Tensor]) -> Tensor:
        """The head of a merging method (state: token sizes `(B, N, 1)`, None before any merge). Class-token
        heads read token 0 (never merged); global average pooling weighs each token by its size, the mean over
        the original patches (ToMe's MAE patch)."""
        vit = self.vit
        if size is None or vit.attn_pool is not None or vit.global_pool != "avg":
            return vit.forward_head(x)
        prefix = self.num_prefix_tokens
        pooled = (x * size)[:, prefix:].sum(dim=1) / size[:, prefix:].sum(dim=1)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))

    def tokens_out(self, x: Tensor, state: Any) -> Tensor | int:
        """Tokens leaving the last block (per image for adaptive methods)."""
        return x.shape[1]

    def tokens_to_head(self, trace: TokenTrace) -> Tensor:
        """(B,) tokens the head reads (a MAP head attends to all of them): those leaving the last block."""
        return trace.tokens[:, -1]

    def run_block(self, block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a block (or one of its methods), through activation checkpointing when timm's `set_grad_checkpointing` is on."""
        if self.vit.grad_checkpointing and torch.is_grad_enabled():  # also when training in eval mode
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def extra_macs(self, trace: TokenTrace) -> Tensor:
        """(B,) MACs a method adds beyond the ViT's own layers (see lightning_modules.macs); none here."""
        return trace.tokens.new_zeros(trace.tokens.shape[0], dtype=torch.float64)

    def extra_checkpoint_keys(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a method's own keys in an official checkpoint (not timm keys) onto this student; none here."""
        return {}


# ----------------------------------------------------------------------------------------------- weights
def read_checkpoint(path: str | pathlib.Path) -> tuple[dict[str, Tensor], str]:
    """Read the tensors of a weights file without unpickling arbitrary objects.

    Returns `(state_dict, kind)`: kind "leanvit" (a leanvit .ckpt: keys of the student, `vit.` prefixed),
    or "timm" (a plain or DeiT-style `{"model": ...}` / `{"state_dict": ...}` file, safetensors too).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return (convert_hub_state(tensors) if is_hub_state(tensors) else tensors), "timm"
    obj = read_checkpoint_object(path)
    if "pytorch-lightning_version" in obj and "state_dict" in obj:
        prefix = "student."
        state = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        return state, "leanvit"
    if obj.get("ema_best") is True and isinstance(obj.get("model_ema"), dict):  # ATC's train_deit.py: the better one
        obj = obj["model_ema"]
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"weights: {str(path)!r} has no tensors (keys: {sorted(obj)[:8]})")
    if is_hub_state(tensors):  # a transformers ViT / DeiT file: timm's keys
        return convert_hub_state(tensors), "timm"
    return clean_state_dict(tensors), "timm"


def read_checkpoint_object(path: str | pathlib.Path) -> dict[str, Any]:
    """The dict a .pt/.pth/.ckpt file holds, read with `weights_only=True` (official checkpoints' argparse `args`
    allow-listed); {} for a safetensors file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        return {}
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with a long explanation; keep the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"weights: cannot read {str(path)!r} with weights_only=True: {first}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"weights: {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_weights(model: nn.Module, path: str | pathlib.Path) -> None:
    """Initialise a student (or a plain timm model, e.g. a teacher) from a weights file.

    Accepts a leanvit .ckpt, a timm/DeiT state dict, or a method's official checkpoint (timm keys plus the
    method's own, mapped by `ViTStudent.extra_checkpoint_keys`). A classifier head of another size
    (fine-tuning to a new label set) is left at its initialisation with a warning; any other missing or
    unexpected key is an error that names the keys.
    """
    state, kind = read_checkpoint(path)
    vit = model.vit if isinstance(model, ViTStudent) else model
    if kind == "leanvit" and not isinstance(model, ViTStudent):
        state = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
    elif kind == "timm":
        own = model.extra_checkpoint_keys(state) if isinstance(model, ViTStudent) else {}
        state = {k: v for k, v in state.items() if k not in own}
        if isinstance(vit, VisionTransformer):
            state = checkpoint_filter_fn(state, vit)  # resizes pos_embed, converts old layouts
        elif isinstance(vit, Eva):
            state = eva_checkpoint_filter_fn(state, vit)  # official EVA / PE / DINOv3 layouts -> timm's
        if hasattr(getattr(vit, "head", None), "projection"):  # a zero-shot head: the file's head is its projection
            state = {(f"head.projection.{k[len('head.'):]}" if k.startswith("head.") else k): v for k, v in state.items()}
        if isinstance(model, ViTStudent):
            state = {f"vit.{k}": v for k, v in state.items()} | own
    _load_matching(model, state, path)


def _load_matching(model: nn.Module, state: dict[str, Tensor], path: str | pathlib.Path) -> None:
    target = model.state_dict()
    heads = {k for k in target if any(part in ("head", "head_dist", "fc", "classifier") for part in k.split(".")[-3:-1])}
    resized = [k for k in state if k in target and k not in heads and state[k].shape != target[k].shape]
    if resized:  # another width or patch size: a file for another model
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in resized[:3])
        raise ValueError(f"weights: {str(path)!r} is for a model of another size than this backbone "
                         f"(file vs model: {shapes}{' ...' if len(resized) > 3 else ''})")
    for name in [k for k in state if k in heads and state[k].shape != target[k].shape]:
        log.warning("weights: %s has shape %s in %s, %s in the model: left at its initialisation",
                    name, tuple(state[name].shape), path, tuple(target[name].shape))
        del state[name]
    fresh = tuple(f"{m}." for m in getattr(model, "added_modules", ()) if not any(k.startswith(f"{m}.") for k in state))
    if fresh:
        log.warning("weights: %s has no %s (a dense checkpoint): the backbone is loaded, %s start fresh", path,
                    ", ".join(f"{m}*" for m in fresh), ", ".join(m[:-1] for m in fresh))
    missing = [k for k in target if k not in state and k not in heads and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise ValueError(
            f"weights: {str(path)!r} does not match the model: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    model.load_state_dict(state, strict=False)


# DeiT distils from its own RegNetY-16GF weights (`regnety_160-a5fe301d.pth`); timm's untagged name resolves to
# another pretrained tag (trained on ImageNet-12k), so an untagged DeiT teacher name means DeiT's tag.
DEIT_TEACHER_TAGS = {"regnety_160": "regnety_160.deit_in1k"}


def resolve_teacher_name(name: str, weights: Optional[str]) -> str:
    """The timm name to create a teacher with: DeiT's pretrained tag for an untagged DeiT teacher from the hub."""
    if weights is None and name in DEIT_TEACHER_TAGS:
        log.warning("model.teacher: %s -> %s (DeiT's teacher weights; name a tag to choose others)",
                    name, DEIT_TEACHER_TAGS[name])
        return DEIT_TEACHER_TAGS[name]
    return name


def create_teacher(name: str, *, num_classes: int, img_size: Optional[int], weights: Optional[str],
                   **kwargs: Any) -> nn.Module:
    """A frozen timm classifier in eval mode: hub weights unless a local `weights` file is given. Any failure
    is a ValueError that says it is the teacher and how to give it a local file."""
    if is_hub(name):  # the hub backbone itself (DynamicViT's teacher)
        teacher_vit = create_vit(name, num_classes=num_classes, img_size=img_size, pretrained=weights is None)
        if weights is not None:
            load_weights(teacher_vit, weights)
        teacher_vit.requires_grad_(False)
        return teacher_vit.eval()
    timm_name = resolve_teacher_name(name, weights)
    pretrained = weights is None
    if pretrained:
        check_hub_weights(timm_name, "model.teacher", "model.teacher_weights")
    try:
        try:  # ViT teachers take the student's resolution; convnets (regnety_160) take no img_size
            sized: dict[str, Any] = {"img_size": img_size} if img_size else {}
            teacher = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **sized, **kwargs)
        except TypeError:
            teacher = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unknown model" in first:
            raise ValueError(f"model.teacher: unknown timm model {name!r}") from err
        raise ValueError(f"model.teacher: cannot get weights for the teacher {timm_name!r} ({first}); "
                         f"give a local file with model.teacher_weights=FILE") from err
    if weights is not None:
        try:
            load_weights(teacher, weights)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"model.teacher_weights: {err}") from err
    teacher.requires_grad_(False)
    return teacher.eval()
