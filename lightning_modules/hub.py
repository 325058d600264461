"""Backbones users already have, as the equivalent timm model, so every method, the trace, MACs and export work
unchanged: Hugging Face `transformers` ViT checkpoints (`model.backbone: hf:<local dir or hub id>`) and open_clip
vision towers (`model.backbone: open_clip:<arch>[:<pretrained tag>]`).

The checkpoint's `config.json` gives the architecture; its weights (`model.safetensors` or `pytorch_model.bin`,
`transformers`' saved key layout) are converted key by key. Mapped exactly: `vit` (ViTModel /
ViTForImageClassification), `deit` (DeiT, and DeiTForImageClassificationWithTeacher with its distillation token), `dinov2` and
`dinov2_with_registers` (Dinov2Model: LayerScale, register tokens, SwiGLU for the giant; the class token pooled after
the final norm; the position embeddings resampled to `model.img_size` exactly as transformers does at each forward),
CLIP's vision tower (`clip_vision_model`, or the vision half of a `clip` model: pre-norm, QuickGELU, the visual
projection as a bias-free head) and SigLIP's (`siglip_vision_model`, or the vision half of a `siglip` model: no class
token, tanh GELU, the attention-pooling head as timm's MAP head).
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
    # DINOv2 resamples its position embeddings to the input at each forward (bicubic in float32, antialiased for the
    # registers model): done once at load, the same way; None: timm's resampling for another `img_size`
    pos_antialias: Optional[bool] = None


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
    if kind in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
        return read_hub_clip(source, folder, config)
    if kind in ("dinov2", "dinov2_with_registers"):
        return read_hub_dinov2(source, folder, config)
    if kind not in ("vit", "deit"):
        raise ValueError(f"model.backbone: {backbone} is a {kind!r} model; leanvit maps transformers' vit, deit, "
                         f"dinov2, clip and siglip (vision) exactly, not {kind!r}")
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


def read_hub_dinov2(source: str, folder: Path, config: dict[str, Any]) -> HubViT:
    """Dinov2Model / Dinov2WithRegistersModel: timm's DINOv2 ViT (LayerScale, register tokens after the class token,
    position embeddings on the class and patch tokens only), pooling the normed class token as `pooler_output`."""
    if any("Classification" in a for a in config.get("architectures") or []):
        raise ValueError(f"model.backbone: hf:{source} is a Dinov2ForImageClassification, whose classifier reads the "
                         f"class token and the mean patch token concatenated; timm's ViT heads read one pooled token: "
                         f"give the Dinov2Model checkpoint")
    act = config.get("hidden_act", "gelu")
    swiglu = bool(config.get("use_swiglu_ffn", False))
    if act != "gelu" and not swiglu:
        raise ValueError(f"model.backbone: hf:{source} uses hidden_act {act!r}; timm's DINOv2 has gelu")
    hidden = int(config["hidden_size"])
    kwargs: dict[str, Any] = dict(
        img_size=int(config["image_size"]), patch_size=int(config["patch_size"]), embed_dim=hidden,
        depth=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
        mlp_ratio=float(config.get("mlp_ratio", 4)), qkv_bias=bool(config.get("qkv_bias", True)),
        init_values=float(config.get("layerscale_value", 1.0)), class_token=True, no_embed_class=True,
        reg_tokens=int(config.get("num_register_tokens", 0)) if config["model_type"] == "dinov2_with_registers" else 0,
        global_pool="token", norm_layer=partial(nn.LayerNorm, eps=float(config.get("layer_norm_eps", 1e-6))))
    if swiglu:  # transformers' hidden width: 2/3 of hidden x mlp_ratio, rounded up to a multiple of 8
        from timm.layers import SwiGLUPacked

        width = (int(int(hidden * kwargs["mlp_ratio"]) * 2 / 3) + 7) // 8 * 8
        # timm's packed fc1 is int(hidden x mlp_ratio) = 2 x width wide (+0.5: no float round-down)
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=(2 * width + 0.5) / hidden)
    return HubViT(source, folder, config, "vit_base_patch14_dinov2", kwargs, 0,
                  pos_antialias=config["model_type"] == "dinov2_with_registers")


def read_hub_clip(source: str, folder: Path, config: dict[str, Any]) -> HubViT:
    """A transformers CLIP model's vision tower (`CLIPVisionModel[WithProjection]`, or a whole `CLIPModel`): timm's
    pre-norm CLIP ViT, the visual projection as a bias-free head. SigLIP's (`SiglipVisionModel`, or a whole
    `SiglipModel`): timm's SigLIP ViT (no class token, no pre-norm, tanh GELU, the attention-pooling head as `map`)."""
    kind = config["model_type"]
    vision = config.get("vision_config", config) if kind in ("clip", "siglip") else config
    siglip = kind.startswith("siglip")
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
    act = vision.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    if act not in acts:
        raise ValueError(f"model.backbone: hf:{source} uses hidden_act {act!r}; timm's ViT has {', '.join(acts)}")
    if siglip and (not vision.get("vision_use_head", True)
                   or any("Classification" in a for a in config.get("architectures") or [])):
        raise ValueError(f"model.backbone: hf:{source} has no attention-pooling head (vision_use_head false, or a "
                         f"SiglipForImageClassification, which averages the tokens); leanvit maps SigLIP's pooled "
                         f"tower: give the SiglipModel / SiglipVisionModel checkpoint")
    hidden = int(vision["hidden_size"])
    kwargs = dict(img_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]), embed_dim=hidden,
                  depth=int(vision["num_hidden_layers"]), num_heads=int(vision["num_attention_heads"]),
                  mlp_ratio=int(vision["intermediate_size"]) / hidden, act_layer=acts[act],
                  norm_layer=partial(nn.LayerNorm, eps=float(vision.get("layer_norm_eps", 1e-6 if siglip else 1e-5))))
    if siglip:
        kwargs.update(class_token=False, global_pool="map", pre_norm=False)
        return HubViT(source, folder, config, "vit_base_patch16_siglip_224", kwargs, 0)
    kwargs.update(pre_norm=True, class_token=True, global_pool="token")
    projected = kind == "clip" or any("Projection" in a for a in config.get("architectures") or [])
    width = int(config.get("projection_dim") or vision.get("projection_dim") or 0) if projected else 0
    return HubViT(source, folder, config, "vit_base_patch16_clip_224", kwargs, width)


