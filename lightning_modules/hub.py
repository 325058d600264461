"""Backbones users already have, as the equivalent timm model, so every method, the trace, MACs and export work
unchanged: Hugging Face `transformers` ViT checkpoints (`model.backbone: hf:<local dir or hub id>`) and open_clip
vision towers (`model.backbone: open_clip:<arch>[:<pretrained tag>]`).

The checkpoint's `config.json` gives the architecture; its weights (`model.safetensors` or `pytorch_model.bin`,
`transformers`' saved key layout) are converted key by key. Mapped exactly: `vit` (ViTModel /
ViTForImageClassification), `deit` (DeiT, and DeiTForImageClassificationWithTeacher with its distillation token) and
CLIP's vision tower (`clip_vision_model`, or the vision half of a `clip` model: pre-norm, QuickGELU, the visual
projection as a bias-free head).
Anything else - another model type, a setting timm's ViT cannot express - is refused in one line naming it.

open_clip: the architecture comes from `open_clip.get_model_config(arch)` (a plain ViT tower: class token, pre-norm,
the projection as a bias-free head, QuickGELU for the `-quickgelu` configs); the weights of a pretrained tag come from
open_clip (its cache, or a download), or from `model.weights=FILE` (an open_clip / OpenAI CLIP state dict, whose
`visual.*` keys timm's own converter maps).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

PREFIX = "hf:"
OPEN_CLIP = "open_clip:"


@dataclass
class HubViT:
    """A `transformers` ViT checkpoint as timm sees it: the timm architecture to build and its arguments."""

    source: str  # the hub id or directory, as given
    folder: Optional[Path]  # where config.json (and the weights) are; None until resolved
    config: dict[str, Any]
    timm_name: str  # the timm entrypoint whose class builds it
    kwargs: dict[str, Any]  # architecture arguments for timm.create_model
    num_labels: int
    origin: str = "transformers"  # or "open_clip": where the weights come from


def is_hub(backbone: str) -> bool:
    """A backbone leanvit converts (transformers or open_clip) rather than one timm names."""
    return backbone.startswith((PREFIX, OPEN_CLIP))


def resolve_folder(source: str, need_weights: bool) -> Path:
    """A local directory as is; a hub id from the local hub cache (offline, as timm's `pretrained`: HF_HUB_OFFLINE
    makes a missing file an error at once) or downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["config.json", *(["model.safetensors", "pytorch_model.bin"] if need_weights else [])]
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # offline without a cached copy, an unknown id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.backbone: hf:{source} is neither a local directory nor a hub model this machine can "
                         f"read ({first}); give a directory with config.json and the weights") from err


