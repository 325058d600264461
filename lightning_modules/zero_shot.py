"""Zero-shot classification with a CLIP model's text tower (`model.zero_shot`).

Each class's weight is the text tower's embedding of its prompts: every template filled with the class name, each
embedding L2-normalised, averaged over the templates and normalised again (CLIP's prompt ensembling). An image's
logits are `logit_scale x <normalised image embedding, class weight>`. The image side is the student's own head -
the visual projection - so the logits come out of the student like a classifier's, and every method, the trace,
MACs, benchmark and export work unchanged: `ZeroShotHead` replaces the projection head by projection -> L2 norm ->
a frozen linear layer of the class weights (the scale folded in).

The text tower comes from where the image tower does: an open_clip model (`open_clip:<arch>[:<tag>]`, or its
state dict as `model.weights`) with open_clip's tokenizer, or a transformers `CLIPModel` (`hf:<dir or id>` holding
the whole model and its tokenizer files). It runs once, on the GPU when there is one, and its class weights are
cached (`$LEANVIT_CACHE`, default `~/.cache/leanvit`, `zero_shot/<hash>.pt`; the hash covers the model, its weights
file, the class names and the templates), so later runs of the same prompts read them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_modules.hub import OPEN_CLIP, PREFIX, read_hub_vit, resolve_folder

ZERO_SHOT_KEYS = ("classnames", "templates", "batch_size")


class ZeroShotHead(nn.Module):
    """`(B, C)` pooled features -> `(B, classes)`: the visual projection, L2 normalisation, then the class weights
    (text embeddings x logit scale) as a frozen bias-free linear layer."""

    def __init__(self, projection: nn.Module, class_weights: Tensor) -> None:
        super().__init__()
        self.projection = projection
        self.classifier = nn.Linear(class_weights.shape[1], class_weights.shape[0], bias=False)
        self.classifier.weight.data.copy_(class_weights)
        self.classifier.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(nn.functional.normalize(self.projection(x), dim=-1))


def read_lines(value: Any, key: str, named: dict[str, Sequence[str]]) -> list[str]:
    """A list, a file with one entry per line, or one of `named`: the class names or the prompt templates."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str) and value in named:
        return list(named[value])
    if isinstance(value, str) and Path(value).expanduser().is_file():
        lines = [line.strip() for line in Path(value).expanduser().read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    choices = ", ".join(named)
    raise ValueError(f"model.zero_shot.{key}: expected a list, a file with one per line, or one of {choices}; "
                     f"got {value!r} (no such file)")


def imagenet_prompts() -> tuple[dict[str, Sequence[str]], dict[str, Sequence[str]]]:
    """The named class lists and template sets open_clip ships (ImageNet's class names, OpenAI's 80 templates and
    the 7-template subset), templates as strings with `{}`."""
    from open_clip import zero_shot_metadata as meta

    def as_text(templates: Sequence[Any]) -> list[str]:
        return [t("{}") if callable(t) else str(t) for t in templates]

    return ({"imagenet": meta.IMAGENET_CLASSNAMES},
            {"openai": as_text(meta.OPENAI_IMAGENET_TEMPLATES), "simple": as_text(meta.SIMPLE_IMAGENET_TEMPLATES)})


def check_zero_shot(zero_shot: dict[str, Any], backbone: str, num_classes: int) -> tuple[list[str], list[str]]:
    """The class names and templates of `model.zero_shot`, checked (one line naming the key)."""
    unknown = sorted(set(zero_shot) - set(ZERO_SHOT_KEYS))
    if unknown:
        raise ValueError(f"model.zero_shot: unknown key(s) {unknown}; expected {', '.join(ZERO_SHOT_KEYS)}")
    if not backbone.startswith((OPEN_CLIP, PREFIX)):
        raise ValueError(f"model.zero_shot: needs a CLIP model with its text tower (open_clip:<arch> or hf:<CLIP "
                         f"model>), not {backbone!r}")
    try:
        named_classes, named_templates = imagenet_prompts()
    except ImportError:  # the lists ship with open_clip; files and lists work without it
        named_classes, named_templates = {}, {}
    classnames = read_lines(zero_shot.get("classnames", "imagenet"), "classnames", named_classes)
    templates = read_lines(zero_shot.get("templates", "openai"), "templates", named_templates)
    if len(classnames) != num_classes:
        raise ValueError(f"model.zero_shot.classnames: {len(classnames)} names for model.num_classes {num_classes}")
    if not templates or any("{}" not in t for t in templates):
        bad = next((t for t in templates if "{}" not in t), None)
        raise ValueError(f"model.zero_shot.templates: every template needs {{}} where the class name goes; got {bad!r}")
    return classnames, templates


def embedding_width(backbone: str) -> int:
    """The width of the image embedding the text is compared with (the visual projection's)."""
    width = read_hub_vit(backbone).num_labels
    if width <= 0:
        raise ValueError(f"model.zero_shot: {backbone} has no visual projection to compare with text; give the whole "
                         f"CLIP model (CLIPModel / CLIPVisionModelWithProjection, or an open_clip model)")
    return width


class TextTower:
    """Text -> (n, D) embeddings, and the model's logit scale."""

    def __init__(self, encode: Any, tokenize: Any, logit_scale: float) -> None:
        self.encode, self.tokenize, self.logit_scale = encode, tokenize, logit_scale


def text_device() -> torch.device:
    """Where the text tower runs: the (first) GPU when there is one; it runs before the trainer places the model."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_clip_text(backbone: str, weights: Optional[str]) -> TextTower:
    import open_clip

    arch, _, tag = backbone[len(OPEN_CLIP):].partition(":")
    if weights is not None:
        from timm.models import clean_state_dict

        from lightning_modules.vit import read_checkpoint_object

        model = open_clip.create_model(arch)
        state = read_checkpoint_object(weights)
        model.load_state_dict(clean_state_dict(state.get("state_dict", state)))  # without DDP's `module.` prefix
    elif tag:
        model = open_clip.create_model(arch, pretrained=tag)
    else:
        raise ValueError(f"model.zero_shot: open_clip:{arch} names no pretrained tag and no model.weights: the text "
                         f"tower would be random")
    model.eval().to(text_device())
    tokenizer = open_clip.get_tokenizer(arch)
    return TextTower(lambda ids: model.encode_text(ids.to(text_device())), tokenizer, float(model.logit_scale.exp()))


def hf_clip_text(backbone: str, weights: Optional[str]) -> TextTower:
    import transformers

    hub = read_hub_vit(backbone, need_weights=weights is None)
    if hub.config.get("model_type") != "clip":
        raise ValueError(f"model.zero_shot: {backbone} is a {hub.config.get('model_type')!r} checkpoint; zero-shot "
                         f"needs the whole CLIP model (model_type clip) with its text tower and tokenizer")
    folder = hub.folder if hub.folder is not None else resolve_folder(hub.source, need_weights=True)
    if weights is None:
        model = transformers.CLIPModel.from_pretrained(folder)
    else:
        from lightning_modules.vit import read_checkpoint_object

        model = transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(folder))
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = read_checkpoint_object(weights)
        missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if k.startswith("text_")]
        if missing:
            raise ValueError(f"model.zero_shot: {weights} has no text tower ({missing[:3]} ...); zero-shot needs the "
                             f"whole CLIPModel's weights")
    model.eval().to(text_device())
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # no tokenizer files beside the weights
        raise ValueError(f"model.zero_shot: no CLIP tokenizer in {folder} ({type(err).__name__}); the folder needs "
                         f"its tokenizer files (vocab.json, merges.txt)") from err
    length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    def tokenize(texts: list[str]) -> Tensor:
        return tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids

    def encode(ids: Tensor) -> Tensor:
        out = model.get_text_features(input_ids=ids.to(text_device()))
        return out if isinstance(out, Tensor) else out.pooler_output

    return TextTower(encode, tokenize, float(model.logit_scale.exp()))


def cache_file(backbone: str, weights: Optional[str], classnames: list[str], templates: list[str]) -> Path:
    """Where the class weights of these prompts on this model are cached: a hash of the backbone, its weights file
    (path, size, modification time) and the prompts."""
    stat: Any = None
    if weights is not None and Path(weights).is_file():
        info = Path(weights).resolve().stat()
        stat = [str(Path(weights).resolve()), info.st_size, info.st_mtime_ns]
    elif backbone.startswith(PREFIX) and Path(backbone[len(PREFIX):]).expanduser().is_dir():  # a local folder
        folder = Path(backbone[len(PREFIX):]).expanduser().resolve()
        stat = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()]
    key = json.dumps([backbone, stat, classnames, templates])
    root = Path(os.environ.get("LEANVIT_CACHE") or Path.home() / ".cache" / "leanvit").expanduser()
    return root / "zero_shot" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def class_weights(backbone: str, weights: Optional[str], classnames: list[str], templates: list[str],
                  batch_size: int = 256) -> Tensor:
    """`(classes, D)`: each class's normalised mean of its normalised prompt embeddings, times the logit scale;
    read from the cache when these prompts ran on this model before, else computed and cached (written atomically:
    a failed write only costs the next run the computation)."""
    path = cache_file(backbone, weights, classnames, templates)
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(cached, Tensor) and cached.shape[0] == len(classnames):
            return cached
    computed = embed_prompts(backbone, weights, classnames, templates, batch_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(computed, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only home: the weights are still used, only not kept
        pass
    return computed


@torch.no_grad()
def embed_prompts(backbone: str, weights: Optional[str], classnames: list[str], templates: list[str],
                  batch_size: int = 256) -> Tensor:
    """The class weights, computed with the text tower (a progress bar when there is more than one batch)."""
    from tqdm.auto import tqdm

    if backbone.startswith(OPEN_CLIP):
        tower = open_clip_text(backbone, weights)
    else:
        if read_hub_vit(backbone).config.get("model_type", "").startswith("siglip"):
            raise ValueError(f"model.zero_shot: {backbone} is a SigLIP model; zero-shot with SigLIP's text tower is "
                             f"not supported yet (open_clip or transformers CLIP models are)")
        tower = hf_clip_text(backbone, weights)
    prompts = [t.replace("{}", name) for name in classnames for t in templates]  # class-major: (classes x T)
    embedded = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="zero-shot class weights", unit="batch",
                      disable=len(prompts) <= batch_size):
        text = tower.encode(tower.tokenize(prompts[start:start + batch_size])).float()
        embedded.append(nn.functional.normalize(text, dim=-1).cpu())
    per_class = torch.cat(embedded).reshape(len(classnames), len(templates), -1).mean(1)  # (classes, D)
    return tower.logit_scale * nn.functional.normalize(per_class, dim=-1)
