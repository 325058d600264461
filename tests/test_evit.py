"""EViT: the reorganisation op by hand, the class-attention row beside fused attention, keep_rate 1 ==
timm, a slow re-derivation of the official block, DeiT-S counts, distilled training, the reduction schedule."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from pytorch_lightning import Callback

from lightning_modules import METHODS
from lightning_modules.evit import EViTBlock, EViTStudent, keep_attentive, kept_tokens
from lightning_modules.layers import ReductionAttention, class_attention
from lightning_modules.schedule import ReductionSchedule

from helpers import FAST, QUICKSTART, VARIANTS, assert_fused_matches_explicit, column, leanvit, metrics, micro_vit

CLS_VARIANTS = {k: v for k, v in VARIANTS.items() if v.get("class_token", True)}


def test_keep_attentive_by_hand() -> None:
    # class token + 5 tokens; keep ceil(0.5 * 5) = 3 by class attention, fuse the other 2
    x = torch.arange(6, dtype=torch.float32).repeat(2, 1)[..., None] * torch.tensor([1.0, 10.0])  # (2, 6, 2)
    cls_attn = torch.tensor([[0.3, 0.1, 0.25, 0.05, 0.2, 0.1],
                             [0.1, 0.4, 0.02, 0.08, 0.2, 0.2]])
    out, dest = keep_attentive(x, cls_attn, 0.5, num_prefix=1, fuse_token=True)
    assert out.shape == (2, 5, 2)
    # image 0: token scores 0.1, 0.25, 0.05, 0.2, 0.1 -> kept tokens 2, 4 and 1 (ties: topk keeps one 0.1)
    assert out[0, :4, 0].tolist()[:3] == [0.0, 2.0, 4.0]
    kept0 = {int(v) for v in out[0, 1:4, 0]}
    fused0 = sum(float(cls_attn[0, t]) * t for t in range(1, 6) if t not in kept0)
    assert out[0, 4, 0].item() == pytest.approx(fused0)  # attention-weighted sum, not renormalised
    # image 1: scores 0.4, 0.02, 0.08, 0.2, 0.2 -> token 1 first, then 4 and 5 (equal), fused 2 and 3
    assert out[1, 1, 0].item() == 1.0 and {out[1, 2, 0].item(), out[1, 3, 0].item()} == {4.0, 5.0}
    assert out[1, 4, 0].item() == pytest.approx(0.02 * 2 + 0.08 * 3)
    assert dest[1].tolist() == [0, 1, 4, 4, dest[1, 4].item(), dest[1, 5].item()]
    assert {dest[1, 4].item(), dest[1, 5].item()} == {2, 3}
    dropped, dest_d = keep_attentive(x, cls_attn, 0.5, num_prefix=1, fuse_token=False)
    assert dropped.shape == (2, 4, 2) and (dest_d[1, 2:4] == -1).all()


def test_keep_rate_one_and_full_counts_are_no_ops() -> None:
    x, attn = torch.randn(2, 9, 4), torch.rand(2, 9)
    assert keep_attentive(x, attn, 1.0)[1] is None
    assert keep_attentive(x, attn, 0.95)[1] is None  # ceil(0.95 * 8) = 8: everything kept
    assert kept_tokens(197, 0.7) == 138 and kept_tokens(140, 0.7) == 98 and kept_tokens(100, 0.7) == 70


def test_prefix_tokens_are_always_kept_in_front() -> None:
    x, attn = torch.randn(3, 12, 4), torch.rand(3, 12)
    attn[:, 1] = 0.0  # the distillation token has the lowest class attention: still kept
    out, dest = keep_attentive(x, attn, 0.3, num_prefix=2)
    torch.testing.assert_close(out[:, :2], x[:, :2])
    assert out.shape[1] == 2 + math.ceil(0.3 * 10) + 1


def test_class_attention_row_equals_the_full_matrix() -> None:
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    full = ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(class_attention(q[:, :, :1], k, 8 ** -0.5), full[:, :, 0].mean(1))


def evit_student(vit: torch.nn.Module, keep_rate: float, layers: tuple[int, ...] = (1, 3, 4), fuse: bool = True,
                 **create: object) -> EViTStudent:
    name = create.pop("name", "vit_micro_patch4_32")
    evit_vit = timm.create_model(name, num_classes=10, block_fn=EViTBlock, attn_layer=ReductionAttention, **create)
    evit_vit.load_state_dict(vit.state_dict())
    return EViTStudent(evit_vit, keep_rate, layers, fuse).eval()


@pytest.mark.parametrize("variant", list(CLS_VARIANTS))
def test_keep_rate_one_equals_dense_timm(variant: str) -> None:
    vit = micro_vit(**VARIANTS[variant])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(evit_student(vit, 1.0, **VARIANTS[variant])(images), vit(images), rtol=0, atol=0)


def test_backbone_without_class_token_is_refused() -> None:
    with pytest.raises(ValueError, match="no class token"):
        evit_student(micro_vit(**VARIANTS["avg_pool_no_class_token"]), 0.7, **VARIANTS["avg_pool_no_class_token"])


@pytest.mark.parametrize("variant", ["plain", "qk_norm", "registers"])
def test_fused_and_explicit_attention_agree(variant: str) -> None:
    student = evit_student(micro_vit(**VARIANTS[variant]), 0.6, **VARIANTS[variant])
    assert_fused_matches_explicit(student, torch.randn(3, 3, 32, 32))


def slow_evit_reference(vit: torch.nn.Module, images: torch.Tensor, keep_rate: float, layers: tuple[int, ...]) -> torch.Tensor:
    """The official block re-derived per image: full attention matrix, `topk` of its class row, the
    complement in ascending order (EViT's `complement_idx`) fused as an attention-weighted sum."""
    heads = vit.blocks[0].attn.num_heads
    logits = []
    for image in images:
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[0]
        for layer, block in enumerate(vit.blocks):
            n = x.shape[0]
            q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)
            attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            x = x + block.ls1(block.attn.proj((attn @ v).transpose(0, 1).reshape(n, -1)))
            left = math.ceil(keep_rate * (n - 1))
            if layer in layers and left < n - 1:
                cls_attn = attn[:, 0, 1:].mean(0)
                idx = torch.topk(cls_attn, left, sorted=True).indices.tolist()
                compl = sorted(set(range(n - 1)) - set(idx))
                fused = sum(x[1 + i] * cls_attn[i] for i in compl)
                x = torch.cat([x[:1], x[1:][idx], fused[None]])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(vit.forward_head(vit.norm(x)[None]))
    return torch.cat(logits)