def renamed(key: str, table: list[tuple[str, str]]) -> str:
    """A key with every `(pattern, replacement)` of a rename table applied in order."""
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def stacked_qkv(parts: dict[tuple[int, str], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Separate q, k, v projections `{(layer, weight|bias): {"q": .., "k": .., "v": ..}}` -> timm's fused
    `blocks.<layer>.attn.qkv.<weight|bias>` (q, k, v stacked along the output features)."""
    return {f"blocks.{layer}.attn.qkv.{kind}": torch.cat([p["q"], p["k"], p["v"]])
            for (layer, kind), p in parts.items()}


_CLIP_RENAMES = [  # after the `vision_model.` prefix (absent in transformers 5's SiglipVisionModel files)
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^post_layernorm\.", "norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^head\.attention\.out_proj\.", "attn_pool.proj."),  # SigLIP's attention-pooling head: timm's MAP head
    (r"^head\.layernorm\.", "attn_pool.norm."),
    (r"^head\.mlp\.", "attn_pool.mlp."),
]
_CLIP_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")
_CLIP_DROPPED = re.compile(r"^(?:text_model\.|text_projection\.|logit_scale$|logit_bias$|.*position_ids$)")


def convert_hub_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP / SigLIP state dict (its vision tower; the text tower and logit scale are dropped) ->
    timm's keys."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    for full_key, value in state.items():
        if _CLIP_DROPPED.match(full_key):
            continue
        key = full_key.removeprefix("vision_model.")
        qkv = _CLIP_QKV.match(key)
        if qkv:
            parts.setdefault((int(qkv.group(1)), qkv.group(3)), {})[qkv.group(2)[0]] = value  # q, k or v
        elif key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key == "visual_projection.weight":
            out["head.weight"] = value
            out["head.bias"] = value.new_zeros(value.shape[0])
        elif key == "head.probe":
            out["attn_pool.latent"] = value
        elif key.startswith("head.attention.in_proj_"):  # (3C, C) / (3C,): q, then k and v together
            kind = key.rsplit("_", 1)[1]
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = value.split([value.shape[0] // 3,
                                                                                  2 * value.shape[0] // 3])
        else:
            out[renamed(key, _CLIP_RENAMES)] = value
    return out | stacked_qkv(parts)


# transformers' saved ViT / DeiT keys (also the in-memory names of transformers 5) -> timm's
_RENAMES = [
    (r"^(?:vit|deit|dinov2)\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^embeddings\.register_tokens$", "reg_token"),  # DINOv2: LayerScale, its MLP, pre-norm names
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm\d)\.", r"blocks.\1.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:fc1|weights_in)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:fc2|weights_out|down_proj)\.", r"blocks.\1.mlp.fc2."),
    (r"^(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.", r"blocks.\1\2.mlp.fc1."),
    (r"^(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.", r"blocks.\1\2.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"^cls_classifier\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]
_QKV = re.compile(r"^(?:vit\.|deit\.|dinov2\.)?(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)|"
                  r"(?:layers|encoder\.layer)\.(\d+)\.attention\.(q_proj|k_proj|v_proj))\.(weight|bias)$")
# transformers 5's in-memory SwiGLU (DINOv2 giant): gate and up, which timm's packed fc1 stacks (gate first)
_GLU = re.compile(r"^(?:dinov2\.)?encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$")
_IGNORED = re.compile(r"^(?:vit\.|deit\.|dinov2\.)?(?:pooler\.|embeddings\.mask_token$)")  # parts no timm ViT has


def convert_hub_vit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A `transformers` ViT / DeiT / DINOv2 state dict -> timm's VisionTransformer keys (q, k, v stacked into qkv).
    DINOv2 (LayerScale keys) adds its class position embedding to the class token (timm's `no_embed_class`: the
    registers sit between the class token and the patches and take no position)."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    glu: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if _IGNORED.match(key):
            continue
        qkv, gated = _QKV.match(key), _GLU.match(key)
        if qkv:
            layer = int(qkv.group(1) or qkv.group(3))
            parts.setdefault((layer, qkv.group(5)), {})[(qkv.group(2) or qkv.group(4))[0]] = value  # q, k or v
            continue
        if gated:
            glu.setdefault((int(gated.group(1)), gated.group(3)), {})[gated.group(2)] = value
            continue
        out[renamed(key, _RENAMES)] = value
    out |= {f"blocks.{layer}.mlp.fc1.{kind}": torch.cat([p["gate"], p["up"]]) for (layer, kind), p in glu.items()}
    if any(k.endswith(".ls1.gamma") for k in out) and "pos_embed" in out:  # DINOv2: (1, 1 + N, C) -> (1, N, C)
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out | stacked_qkv(parts)


def resample_dinov2_pos(pos: Tensor, grid: tuple[int, int], antialias: bool) -> Tensor:
    """`(1, n*n, C)` patch position embeddings -> `(1, gh*gw, C)` as transformers' DINOv2 does at each forward:
    bicubic in float32 (align_corners False), antialiased for the registers model."""
    side = int(round(pos.shape[1] ** 0.5))
    if (side, side) == tuple(grid):
        return pos
    square = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, C, n, n)
    out = torch.nn.functional.interpolate(square, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    return out.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


def is_hub_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict has `transformers`' ViT / DeiT / DINOv2 / CLIP / SigLIP keys."""
    return any(k.startswith(("vit.embeddings.", "deit.embeddings.", "dinov2.embeddings.", "embeddings.patch_embeddings.",
                             "vision_model.embeddings.", "embeddings.patch_embedding.")) for k in state)


def convert_hub_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ViT / DeiT / DINOv2 / CLIP / SigLIP state dict -> timm's keys."""
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding.")) for k in state):
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


# ------------------------------------------------------------------------------------ back to transformers
_SAVED = [  # timm key (after `blocks.<i>.`) -> transformers' saved ViT / DeiT layout (after `<prefix>encoder.layer.<i>.`)
    ("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
]


def hub_vit_layout(vit: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A timm ViT that transformers' `vit` / `deit` express exactly -> (its `config.json` entries, its weights in
    transformers' saved key layout): the inverse of `convert_hub_vit`. Anything else is refused in one line naming
    what transformers' ViT does not have."""
    from timm.models.deit import VisionTransformerDistilled

    block = vit.blocks[0]
    act = getattr(block.mlp, "act", None)
    differs = [name for name, present in (
        ("pre-norm", not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity)),
        ("LayerScale", not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity)),
        ("register tokens", getattr(vit, "num_reg_tokens", 0) > 0),
        ("no class token", getattr(vit, "cls_token", None) is None),
        ("position embeddings without the class token", bool(getattr(vit, "no_embed_class", False))),
        ("a pooling other than the class token", getattr(vit, "global_pool", "token") != "token"
         or getattr(vit, "attn_pool", None) is not None or not isinstance(vit.fc_norm, nn.Identity)),
        ("qk-norm", not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity)),
        ("an activation other than exact GELU", not (isinstance(act, nn.GELU) and act.approximate == "none")),
        ("a gated or normed MLP", not hasattr(block.mlp, "fc2") or not isinstance(getattr(block.mlp, "norm",
                                                                                             nn.Identity()), nn.Identity)),
        ("a patch embedding without bias", vit.patch_embed.proj.bias is None),
    ) if present]
    if differs:
        raise ValueError(f"format=hf: transformers' ViT / DeiT has no {', '.join(differs)}; this backbone cannot be "
                         f"written as one")
    distilled = isinstance(vit, VisionTransformerDistilled)
    prefix = "deit." if distilled else "vit."
    state: dict[str, Tensor] = {
        f"{prefix}embeddings.cls_token": vit.cls_token, f"{prefix}embeddings.position_embeddings": vit.pos_embed,
        f"{prefix}embeddings.patch_embeddings.projection.weight": vit.patch_embed.proj.weight,
        f"{prefix}embeddings.patch_embeddings.projection.bias": vit.patch_embed.proj.bias,
        f"{prefix}layernorm.weight": vit.norm.weight, f"{prefix}layernorm.bias": vit.norm.bias,
    }
    if distilled:
        state[f"{prefix}embeddings.distillation_token"] = vit.dist_token
    for i, blk in enumerate(vit.blocks):
        layer = f"{prefix}encoder.layer.{i}."
        for kind, tensor in blk.attn.qkv.state_dict().items():  # (3C, C) / (3C,): q, k, v stacked
            for name, part in zip(("query", "key", "value"), tensor.chunk(3)):
                state[f"{layer}attention.attention.{name}.{kind}"] = part
        for key, tensor in blk.state_dict().items():
            saved = next((key.replace(t, s, 1) for t, s in _SAVED if key.startswith(t)), None)
            if saved is not None:
                state[layer + saved] = tensor
    heads = {"head": "cls_classifier" if distilled else "classifier", "head_dist": "distillation_classifier"}
    for attr, name in heads.items():
        head = getattr(vit, attr, None)
        if isinstance(head, nn.Linear):
            state[f"{name}.weight"], state[f"{name}.bias"] = head.weight, head.bias
    labels = vit.head.out_features if isinstance(vit.head, nn.Linear) else 0
    image = vit.patch_embed.img_size
    if image is None or image[0] != image[1]:
        raise ValueError(f"format=hf: transformers' ViT takes square images of a fixed size, not {image}")
    config = dict(
        model_type="deit" if distilled else "vit",
        architectures=["DeiTForImageClassificationWithTeacher" if distilled else
                       "ViTForImageClassification" if labels else "ViTModel"],
        hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=float(vit.norm.eps),
        image_size=int(image[0]), patch_size=int(vit.patch_embed.patch_size[0]), num_channels=3,
        qkv_bias=block.attn.qkv.bias is not None, num_labels=labels)
    return config, {k: v.detach().contiguous().clone() for k, v in state.items()}
