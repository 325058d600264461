"""`model.backbone: hf:<dir>`: transformers' ViT and DeiT checkpoints as the equal timm model (offline: small random
configs built and saved here), under every method."""
from __future__ import annotations

import json
import math
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
    dino = {k: v for k, v in clip.items() if k not in ("intermediate_size", "projection_dim")} | {"image_size": 48}
    models = {"vit": transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL)),
              "deit": transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SMALL)),
              "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**clip)),
              # DINOv2 pretrained at 48 px (12 x 12 positions), run at 32: transformers resamples at each forward
              "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**dino, layerscale_value=0.5)),
              "dinov2_reg": transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
                  **dino, num_register_tokens=2, layerscale_value=0.5)),
              "dinov2_swiglu": transformers.Dinov2Model(transformers.Dinov2Config(**dino, use_swiglu_ffn=True)),
              "siglip": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**clip))}
    out = {}
    for name, model in models.items():
        with torch.no_grad():  # non-trivial norms and biases (the random init leaves them at 1 and 0)
            for key, value in model.state_dict().items():
                if "norm" in key or key.endswith(("bias", "lambda1", "probe", "_token", "tokens")):
                    value.add_(0.1 * torch.randn_like(value))
        model.save_pretrained(folder / name)
        out[name] = (folder / name, model.eval())
    return out


def build(backbone: str, method: str = "dense", num_classes: int = 10, **settings: Any) -> Any:
    torch.manual_seed(0)
    return METHODS[method](backbone=backbone, num_classes=num_classes, pretrained=True, drop_path_rate=0.0,
                           **settings).student.eval()