def read_open_clip(backbone: str) -> HubViT:
    """`open_clip:<arch>[:<tag>]` -> the timm architecture of its vision tower."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("model.backbone: open_clip backbones need open_clip_torch (pip install open_clip_torch)") from err
    arch = backbone[len(OPEN_CLIP):].split(":")[0]
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"model.backbone: {backbone}: open_clip has no model {arch!r}")
    vision = dict(config.get("vision_cfg") or {})
    known = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
    other = sorted(k for k, v in vision.items() if k not in known and v not in (None, False, 0))
    if "timm_model_name" in vision or other:
        raise ValueError(f"model.backbone: {backbone}'s vision tower sets {other or ['timm_model_name']}; leanvit maps "
                         f"open_clip's plain ViT towers exactly, not these")
    width, head_width = int(vision["width"]), int(vision.get("head_width", 64))
    kwargs = dict(img_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]), embed_dim=width,
                  depth=int(vision["layers"]), num_heads=width // head_width, mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
                  pre_norm=True, class_token=True, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=1e-5))
    if config.get("quick_gelu"):
        kwargs["act_layer"] = "quick_gelu"
    return HubViT(backbone[len(OPEN_CLIP):], None, config, "vit_base_patch16_clip_224", kwargs,
                  int(config["embed_dim"]), origin="open_clip")


def open_clip_weights(hub: HubViT) -> dict[str, Tensor]:
    """The vision tower's weights of an `open_clip:<arch>:<tag>` backbone (open_clip's keys, `visual.` prefixed)."""
    import open_clip

    arch, _, tag = hub.source.partition(":")
    if not tag:
        raise ValueError(f"model.pretrained: open_clip:{arch} names no pretrained tag (open_clip:{arch}:<tag>, e.g. "
                         f"{', '.join(t for _, t in open_clip.list_pretrained() if _ == arch)[:80] or 'openai'}); or "
                         f"give model.weights=FILE")
    try:
        model = open_clip.create_model(arch, pretrained=tag)
    except Exception as err:  # offline without the cached file, an unknown tag
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.pretrained: open_clip:{arch}:{tag} cannot be loaded here ({first}); give "
                         f"model.weights=FILE") from err
    # OpenAI CLIP's `visual.*` layout: timm's checkpoint filter (create_hub_vit) converts it
    return {f"visual.{k}": v for k, v in model.visual.state_dict().items()}


def read_hub_vit(backbone: str, need_weights: bool = False) -> HubViT:
    """`hf:<dir or id>` -> the timm architecture of its config (refused in one line when not exactly mappable);
    `open_clip:<arch>` -> its vision tower's."""
    if backbone.startswith(OPEN_CLIP):
        return read_open_clip(backbone)
    source = backbone[len(PREFIX):]
    folder = resolve_folder(source, need_weights)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"model.backbone: {backbone}: no config.json in {folder}")
    config = json.loads(config_path.read_text())
    kind = config.get("model_type")
    if kind in ("clip", "clip_vision_model"):
        return read_hub_clip(source, folder, config)
    if kind not in ("vit", "deit"):
        raise ValueError(f"model.backbone: {backbone} is a {kind!r} model; leanvit maps transformers' vit, deit and "
                         f"clip (vision) exactly, not {kind!r}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"model.backbone: {backbone} uses hidden_act {act!r}; timm's ViT has gelu")
    if config.get("num_channels", 3) != 3:
        raise ValueError(f"model.backbone: {backbone} takes {config['num_channels']} channels; leanvit's data are RGB")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    distilled = any("Teacher" in a or "Distill" in a for a in config.get("architectures") or [])
    kwargs = dict(img_size=int(config["image_size"]), patch_size=int(config["patch_size"]), embed_dim=hidden,
                  depth=int(config["num_hidden_layers"]), num_heads=heads,
                  mlp_ratio=int(config["intermediate_size"]) / hidden, qkv_bias=bool(config.get("qkv_bias", True)),
                  norm_layer=partial(nn.LayerNorm, eps=float(config.get("layer_norm_eps", 1e-12))))
    name = "deit_base_distilled_patch16_224" if distilled else "vit_base_patch16_224"
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 0))
    return HubViT(source, folder, config, name, kwargs, labels)


def read_hub_clip(source: str, folder: Path, config: dict[str, Any]) -> HubViT:
    """A transformers CLIP model's vision tower (`CLIPVisionModel[WithProjection]`, or a whole `CLIPModel`): timm's
    pre-norm CLIP ViT, the visual projection as a bias-free head."""
    vision = config.get("vision_config", config) if config.get("model_type") == "clip" else config
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"model.backbone: hf:{source} uses hidden_act {act!r}; timm's CLIP ViT has quick_gelu or gelu")
    hidden = int(vision["hidden_size"])
    kwargs = dict(img_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]), embed_dim=hidden,
                  depth=int(vision["num_hidden_layers"]), num_heads=int(vision["num_attention_heads"]),
                  mlp_ratio=int(vision["intermediate_size"]) / hidden, pre_norm=True, class_token=True,
                  global_pool="token", act_layer=act, norm_layer=partial(nn.LayerNorm, eps=float(vision.get(
                      "layer_norm_eps", 1e-5))))
    projected = config.get("model_type") == "clip" or any("Projection" in a for a in config.get("architectures") or [])
    width = int(config.get("projection_dim") or vision.get("projection_dim") or 0) if projected else 0
    return HubViT(source, folder, config, "vit_base_patch16_clip_224", kwargs, width)


