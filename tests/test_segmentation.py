"""`task: segmentation`: every method's student under Segmenter's decode heads, its loss terms beside the per-pixel
cross-entropy, mIoU / pixel accuracy, sliding-window inference, and the data (canvas label maps, ADE20K layout)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules import DATAMODULES
from datamodules.embedded import CANVAS_DIGIT, STROKE_LEVEL, EmbeddedDataModule, load_digits_px
from datamodules.imagenet import DataError
from datamodules.segmentation import IGNORE_INDEX, crop_box, rescale_size
from lightning_modules import METHODS, module_class
from lightning_modules.segmentation import LinearDecoder, MaskTransformer, sliding_window, window_starts

from helpers import check_success, leanvit, leanvit_subprocess, metrics, weights

REPO = Path(__file__).resolve().parents[1]
SEG_DENSE = str(REPO / "experiments" / "canvas_seg" / "dense_scratch.yaml")
QUICK = ["model.backbone_kwargs.depth=3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "trainer.num_sanity_val_steps=0", "trainer.limit_train_batches=4", "trainer.limit_val_batches=3",
         "trainer.accelerator=cpu", "callbacks.throughput.batch_size=8", "callbacks.throughput.repeats=1",
         "callbacks.throughput.warmup=1"]
# what a method's segmentation run cannot take from its classification recipe (MCTF's branch trains on image labels)
NO_IMAGE_LABELS = {"mctf": {"teacher_weight": 0.0, "consistency_weight": 0.0},
                   "dynamicvit": {"kl_weight": 0.0, "distill_weight": 0.0}}
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 11, (2, 32, 32), generator=torch.Generator().manual_seed(1))


def seg_module(name: str, **settings: Any) -> Any:
    torch.manual_seed(0)
    kwargs = dict(backbone="vit_micro_patch4_32", num_classes=11, backbone_kwargs=dict(depth=3), drop_path_rate=0.0,
                  head_dropout=0.0)
    return module_class(name, "segmentation")(**(kwargs | METHODS[name].demo_settings | NO_IMAGE_LABELS.get(name, {})
                                                  | settings))


# ------------------------------------------------------------------------------------------------ heads
def test_linear_head_is_a_per_patch_classifier() -> None:
    head = LinearDecoder(64, 11)
    x = torch.randn(2, 12, 64)
    out = head(x, (3, 4))
    assert out.shape == (2, 11, 3, 4)
    torch.testing.assert_close(out[1, :, 2, 1], head.head(x[1, 2 * 4 + 1]))  # patch (row 2, col 1) in row-major order


def test_mask_transformer_is_segmenters() -> None:
    """The decoder written out: the projected patches and class embeddings through the blocks, the L2-normalised
    projections' scalar products, a LayerNorm over classes."""
    torch.manual_seed(0)
    head = MaskTransformer(64, 5, layers=2, dropout=0.0).eval()
    x = torch.randn(2, 6, 64)
    tokens = torch.cat([x @ head.proj_dec.weight.T + head.proj_dec.bias, head.cls_emb.expand(2, -1, -1)], 1)
    for block in head.blocks:  # Segmenter's Block: pre-norm (torch's LayerNorm, eps 1e-5), attention, GELU MLP
        h = F.layer_norm(tokens, (64,), block.norm1.weight, block.norm1.bias, eps=1e-5)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)  # one head (64 / 64)
        attn = (q @ k.transpose(1, 2) / 8.0).softmax(-1)
        tokens = tokens + (attn @ v) @ block.attn.proj.weight.T + block.attn.proj.bias
        h = F.layer_norm(tokens, (64,), block.norm2.weight, block.norm2.bias, eps=1e-5)
        tokens = tokens + F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    tokens = F.layer_norm(tokens, (64,), head.decoder_norm.weight, head.decoder_norm.bias)
    patches, classes = tokens[:, :6] @ head.proj_patch, tokens[:, 6:] @ head.proj_classes
    scores = torch.einsum("bnc,bkc->bnk", patches / patches.norm(dim=-1, keepdim=True),
                          classes / classes.norm(dim=-1, keepdim=True))
    mean, var = scores.mean(-1, keepdim=True), scores.var(-1, unbiased=False, keepdim=True)
    expected = (scores - mean) / torch.sqrt(var + 1e-5) * head.mask_norm.weight + head.mask_norm.bias  # (B, N, K)
    with torch.no_grad():
        torch.testing.assert_close(head(x, (2, 3)), expected.detach().transpose(1, 2).reshape(2, 5, 2, 3), rtol=1e-4,
                                   atol=1e-4)
    assert head.macs(6) > 0 and len(head.blocks) == 2 and head.blocks[0].attn.num_heads == 1  # 64 / 64 heads