@pytest.mark.parametrize("kind", ["vit", "deit", "clip", "dinov2", "dinov2_reg", "dinov2_swiglu", "siglip"])
def test_converted_model_gives_the_transformers_logits(kind: str, checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """ViT: its logits; DeiT with teacher: the mean of both heads, as timm's; CLIP's vision tower with projection:
    its image embeddings (pre-norm, QuickGELU, the projection as the head); DINOv2 (LayerScale, registers, SwiGLU;
    position embeddings resampled from 48 to 32 px as transformers does) and SigLIP (MAP head): `pooler_output`."""
    folder, source = checkpoints[kind]
    pooled = kind.startswith(("dinov2", "siglip"))
    student = build(f"hf:{folder}", img_size=32)
    if pooled:  # an embedding model (no classifier): compare what the new head reads
        student.vit.head = torch.nn.Identity()
    with torch.no_grad():
        out = source(pixel_values=IMAGES)
        expected = out.pooler_output if pooled else out.image_embeds if kind == "clip" else out.logits
        torch.testing.assert_close(student(IMAGES), expected, rtol=0, atol=1e-5)
    prefix = {"deit": 2, "dinov2_reg": 3, "siglip": 0}
    assert student.num_prefix_tokens == prefix.get(kind, 1)


def hf_tome_reference(source: Any, images: torch.Tensor, r: int, prop_attn: bool) -> torch.Tensor:
    """ToMe run through the transformers ViT's own modules (its embeddings, q/k/v/o projections, norms, MLP and
    classifier, no conversion): per image, explicit softmax attention with log(size), the mean key over heads as the
    metric, the official matching by enumeration (`test_tome.brute_force_merge`)."""
    from test_tome import brute_force_merge

    heads, logits = source.config.num_attention_heads, []
    for image in images:
        x = source.vit.embeddings(image[None])[0]  # (N, C)
        size = torch.ones(x.shape[0])
        for layer in source.vit.layers:
            h = layer.layernorm_before(x)
            attn = layer.attention
            q, k, v = (p(h).reshape(x.shape[0], heads, -1).transpose(0, 1) for p in (attn.q_proj, attn.k_proj,
                                                                                     attn.v_proj))  # (H, N, d)
            logit = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (size.log() if prop_attn else 0)
            x = x + attn.o_proj((logit.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1))
            merged, merged_size, _ = brute_force_merge(x[None], k.mean(0)[None], size[None, :, None], r, 1)
            x, size = merged[0], merged_size[0, :, 0]
            x = x + layer.mlp(layer.layernorm_after(x))
        logits.append(source.classifier(source.vit.layernorm(x)[None, 0]))
    return torch.cat(logits)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_on_the_converted_model_equals_tome_on_the_source(prop_attn: bool,
                                                               checkpoints: dict[str, tuple[Path, Any]]) -> None:
    folder, source = checkpoints["vit"]
    student = build(f"hf:{folder}", "tome", r=9, prop_attn=prop_attn)
    with torch.no_grad():
        torch.testing.assert_close(student(IMAGES), hf_tome_reference(source, IMAGES, 9, prop_attn), rtol=0,
                                   atol=1e-5)


def test_weights_file_in_transformers_layout(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """`model.weights=<a transformers model.safetensors>` on the same architecture loads through the conversion."""
    folder, source = checkpoints["vit"]
    torch.manual_seed(0)
    student = METHODS["dense"](backbone=f"hf:{folder}", num_classes=10, weights=str(folder / "model.safetensors"),
                               drop_path_rate=0.0).student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(IMAGES), source(pixel_values=IMAGES).logits, rtol=0, atol=1e-5)


CLASS_TOKEN_METHODS = ("evit", "diffrate")  # rank by the class token's attention: refused without one (SigLIP)


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg", "siglip"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_every_method_runs_on_a_converted_model(method: str, kind: str,
                                                checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """Off: the source's logits (pooled output for DINOv2 with registers, SigLIP) exactly; on: the trace shows a
    reduction. Without a class token (SigLIP), the class-attention methods refuse in one line."""
    folder, source = checkpoints[kind]
    settings = METHODS[method].demo_settings
    if kind == "siglip" and method in CLASS_TOKEN_METHODS:
        with pytest.raises(ValueError, match="has no class token"):
            build(f"hf:{folder}", method, img_size=32, **settings)
        return
    off = build(f"hf:{folder}", method, img_size=32, **(settings | METHODS[method].off_settings))
    on = build(f"hf:{folder}", method, img_size=32, **settings)
    with torch.no_grad():
        out = source(pixel_values=IMAGES)
        if kind != "vit":
            off.vit.head = torch.nn.Identity()
        torch.testing.assert_close(off(IMAGES), out.logits if kind == "vit" else out.pooler_output, rtol=0, atol=1e-5)
        _, trace = on(IMAGES, trace=True)
    assert (trace.tokens[:, -1] < trace.tokens[:, 0]).all() or method == "avit"


def test_other_models_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(ValueError, match="is a 'swin' model; leanvit maps transformers' vit, deit, dinov2, clip"):
        build(f"hf:{tmp_path / 'swin'}")
    refused = {"dinov2_cls": ({"model_type": "dinov2", "architectures": ["Dinov2ForImageClassification"]},
                              "class token and the mean patch token concatenated"),
               "siglip_gap": ({"model_type": "siglip_vision_model", "vision_use_head": False},
                              "no attention-pooling head")}
    for name, (config, message) in refused.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            build(f"hf:{tmp_path / name}")
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
              # open_clip's own tokenizer (OpenAI's BPE, shipped with it) needs its full vocabulary
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
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


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_zero_shot_open_clip_equals_open_clips_own_classifier(micro_clip: tuple[Path, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.zero_shot` with templates from a file: the logits equal open_clip's `build_zero_shot_classifier`
    (prompt ensembling) applied to `encode_image`, times the model's logit scale; ToMe runs on it; the class
    weights are cached per model and prompts."""
    open_clip = pytest.importorskip("open_clip")
    path, model = micro_clip
    templates = ["a photo of the number {}.", "# a comment line", "", "a drawing of a {}."]
    (tmp_path / "templates.txt").write_text("\n".join(templates))
    zero_shot = {"classnames": DIGITS, "templates": str(tmp_path / "templates.txt")}
    torch.manual_seed(0)
    student = METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=10, weights=str(path),
                               zero_shot=zero_shot, drop_path_rate=0.0).student.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, open_clip.get_tokenizer("ViT-micro-leanvit"), DIGITS, [templates[0], templates[3]])  # (D, 10)
        image = torch.nn.functional.normalize(model.encode_image(IMAGES), dim=-1)
        torch.testing.assert_close(student(IMAGES), model.logit_scale.exp() * image @ classifier, rtol=0, atol=1e-5)
        tome = METHODS["tome"](backbone="open_clip:ViT-micro-leanvit", num_classes=10, weights=str(path), r=4,
                               zero_shot=zero_shot, drop_path_rate=0.0).student.eval()
        logits, trace = tome(IMAGES, trace=True)
    assert logits.shape == (2, 10) and trace.tokens[0].tolist() == [65, 61, 57, 53]
    assert student.vit.head.classifier.weight.requires_grad is False  # the text side stays as the prompts give it

    def no_text_tower(*args: Any) -> None:
        raise AssertionError("the cached class weights were computed again")

    from lightning_modules import zero_shot as zs

    with monkeypatch.context() as patch:  # the same prompts on the same model: read from the cache
        patch.setattr(zs, "embed_prompts", no_text_tower)
        torch.manual_seed(0)
        again = METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=10, weights=str(path),
                                 zero_shot=zero_shot, drop_path_rate=0.0).student.eval()
        with pytest.raises(AssertionError, match="computed again"):  # other prompts: computed
            METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=10, weights=str(path),
                             zero_shot=zero_shot | {"templates": ["a {}."]})
    with torch.no_grad():
        torch.testing.assert_close(again(IMAGES), student(IMAGES), rtol=0, atol=0)
    with monkeypatch.context() as patch:  # no weights at all (a benchmark's random model): random class weights
        patch.setattr(zs, "embed_prompts", no_text_tower)
        random = METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=10, zero_shot=zero_shot).student
        assert random.eval()(IMAGES).shape == (2, 10)
    with pytest.raises(ValueError, match="model.zero_shot.classnames: 10 names for model.num_classes 1000"):
        METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", weights=str(path), zero_shot=zero_shot)
    with pytest.raises(ValueError, match="every template needs"):
        METHODS["dense"](backbone="open_clip:ViT-micro-leanvit", num_classes=10, weights=str(path),
                         zero_shot={"classnames": DIGITS, "templates": ["a photo"]})


def test_zero_shot_dynamicvit_teacher_is_the_zero_shot_backbone(micro_clip: tuple[Path, Any]) -> None:
    """DynamicViT's teacher (the backbone itself) classifies with the same text-side class weights: its logits are
    the dense zero-shot model's."""
    path, _ = micro_clip
    zero_shot = {"classnames": DIGITS, "templates": ["a photo of the number {}."]}
    common = dict(backbone="open_clip:ViT-micro-leanvit", num_classes=10, weights=str(path), zero_shot=zero_shot,
                  drop_path_rate=0.0)
    module = METHODS["dynamicvit"](**common, reduction_layers=[1], keep_rate=0.5)
    module.prepare_teacher()
    dense = METHODS["dense"](**common).student.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.teacher(IMAGES), dense(IMAGES), rtol=0, atol=1e-5)


def clip_tokenizer_files(folder: Path) -> None:
    """A CLIP byte-level BPE with no merges (each character a token; 512 + 2 special tokens), saved beside the model
    as transformers saves a tokenizer, so a random CLIPModel has one offline."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    transformers.CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[]).save_pretrained(folder)


def test_zero_shot_hf_clip_equals_its_logits_per_image(tmp_path: Path) -> None:
    """A transformers CLIPModel with its tokenizer: with one template, the zero-shot logits are the model's own
    `logits_per_image` for the class prompts."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=512, eos_token_id=513, pad_token_id=513),
        vision_config={k: v for k, v in SMALL.items() if k != "num_labels"}, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    clip_tokenizer_files(tmp_path)
    prompts = [f"a photo of a {name}." for name in DIGITS]
    student = build(f"hf:{tmp_path}", zero_shot={"classnames": DIGITS, "templates": ["a photo of a {}."]})
    tokens = transformers.CLIPTokenizer.from_pretrained(tmp_path)(prompts, padding="max_length", max_length=32,
                                                                  return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=tokens.input_ids, pixel_values=IMAGES).logits_per_image
        torch.testing.assert_close(student(IMAGES), expected, rtol=0, atol=1e-5)
    assert (expected.std(dim=1) > 1e-3).all()  # the prompts differ: the classes' weights do too


def test_zero_shot_validate_runs_offline(micro_clip: tuple[Path, Any], in_tmp: Path) -> None:
    """`leanvit validate` with ToMe and a zero-shot head on the embedded digits: one command, no download (the
    random model's accuracy means nothing; what it computes is checked above)."""
    from helpers import QUICKSTART, leanvit

    path, _ = micro_clip
    assert leanvit("validate", QUICKSTART, "method=tome", "model.r=4", "model.backbone=open_clip:ViT-micro-leanvit",
                   f"model.weights={path}", f"model.zero_shot.classnames=[{','.join(DIGITS)}]",
                   "model.zero_shot.templates=simple", "trainer.enable_progress_bar=false", "experiment=zs") == 0
    result = json.loads(next((in_tmp / "runs" / "zs").glob("*/results_validate.json")).read_text())
    assert 0 <= result["val/acc1"] <= 100 and result["tokens/layer_3"] == 53  # ToMe r 4: 65, 61, 57, 53


def test_export_format_hf_round_trips_through_transformers(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """`leanvit export ... format=hf` writes a folder transformers loads (ViT; a distilled DeiT as
    DeiTForImageClassificationWithTeacher) with the student's logits, and leanvit reads back as `hf:<folder>`;
    a method other than dense, and a backbone transformers' ViT cannot express, are refused in one line."""
    from experiments.export import ExportRefused, export_hf

    from helpers import FAST, QUICKSTART, leanvit

    out = in_tmp / "micro_hf"
    assert leanvit("export", QUICKSTART, *FAST, "format=hf", "batch_size=2", f"output={out}") == 0
    assert "a transformers checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in in_tmp.iterdir()) == ["micro_hf"]  # no temporary folder left
    model = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    back = build(f"hf:{out}")
    with torch.no_grad():
        torch.testing.assert_close(back(IMAGES), model(pixel_values=IMAGES).logits, rtol=0, atol=1e-5)
    assert type(model).__name__ == "ViTForImageClassification" and len(model.vit.layers) == 2

    torch.manual_seed(0)
    deit = METHODS["dense"](backbone="deit_micro_distilled_patch4_32", num_classes=10, drop_path_rate=0.0)
    export_hf(deit, IMAGES, in_tmp / "deit_hf")
    teacher = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(in_tmp / "deit_hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(pixel_values=IMAGES).logits, deit.student.eval()(IMAGES), rtol=0, atol=1e-5)

    clip = METHODS["dense"](backbone="vit_base_patch16_clip_224", img_size=32, num_classes=10, backbone_kwargs=dict(
        patch_size=4, embed_dim=64, depth=1, num_heads=2))
    with pytest.raises(ExportRefused, match="transformers' ViT / DeiT has no pre-norm, a patch embedding without bias"):
        export_hf(clip, IMAGES, in_tmp / "clip_hf")
    assert not (in_tmp / "clip_hf").exists()
    assert leanvit("export", QUICKSTART, *FAST, "format=hf", "method=tome") == 2
    assert "format: hf writes a dense transformers model" in capsys.readouterr().err