def test_student_matches_the_slow_reference() -> None:
    vit = micro_vit(init_values=0.5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = slow_evit_reference(vit, images, 0.6, (1, 3, 4))
        got = evit_student(vit, 0.6, init_values=0.5)(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep_rate,counts", [(0.9, (179, 163, 148)), (0.8, (159, 129, 105)), (0.7, (140, 100, 72)),
                                              (0.6, (120, 74, 46)), (0.5, (100, 52, 28))])
def test_deit_small_token_counts(keep_rate: float, counts: tuple[int, int, int]) -> None:
    model = METHODS["evit"](backbone="deit_small_patch16_224", num_classes=1000, keep_rate=keep_rate).eval()
    with torch.no_grad():
        _, trace = model.student(torch.randn(1, 3, 224, 224), trace=True)
    # tokens entering blocks 4, 7, 10 (after the reductions in blocks 3, 6, 9), class token included
    assert (trace.tokens[0, 4].item(), trace.tokens[0, 7].item(), trace.tokens[0, 10].item()) == counts
    assert trace.tokens[0, 3].item() == 197 and trace.mlp_tokens[0, 3].item() == counts[0]


def test_trace_kept_patches_keep_owners_and_fused_share_one() -> None:
    student = evit_student(micro_vit(), 0.5, layers=(2,))
    with torch.no_grad():
        _, trace = student(torch.randn(2, 3, 32, 32), trace=True)
    before, after = trace.owner[2], trace.owner[3]
    kept = math.ceil(0.5 * 64)
    for b in range(2):
        fused_position = 1 + kept
        assert (after[b] == fused_position).sum() == 64 - kept  # every other patch points at the fused token
        assert sorted(after[b][after[b] != fused_position].tolist()) == list(range(1, 1 + kept))
    assert torch.equal(before, torch.arange(1, 65).expand(2, -1))