# ------------------------------------------------------------------------------------------------ inference
def test_window_starts_are_segmenters() -> None:
    assert window_starts(512, 512, 512) == [0]
    assert window_starts(300, 512, 512) == [0]
    assert window_starts(1000, 512, 512) == [0, 488]  # the last window ends at the edge
    assert window_starts(1200, 512, 341) == [0, 341, 682, 688]
    for size, window, stride in ((40, 16, 12), (1000, 512, 512), (777, 128, 100), (512, 512, 256)):
        # Segmenter's rule: the anchors arange(0, H, stride) below H - window, then H - window
        anchors = [a for a in range(0, size, stride) if a < size - window] + [size - window]
        assert window_starts(size, window, stride) == anchors


def test_sliding_window_averages_overlaps_and_covers_every_pixel() -> None:
    """A forward that returns its crop's pixels as scores gives back the image: every pixel covered, overlapping
    windows averaged (they agree); an image shorter than the window is padded, then cut back."""
    images = torch.randn(2, 3, 40, 23)
    out = sliding_window(lambda crop: crop, images, window=16, stride=12, num_classes=3)
    torch.testing.assert_close(out, images)
    calls: list[tuple[int, int]] = []
    sliding_window(lambda crop: calls.append(crop.shape[-2:]) or crop, images, window=16, stride=12, num_classes=3)
    assert len(calls) == len(window_starts(40, 16, 12)) * len(window_starts(23, 16, 12)) == 3 * 2  # 0/12/24, 0/7


# ------------------------------------------------------------------------------------------------ module
def test_dense_segmentation_is_the_head_on_timms_patch_tokens() -> None:
    module = seg_module("dense").eval()
    with torch.no_grad():
        patches = module.student.vit.forward_features(IMAGES)[:, 1:]  # (B, 64, C): timm's final-norm patch tokens
        expected = F.interpolate(module.decode_head(patches, (8, 8)), size=(32, 32), mode="bilinear")
        torch.testing.assert_close(module(IMAGES), expected, rtol=0, atol=1e-6)
        scores, traces = module.predict_scores(IMAGES)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_as_a_segmentation_encoder(name: str) -> None:
    """`seg` plus the method's own terms; gradients reach the decode head and the encoder; the pass reduced."""
    module = seg_module(name).train()
    terms = module.loss_terms(IMAGES, LABELS)
    assert set(terms) == {"seg", *module_own_terms(name)}
    weights = module.loss_weights()
    loss = sum(weights[k] * v for k, v in terms.items())
    loss.backward()
    assert module.decode_head.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert module.student.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    expected = F.cross_entropy(F.interpolate(module.decode_head(module.student.run(IMAGES, train=True, dense=True)
                                             .dense, (8, 8)), size=(32, 32), mode="bilinear"), LABELS)
    if name not in ("dynamicvit", "avit", "diffrate", "mctf"):  # no random training draws: the same pass again
        torch.testing.assert_close(terms["seg"], expected)
    module.eval()
    with torch.no_grad():
        scores, traces = module.predict_scores(IMAGES)
    assert scores.shape == (2, 11, 32, 32)
    if name != "dense":
        assert (traces[0].tokens[:, -1] < traces[0].tokens[:, 0]).all() or name == "avit"


def module_own_terms(name: str) -> set[str]:
    return {"dynamicvit": {"ratio"}, "avit": {"ponder", "prior"}}.get(name, set())


