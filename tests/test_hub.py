"""`model.backbone: hf:<dir>`: transformers' ViT and DeiT checkpoints as the equal timm model (offline: small random
configs built and saved here), under every method."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_modules import METHODS

transformers = pytest.importorskip("transformers")

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, image_size=32,
             patch_size=4, num_labels=10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """A random ViTForImageClassification and DeiTForImageClassificationWithTeacher, saved as transformers does."""
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip = {k: v for k, v in SMALL.items() if k != "num_labels"} | {"projection_dim": 10}
    models = {"vit": transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL)),
              "deit": transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SMALL)),
              "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**clip))}
    out = {}
    for name, model in models.items():
        with torch.no_grad():  # non-trivial norms and biases (the random init leaves them at 1 and 0)
            for key, value in model.state_dict().items():
                if "layernorm" in key or key.endswith("bias"):
                    value.add_(0.1 * torch.randn_like(value))
        model.save_pretrained(folder / name)
        out[name] = (folder / name, model.eval())
    return out


def build(backbone: str, method: str = "dense", **settings: Any) -> Any:
    torch.manual_seed(0)
    return METHODS[method](backbone=backbone, num_classes=10, pretrained=True, drop_path_rate=0.0,
                           **settings).student.eval()


@pytest.mark.parametrize("kind", ["vit", "deit", "clip"])
def test_converted_model_gives_the_transformers_logits(kind: str, checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """ViT: its logits; DeiT with teacher: the mean of both heads, as timm's; CLIP's vision tower with projection:
    its image embeddings (pre-norm, QuickGELU, the projection as the head)."""
    folder, source = checkpoints[kind]
    student = build(f"hf:{folder}")
    with torch.no_grad():
        out = source(pixel_values=IMAGES)
        expected = out.image_embeds if kind == "clip" else out.logits
        torch.testing.assert_close(student(IMAGES), expected, rtol=0, atol=1e-5)
    assert student.num_prefix_tokens == (2 if kind == "deit" else 1)


def test_weights_file_in_transformers_layout(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """`model.weights=<a transformers model.safetensors>` on the same architecture loads through the conversion."""
    folder, source = checkpoints["vit"]
    torch.manual_seed(0)
    student = METHODS["dense"](backbone=f"hf:{folder}", num_classes=10, weights=str(folder / "model.safetensors"),
                               drop_path_rate=0.0).student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(IMAGES), source(pixel_values=IMAGES).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_every_method_runs_on_a_converted_model(method: str, checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """Off: the converted dense logits exactly; on: the trace shows a reduction."""
    folder, source = checkpoints["vit"]
    off = build(f"hf:{folder}", method, **(METHODS[method].demo_settings | METHODS[method].off_settings))
    on = build(f"hf:{folder}", method, **METHODS[method].demo_settings)
    with torch.no_grad():
        torch.testing.assert_close(off(IMAGES), source(pixel_values=IMAGES).logits, rtol=0, atol=1e-5)
        _, trace = on(IMAGES, trace=True)
    assert (trace.tokens[:, -1] < trace.tokens[:, 0]).all() or method == "avit"


def test_other_models_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(ValueError, match="is a 'swin' model; leanvit maps transformers' vit, deit and clip"):
        build(f"hf:{tmp_path / 'swin'}")
    with pytest.raises(ValueError, match="neither a local directory nor a hub model"):
        build("hf:nobody/no-such-model")


@pytest.fixture(scope="module")
def micro_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A random open_clip model of a micro config registered here (ViT tower 32 px, patch 4, width 64, QuickGELU),
    its state dict saved as open_clip saves it."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip")
    config = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 4, "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (folder / "ViT-micro-leanvit.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder / "ViT-micro-leanvit.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-micro-leanvit").eval()
    with torch.no_grad():
        for key, value in model.visual.state_dict().items():
            if "ln_" in key or key.endswith("bias"):
                value.add_(0.1 * torch.randn_like(value))
    torch.save(model.state_dict(), folder / "clip.pt")
    return folder / "clip.pt", model


def test_open_clip_tower_gives_its_image_embeddings(micro_clip: tuple[Path, Any]) -> None:
    """`open_clip:<arch>` with model.weights=<its state dict>: the student's output is `encode_image` exactly (the
    projection as the head), QuickGELU and pre-norm included; every method runs on it."""
    path, model = micro_clip
    torch.manual_seed(0)
    student = METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=32, weights=str(path),
                               drop_path_rate=0.0).student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(IMAGES), model.encode_image(IMAGES), rtol=0, atol=1e-5)
        tome = METHODS["tome"](backbone="open_clip:ViT-micro-leanvit", num_classes=32, weights=str(path), r=4,
                               drop_path_rate=0.0).student.eval()
        _, trace = tome(IMAGES, trace=True)
    assert trace.tokens[0].tolist() == [65, 61, 57, 53]
    with pytest.raises(ValueError, match="names no pretrained tag"):
        METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=32, pretrained=True)