def test_distilled_deit_trains_with_a_teacher(in_tmp: Path) -> None:
    teacher = timm.create_model("vit_micro_patch4_32", num_classes=10)
    torch.save(teacher.state_dict(), in_tmp / "teacher.pth")
    assert leanvit("fit", QUICKSTART, *FAST, "method=evit", "model.backbone=deit_micro_distilled_patch4_32",
                   "model.keep_rate=0.5", "model.reduction_layers=[0,1]", "model.teacher=vit_micro_patch4_32",
                   f"model.teacher_weights={in_tmp / 'teacher.pth'}", "model.distillation=hard",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.log_every_n_steps=1") == 0
    rows = metrics(in_tmp / "runs" / "digits" / "dense" / "version_0")
    assert column(rows, "train/loss_distill") and column(rows, "val/acc1")
    # 66 tokens -> ceil(0.5 * 64) = 32 kept + fused -> ceil(0.5 * 33) = 17 kept + fused, prefix 2
    assert column(rows, "tokens/layer_1")[-1] == 2 + 32 + 1 and column(rows, "tokens/layer_2")[-1] == 2 + 17 + 1


def adjust_keep_rate(iters: int, epoch: int, warmup_epochs: int, total_epochs: int, iters_per_epoch: int,
                     base_keep_rate: float) -> float:
    """EViT's helpers.adjust_keep_rate, as the official code computes it."""
    if epoch < warmup_epochs:
        return 1.0
    if epoch >= total_epochs:
        return base_keep_rate
    total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
    iters = iters - iters_per_epoch * warmup_epochs
    return base_keep_rate + (1 - base_keep_rate) * (math.cos(iters / total_iters * math.pi) + 1) * 0.5


def test_reduction_schedule_follows_evit_across_a_resume(in_tmp: Path) -> None:
    steps = 5
    common = [QUICKSTART, *FAST, "method=evit", "model.keep_rate=0.5", "model.reduction_layers=[0]",
              "model.reduction_schedule={start_epoch: 1, shrink_epochs: 2}", f"trainer.limit_train_batches={steps}",
              "trainer.log_every_n_steps=1", "model.lr_reference_batch=null"]
    assert leanvit("fit", *common, "trainer.max_epochs=4", "experiment=full") == 0
    logged = column(metrics(in_tmp / "runs" / "full" / "version_0"), "train/keep_rate")
    expected = [adjust_keep_rate(i, i // steps, 1, 3, steps, 0.5) for i in range(4 * steps)]
    assert logged == pytest.approx(expected, abs=1e-6)
    assert min(logged) == 0.5 and logged[0] == 1.0 and 0.5 < logged[2 * steps] < 1.0

    # stop after 2 epochs (mid-schedule), resume to 4: the same keep rates, validation at the last one
    assert leanvit("fit", *common, "trainer.max_epochs=4", "experiment=split", "trainer.max_steps=10") == 0
    assert leanvit("fit", *common, "trainer.max_epochs=4", "experiment=split", "resume=last") == 0
    rows = metrics(in_tmp / "runs" / "split" / "version_0")
    assert column(rows, "train/keep_rate") == pytest.approx(expected, abs=1e-6)
    after_first_block = column(rows, "tokens/layer_1")
    kr_at_epoch_end = [expected[(e + 1) * steps - 1] for e in range(4)]
    assert after_first_block == [1 + math.ceil(kr * 64) + (kr < 1) if kr < 1 else 65 for kr in kr_at_epoch_end]


class KeepRateSchedule(Callback):  # the callback's name then; Lightning's state key comes from the class name
    pass


def test_keep_rate_schedule_is_the_earlier_name_of_reduction_schedule() -> None:
    """Checkpoints written before the rename hold `keep_rate_schedule` in their hyperparameters and the callback's
    state under Lightning's key for a class named KeepRateSchedule: both still load; bad values name the key given."""
    schedule = {"start_epoch": 1, "shrink_epochs": 2}
    old = METHODS["evit"](backbone="vit_micro_patch4_32", reduction_layers=[1], num_classes=10, keep_rate_schedule=schedule)
    new = METHODS["evit"](backbone="vit_micro_patch4_32", reduction_layers=[1], num_classes=10, reduction_schedule=schedule)
    assert old.reduction_schedule == new.reduction_schedule == schedule
    [callback] = old.configure_callbacks()
    assert isinstance(callback, ReductionSchedule)
    assert callback.state_key == KeepRateSchedule()._generate_state_key(**schedule)
    with pytest.raises(ValueError, match="model.keep_rate_schedule: the old name"):
        METHODS["evit"](backbone="vit_micro_patch4_32", reduction_layers=[1], keep_rate_schedule=schedule, reduction_schedule=schedule)
    with pytest.raises(ValueError, match=r"model.keep_rate_schedule.start_epoch: expected epochs >= 0"):
        METHODS["evit"](backbone="vit_micro_patch4_32", reduction_layers=[1], keep_rate_schedule={"start_epoch": -1})
    with pytest.raises(ValueError, match=r"model.reduction_schedule: unknown key\(s\) \['shrink'\]"):
        METHODS["evit"](backbone="vit_micro_patch4_32", reduction_layers=[1], reduction_schedule={"shrink": 1})
    with pytest.raises(ValueError, match="model.reduction_schedule: DenseModule has no reduction to schedule"):
        METHODS["dense"](backbone="vit_micro_patch4_32", reduction_schedule=schedule)


@pytest.mark.slow  # make test trains EViT in the DDP matrix (with its keep-rate schedule); this checks it learns
def test_fit_with_evit_learns(in_tmp: Path) -> None:
    assert leanvit("fit", QUICKSTART, *FAST, "method=evit", "model.keep_rate=0.7", "model.reduction_layers=[0,1]",
                   "trainer.max_epochs=6") == 0
    acc = column(metrics(in_tmp / "runs" / "digits" / "dense" / "version_0"), "val/acc1")
    assert acc[-1] > 30 and acc[-1] > acc[0] + 10