def test_metrics_are_mmsegs_miou_and_pixel_accuracy() -> None:
    """val/miou: IoU per class over every pixel seen, averaged over the classes present in labels or predictions
    (ignore index out); val/pixel_acc: correct labelled pixels - against counts by hand."""
    module = seg_module("dense")
    preds = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    target = torch.tensor([[0, 1, 1, 1], [2, 2, IGNORE_INDEX, 3]])
    module.miou["val"].update(preds, target)
    module.pixel_acc["val"].update(preds, target)
    # class 0: inter 1, union 3 (pred {0,1,7}, label {0}); 1: 2 / 3; 2: 2 / 2; 3: 0 / 1; classes 4..10 absent
    assert float(module.miou["val"].compute()) == pytest.approx((1 / 3 + 2 / 3 + 1 + 0) / 4)
    assert float(module.pixel_acc["val"].compute()) == pytest.approx(5 / 7)


def test_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="model.teacher_weight: MCTF's teacher branch"):
        module_class("mctf", "segmentation")(backbone="vit_micro_patch4_32", num_classes=11, r=4)
    with pytest.raises(ValueError, match="model.distillation"):
        module_class("dense", "segmentation")(backbone="vit_micro_patch4_32", num_classes=11, distillation="hard",
                                              teacher="vit_micro_patch4_32")
    with pytest.raises(ValueError, match="model.inference"):
        seg_module("dense", inference="tiles")
    with pytest.raises(ValueError, match="model.zero_shot: .* is for image classification"):
        seg_module("dense", zero_shot={"classnames": "imagenet"})


def save_seg_checkpoint(module: Any, path: Path) -> Path:
    torch.save({"pytorch-lightning_version": "2", "state_dict": module.state_dict()}, path)
    return path


def test_weights_restore_the_encoder_and_the_decode_head(tmp_path: Path) -> None:
    dense = seg_module("dense")
    path = save_seg_checkpoint(dense, tmp_path / "dense.ckpt")
    tome = seg_module("tome", weights=str(path), r=0)
    torch.testing.assert_close(tome.decode_head.cls_emb, dense.decode_head.cls_emb)
    with torch.no_grad():
        torch.testing.assert_close(tome.eval()(IMAGES), dense.eval()(IMAGES), rtol=0, atol=1e-5)


def test_dynamicvit_teacher_is_the_dense_segmentation_model(tmp_path: Path) -> None:
    """kl: KL(teacher || student) of the patch-level class scores over every patch; distill: the MSE of the kept
    patches' features to the dense segmentation model's - against the two models run by hand."""
    dense = seg_module("dense").eval()
    path = save_seg_checkpoint(dense, tmp_path / "dense.ckpt")
    module = seg_module("dynamicvit", weights=str(path), kl_weight=0.5, distill_weight=0.5).eval()  # no dropout
    module.prepare_teacher()
    torch.manual_seed(5)
    terms = module.loss_terms(IMAGES, LABELS)
    torch.manual_seed(5)  # the same Gumbel draws
    out = module.student.run(IMAGES, train=True, dense=True)
    with torch.no_grad():
        teacher_features = dense.student.forward_dense(IMAGES)  # (B, 64, C)
        teacher = dense.decode_head(teacher_features, (8, 8)).permute(0, 2, 3, 1).reshape(-1, 11)
    student = module.decode_head(out.dense, (8, 8)).permute(0, 2, 3, 1).reshape(-1, 11)  # (B x 64, K)
    kl = (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1).mean()
    kept = out.loss_inputs.decisions[-1].bool()  # (B, 64) patches kept after the last stage
    distill = (out.loss_inputs.tokens[kept] - teacher_features[kept]).pow(2).mean()
    torch.testing.assert_close(terms["kl"], kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["distill"], distill, rtol=1e-5, atol=1e-7)
    assert float(kl) > 0 and not kept.all()
    torch.save(dense.student.vit.state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="no decode head"):
        seg_module("dynamicvit", weights=str(tmp_path / "backbone.pth"), kl_weight=0.5).prepare_teacher()