def stacked_qkv(parts: dict[tuple[int, str], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Separate q, k, v projections `{(layer, weight|bias): {"q": .., "k": .., "v": ..}}` -> timm's fused
    `blocks.<layer>.attn.qkv.<weight|bias>` (q, k, v stacked along the output features)."""
    return {f"blocks.{layer}.attn.qkv.{kind}": torch.cat([p["q"], p["k"], p["v"]])
            for (layer, kind), p in parts.items()}


_CLIP_RENAMES = [
    (r"^vision_model\.embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^vision_model\.pre_layrnorm\.", "norm_pre."),
    (r"^vision_model\.post_layernorm\.", "norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]
_CLIP_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")


def convert_hub_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP state dict (its vision tower; the text tower and logit scale are dropped) -> timm's keys."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        qkv = _CLIP_QKV.match(key)
        if qkv:
            parts.setdefault((int(qkv.group(1)), qkv.group(3)), {})[qkv.group(2)[0]] = value  # q, k or v
        elif key == "vision_model.embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key == "visual_projection.weight":
            out["head.weight"] = value
            out["head.bias"] = value.new_zeros(value.shape[0])
        elif key.startswith("vision_model.") and not key.endswith("position_ids"):
            new = key
            for pattern, repl in _CLIP_RENAMES:
                new = re.sub(pattern, repl, new)
            out[new] = value
    return out | stacked_qkv(parts)


# transformers' saved ViT / DeiT keys (also the in-memory names of transformers 5) -> timm's
_RENAMES = [
    (r"^(?:vit|deit)\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.", r"blocks.\1\2.mlp.fc1."),
    (r"^(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.", r"blocks.\1\2.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"^cls_classifier\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]
_QKV = re.compile(r"^(?:vit\.|deit\.)?(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)|"
                  r"layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj))\.(weight|bias)$")
_IGNORED = re.compile(r"^(?:vit\.|deit\.)?(?:pooler\.|embeddings\.mask_token$)")  # parts no timm ViT has


def convert_hub_vit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A `transformers` ViT / DeiT state dict -> timm's VisionTransformer keys (q, k, v stacked into qkv)."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if _IGNORED.match(key):
            continue
        qkv = _QKV.match(key)
        if qkv:
            layer = int(qkv.group(1) or qkv.group(3))
            parts.setdefault((layer, qkv.group(5)), {})[(qkv.group(2) or qkv.group(4))[0]] = value  # q, k or v
            continue
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out | stacked_qkv(parts)


def is_hub_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict has `transformers`' ViT / DeiT / CLIP keys."""
    return any(k.startswith(("vit.embeddings.", "deit.embeddings.", "embeddings.patch_embeddings.",
                             "vision_model.embeddings.")) for k in state)


def convert_hub_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ViT / DeiT / CLIP state dict -> timm's keys."""
    if any(k.startswith("vision_model.") for k in state):
        return convert_hub_clip(state)
    return convert_hub_vit(state)


def hub_weights(hub: HubViT) -> dict[str, Tensor]:
    """The checkpoint's weights, converted to timm's keys."""
    if hub.origin == "open_clip":
        return open_clip_weights(hub)
    folder = hub.folder if hub.folder is not None else resolve_folder(hub.source, need_weights=True)
    safetensors, pickle = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors.is_file():
        from safetensors.torch import load_file

        state = load_file(str(safetensors))
    elif pickle.is_file():
        state = torch.load(pickle, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"model.pretrained: hf:{hub.source} has no model.safetensors or pytorch_model.bin in {folder}")
    return convert_hub_state(state)