# ------------------------------------------------------------------------------------------------ data
def test_canvas_label_maps_are_the_digit_strokes() -> None:
    data = EmbeddedDataModule(dataset="digits_canvas_seg", mean=(0.5,) * 3, std=(0.5,) * 3)
    data.setup("fit")
    assert data.classes[0] == "background" and len(data.classes) == 11
    image, label = data.datasets["val"][0]
    digits, classes = load_digits_px(CANVAS_DIGIT)
    ink = image[0] * 0.5 + 0.5  # (32, 32) back to 0..1
    assert set(label.unique().tolist()) <= {0, int(label.max())} and int(label.max()) >= 1
    assert torch.equal(label > 0, ink >= STROKE_LEVEL / 255 - 1e-6)  # stroke where the ink is, nothing else
    train = data.datasets["train"]
    first, again, other = train[(0, 5, 0)], train[(0, 5, 0)], train[(1, 5, 0)]
    assert torch.equal(first[1], again[1])  # a sample is a function of (seed, epoch, index)
    assert not torch.equal(first[1], other[1]) or not torch.equal(first[0], other[0])
    assert digits.shape[1:] == (16, 16) and classes.max() == 9


def write_ade(root: Path, sizes: dict[str, list[tuple[int, int]]], names: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for split, shapes in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            label = rng.integers(0, 4, (h, w), dtype=np.uint8)
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_{i}.png")
    if names:
        rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i + 1}\t0.1\t1\t1\tclass{i};other" for i in range(150)]
        (root / "objectInfo150.txt").write_text("\n".join(rows))
    return root


def test_ade20k_layout_labels_and_pipeline(tmp_path: Path) -> None:
    root = write_ade(tmp_path / "ade", {"training": [(60, 90), (40, 30)], "validation": [(50, 70), (48, 48)]})
    data = DATAMODULES["ade20k"](root=str(root), img_size=32, base_size=128, batch_size=2, num_workers=0)
    data.setup("fit")
    assert len(data.classes) == 150 and data.classes[:2] == ["class0", "class1"]
    raw = np.asarray(Image.open(root / "annotations" / "validation" / "ADE_0.png")).astype(np.int64)
    image, label = data.datasets["val"][0]
    expected = np.where(raw == 0, IGNORE_INDEX, raw - 1)  # mmseg's reduce_zero_label
    assert torch.equal(label, torch.from_numpy(expected))
    assert image.shape == (3, 32, 45)  # shorter side to img_size, ratio kept (50 x 70 -> 32 x 44.8)
    photo = Image.open(root / "images" / "validation" / "ADE_0.jpg")
    assert data.image_transform()(photo).shape == (3, 32, 32)  # visualize: shorter side, centre crop
    for epoch in range(3):
        x, y = data.datasets["train"][(epoch, 1, 0)]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)  # cropped or padded to the crop
        assert y.dtype == torch.long and set(y.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    x1, y1 = data.datasets["train"][(0, 0, 0)]
    x2, y2 = data.datasets["train"][(0, 0, 0)]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(DataError, match="eval_batch_size"):
        next(iter(DATAMODULES["ade20k"](root=str(root), img_size=32, base_size=128, eval_batch_size=2,
                                        num_workers=0).val_dataloader()))


def test_crop_box_and_rescale_are_mmsegs() -> None:
    assert rescale_size(375, 500, 2048, 512) == (512, 683)  # the short side reaches 512 first
    assert rescale_size(100, 3000, 1024, 256) == (34, 1024)  # the long side reaches its limit first
    torch.manual_seed(0)
    one_class = torch.zeros(64, 64, dtype=torch.long)
    one_class[:, 60:] = 1  # a crop is almost always > 75 % class 0: every try is used, any box is valid
    top, left, h, w = crop_box(one_class, 32, 0.75)
    assert (h, w) == (32, 32) and 0 <= top <= 32 and 0 <= left <= 32
    assert crop_box(torch.zeros(20, 50, dtype=torch.long), 32, 1.0)[2:] == (20, 32)  # shorter side kept whole


def test_bad_ade20k_inputs_are_named(tmp_path: Path) -> None:
    root = write_ade(tmp_path / "ade", {"training": [(40, 40)], "validation": [(40, 40)]}, names=False)
    (root / "annotations" / "training" / "ADE_0.png").unlink()
    data = DATAMODULES["ade20k"](root=str(root), img_size=32, num_workers=0)
    with pytest.raises(DataError, match="ADE_0.png"):
        data.setup("fit")
    with pytest.raises(FileNotFoundError, match="data.root"):
        DATAMODULES["ade20k"](root=str(tmp_path / "nowhere"), img_size=32).setup("fit")
    with pytest.raises(DataError, match="data.scale_range"):
        DATAMODULES["ade20k"](root=str(root), img_size=32, scale_range=(2.0, 0.5))


# ------------------------------------------------------------------------------------------------ CLI
def assert_same_final_weights(straight: Path, resumed: Path) -> None:
    """The two runs' last checkpoints hold the same weights, bit for bit."""
    expected, got = weights(straight), weights(resumed)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_fit_logs_miou_and_resumes_exactly(in_tmp: Path) -> None:
    """A segmentation run logs val/miou and val/pixel_acc; stopped after its first epoch (max_steps) and resumed it
    ends with the weights of an uninterrupted run (the canvas positions are drawn per (seed, epoch, sample)). The
    mid-epoch kill tests (test_long_runs.py) cover the shared sampler and loader state."""
    args = ["fit", SEG_DENSE, *QUICK, "callbacks.throughput=false", "trainer.max_epochs=2"]
    assert leanvit(*args, "version=straight") == 0
    assert leanvit(*args, "trainer.max_steps=4", "version=stopped") == 0  # the end of epoch 0 (4 batches)
    assert leanvit(*args, "trainer.max_steps=-1", "resume=runs/canvas_seg/dense_scratch/stopped") == 0
    assert_same_final_weights(in_tmp / "runs/canvas_seg/dense_scratch/straight", in_tmp / "runs/canvas_seg/dense_scratch/stopped")
    rows = metrics(in_tmp / "runs/canvas_seg/dense_scratch/straight")
    assert any(r.get("val/miou") for r in rows) and any(r.get("val/pixel_acc") for r in rows)
    result = json.loads((in_tmp / "runs/canvas_seg/dense_scratch/straight/results_fit.json").read_text())
    assert 0 <= result["val/miou"] <= 100 and result["val/gmacs"] > 0
    from experiments.report import summarise_run, write_report

    assert summarise_run(in_tmp / "runs/canvas_seg/dense_scratch/straight").acc1 == result["val/miou"]
    report = write_report([in_tmp / "runs/canvas_seg/dense_scratch/straight"], in_tmp / "report")
    assert "| mIoU (%) |" in report[2].read_text()  # `leanvit report` puts a segmentation run's mIoU on its axis


def test_ade20k_fit_validates_and_resumes_exactly(in_tmp: Path) -> None:
    """The ADE20K DataModule end to end on a small folder in its layout: fit, validate with sliding windows over
    resized images of other sizes, and an epoch-boundary resume that ends with the uninterrupted run's weights."""
    root = write_ade(in_tmp / "ade", {"training": [(48, 64), (40, 40), (64, 36), (50, 50)],
                                      "validation": [(40, 56), (36, 36)]})
    args = ["fit", SEG_DENSE, *QUICK, "callbacks.throughput=false", "datamodule=ade20k", "data.dataset=null",
            f"data.root={root}", "data.img_size=32", "data.base_size=128", "data.batch_size=2", "data.num_workers=0",
            "model.num_classes=150", "model.inference=slide", "model.slide_stride=16", "trainer.max_epochs=2"]
    assert leanvit(*args, "version=straight") == 0
    assert leanvit(*args, "trainer.max_steps=2", "version=stopped") == 0  # the end of epoch 0 (2 batches)
    assert leanvit(*args, "trainer.max_steps=-1", "resume=runs/canvas_seg/dense_scratch/stopped") == 0
    assert_same_final_weights(in_tmp / "runs/canvas_seg/dense_scratch/straight", in_tmp / "runs/canvas_seg/dense_scratch/stopped")
    result = json.loads((in_tmp / "runs/canvas_seg/dense_scratch/straight/results_fit.json").read_text())
    assert 0 <= result["val/miou"] <= 100 and 0 <= result["val/pixel_acc"] <= 100


def test_task_and_data_must_agree(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert leanvit("fit", SEG_DENSE, *QUICK, "data.dataset=digits_canvas") == 2
    assert "task: segmentation needs a DataModule with label maps" in capsys.readouterr().err
    digits = str(REPO / "experiments" / "digits" / "dense.yaml")
    assert leanvit("fit", digits, *QUICK, "data.dataset=digits_canvas_seg", "model.num_classes=11") == 2
    assert "set task: segmentation" in capsys.readouterr().err
    assert leanvit("fit", SEG_DENSE, *QUICK, "task=classification") == 2  # the head's keys are segmentation's
    assert "model.decode_head: unknown key" in capsys.readouterr().err
    assert leanvit("fit", SEG_DENSE, *QUICK, "task=detection") == 2
    assert "task: unknown task 'detection'" in capsys.readouterr().err


def test_ddp_segmentation_matches_single_process_validation(tmp_path: Path) -> None:
    """2-process DDP fit of DynamicViT as a segmentation encoder (its masks, ratio loss, the dense segmentation
    teacher, its keep-rate schedule): the gathered val/miou equals a single-process validate of the checkpoint."""
    dense = seg_module("dense")
    teacher = save_seg_checkpoint(dense, tmp_path / "dense.ckpt")
    recipe = ["method=dynamicvit", "model.keep_rate=0.6", "model.reduction_layers=[1]", f"model.weights={teacher}",
              "model.backbone_freeze_epochs=0", "trainer.max_epochs=1", "callbacks.throughput=false",
              "model.reduction_schedule={start_epoch: 0, shrink_epochs: 0.5}", "experiment=seg_ddp"]  # done by the end
    quick = [a for a in QUICK if not a.startswith("trainer.limit_val_batches")]  # every rank sees its whole share
    fit = leanvit_subprocess("fit", SEG_DENSE, *quick, *recipe, "trainer.devices=2", "trainer.strategy=ddp",
                             cwd=tmp_path)
    check_success(fit)
    run = tmp_path / "runs" / "seg_ddp" / "version_0"
    fitted = json.loads((run / "results_fit.json").read_text())
    single = leanvit_subprocess("validate", SEG_DENSE, *quick, *recipe, "experiment=seg_single",
                                f"model.weights={run / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    check_success(single)
    result = json.loads(next((tmp_path / "runs" / "seg_single").glob("*/results_validate.json")).read_text())
    assert fitted["val/miou"] == pytest.approx(result["val/miou"], abs=1e-4)
    assert fitted["val/pixel_acc"] == pytest.approx(result["val/pixel_acc"], abs=1e-4)



def test_token_maps_and_visualize_show_the_predicted_mask(in_tmp: Path) -> None:
    """The figure gains a "predicted mask" panel drawn from the module's prediction; `leanvit visualize` on a
    segmentation config writes it for any image."""
    from callbacks.token_maps import save_figures

    module = seg_module("tome").eval()
    paths = save_figures(module.student, IMAGES, in_tmp / "maps", ["a", "b"], (0.5,) * 3, (0.5,) * 3, module=module)
    plain = save_figures(module.student, IMAGES, in_tmp / "plain", ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    wide, narrow = Image.open(paths[0]).size[0], Image.open(plain[0]).size[0]
    assert wide > narrow  # one panel more
    masks = module.predict_masks(IMAGES)
    assert masks.shape == (2, 32, 32) and torch.equal(masks, module.predict_scores(IMAGES)[0].argmax(1))
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).uniform(0, 255, (40, 40, 3))).astype(np.uint8)).save(in_tmp / f"{i}.png")
    assert leanvit("visualize", str(REPO / "experiments" / "canvas_seg" / "tome.yaml"), "model.weights=null",
                   f"images={in_tmp}/*.png", f"out={in_tmp / 'vis'}") == 0
    assert sorted(p.name for p in (in_tmp / "vis").iterdir()) == ["0.png", "1.png"]


def test_a_segmentation_model_exports_with_its_head(in_tmp: Path) -> None:
    """`leanvit export` of a segmentation config writes images -> per-pixel scores (the dense-output gathers and the
    mask transformer included), kept only once ONNX Runtime's scores equal the eager model's."""
    pytest.importorskip("onnxruntime")
    from experiments.export import read_metadata, run_exported

    out = in_tmp / "tome_seg.onnx"
    assert leanvit("export", str(REPO / "experiments" / "canvas_seg" / "tome.yaml"), "model.weights=null",
                   "model.backbone_kwargs.depth=3", "format=onnx", "batch_size=2", f"output={out}") == 0
    assert read_metadata(out)["leanvit.method"] == "tome"
    scores = run_exported(out, "onnx", IMAGES)
    assert scores.shape == (2, 11, 32, 32)  # kept only because it equalled the eager scores (export's own check)
