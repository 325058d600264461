"""DynamicViT: the predictor and policy softmax by hand, kept counts, the four loss terms by hand,
gradients through Gumbel, no leak from dropped tokens, rho = 1 == timm, official checkpoints, training."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_modules import METHODS
from lightning_modules.dynamicvit import PredictorLG, keep_ratios, kept_token_mse, policy_softmax, pruning_ratio_loss

from helpers import FAST, QUICKSTART, column, leanvit, metrics


def micro_module(**kwargs: object) -> torch.nn.Module:
    settings = dict(backbone="vit_micro_patch4_32", num_classes=10, reduction_layers=[1, 3, 4], lr_reference_batch=None)
    return METHODS["dynamicvit"](**(settings | kwargs))


def test_predictor_shapes_and_masked_global_mean() -> None:
    torch.manual_seed(0)
    predictor = PredictorLG(8)
    x = torch.randn(2, 5, 8)
    policy = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)[..., None]
    out = predictor(x, policy)
    assert out.shape == (2, 5, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 5))  # log-probabilities
    h = predictor.in_conv(x)
    for b in range(2):
        kept = [i for i in range(5) if policy[b, i, 0] == 1]
        global_part = h[b, kept, 4:].mean(0)  # mean of the second half over kept tokens only
        for i in range(5):
            expected = predictor.out_conv(torch.cat([h[b, i, :4], global_part]))
            torch.testing.assert_close(out[b, i], expected)


def slow_policy_softmax(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.empty_like(logits)
    n = logits.shape[-1]
    for b in range(logits.shape[0]):
        for h in range(logits.shape[1]):
            for i in range(n):
                row = logits[b, h, i]
                gate = [1.0 if j == i else float(policy[b, j]) for j in range(n)]
                e = [math.exp(float(row[j] - row.max())) * gate[j] for j in range(n)]
                total = sum(e)
                out[b, h, i] = torch.tensor([(e[j] + eps / n) / (total + eps) for j in range(n)])
    return out


def test_policy_softmax_against_a_slow_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6) * 3
    policy = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.float32)
    got = policy_softmax(logits, policy)
    torch.testing.assert_close(got, slow_policy_softmax(logits, policy), rtol=1e-5, atol=1e-7)
    # a dropped token's row: only the kept tokens and itself (the identity term), the rest eps / N
    assert (got[1, :, 2, [1, 3, 4]] < 1e-6).all() and (got[1, :, 2, [0, 2, 5]].sum(-1) > 1 - 1e-5).all()
    # with every token kept it is the plain softmax up to eps
    torch.testing.assert_close(policy_softmax(logits, torch.ones(2, 6)), logits.softmax(-1), rtol=1e-4, atol=1e-5)


# 160 px: 100 patches; 100 * 0.7 ** 2 is 48.999... in floating point, so int() keeps 48, as the official code does
@pytest.mark.parametrize("img_size,counts", [(224, (137, 96, 67)), (160, (70, 48, 34))])
def test_kept_counts(img_size: int, counts: tuple[int, int, int]) -> None:
    module = METHODS["dynamicvit"](backbone="deit_small_patch16_224", img_size=img_size, keep_rate=0.7).eval()
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, img_size, img_size), trace=True)
    n0 = (img_size // 16) ** 2
    assert [int(n0 * r) for r in keep_ratios(0.7, 3)] == list(counts)
    assert (trace.tokens[0, 3].item(), trace.tokens[0, 6].item(), trace.tokens[0, 9].item()) == tuple(c + 1 for c in counts)
    assert trace.tokens[0, 2].item() == n0 + 1
    # pruned patches become -1 entering the block whose predictor dropped them
    assert (trace.owner[3][0] == -1).sum() == n0 - counts[0] and (trace.owner[2][0] == -1).sum() == 0


def test_rho_one_equals_dense_timm() -> None:
    module = micro_module(keep_rate=1.0).eval()
    dense = timm.create_model("vit_micro_patch4_32", num_classes=10).eval()
    dense.load_state_dict(module.student.vit.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(images), dense(images), rtol=1e-5, atol=1e-5)  # token order permuted


def test_loss_terms_by_hand() -> None:
    decisions = [torch.tensor([[1.0, 1, 0, 1], [1, 0, 0, 0]]), torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]])]
    # stage 1: fractions .75, .25 vs .5 -> (.0625 + .0625) / 2; stage 2: .5, 0 vs .25 -> (.0625 + .0625) / 2
    assert pruning_ratio_loss(decisions, [0.5, 0.25]).item() == pytest.approx(0.0625)
    student, teacher = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    student[0, 0] = 1.0  # kept and equal: contributes 0
    mse = kept_token_mse(student, teacher, decisions[1])
    assert mse.item() == pytest.approx((0 + 3) / (2 * 3))  # kept rows: (0,0) and (0,3), 3 channels each
    assert kept_token_mse(student, teacher, torch.zeros(2, 4)).item() == 0.0

    module = micro_module(teacher_weights=None, kl_weight=0.5, distill_weight=0.5)
    module.teacher = timm.create_model("vit_micro_patch4_32", num_classes=10).eval().requires_grad_(False)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(3)
    terms = module.loss_terms(images, targets)
    torch.manual_seed(3)
    out = module.student.run(images, train=True)
    t_logits = module.teacher(images)
    t_tokens = module.teacher.forward_features(images)[:, 1:]
    kl = sum((F.softmax(t_logits, -1) * (F.log_softmax(t_logits, -1) - F.log_softmax(out.logits, -1))).sum(-1)) / 4
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["cls"], F.cross_entropy(out.logits, targets, label_smoothing=0.1))
    torch.testing.assert_close(terms["distill"], kept_token_mse(out.loss_inputs.tokens, t_tokens, out.loss_inputs.decisions[-1]))
    torch.testing.assert_close(terms["ratio"], pruning_ratio_loss(out.loss_inputs.decisions, keep_ratios(0.7, 3)))
    assert module.loss_weights() == {"cls": 1.0, "ratio": 2.0, "kl": 0.5, "distill": 0.5}


def test_gradients_reach_the_predictors_through_gumbel() -> None:
    module = micro_module(kl_weight=0.0, distill_weight=0.0).train()
    terms = module.loss_terms(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    (terms["cls"] + terms["ratio"]).backward()
    for predictor in module.student.score_predictor:
        grad = predictor.out_conv[4].weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_a_dropped_token_does_not_leak_into_the_others() -> None:
    module = micro_module().train()
    student = module.student
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    x0 = student.embed(images)
    out, decisions = student.masked_blocks(x0.clone())
    mask = decisions[0]  # dropped before block 1 and never back
    b, patch = next((b, int(i)) for b in range(2) for i in torch.nonzero(mask[b] == 0)[:, 0])
    # perturb the dropped token right after the block that produced it (the input of block 1)
    torch.manual_seed(5)
    perturbed_input = x0.clone()

    block = student.vit.blocks[1]
    reduce = block.reduce

    def poked(x: torch.Tensor, *args: object) -> tuple:
        x = x.clone()
        x[b, 1 + patch] += 1000.0
        return reduce(x, *args)

    block.reduce = poked  # the student calls the instance's reduce
    try:
        out2, decisions2 = student.masked_blocks(perturbed_input)
    finally:
        del block.reduce
    for d1, d2 in zip(decisions, decisions2):
        assert torch.equal(d1, d2)  # the same Gumbel draws and the same decisions
    others = [i for i in range(out.shape[1]) if i != 1 + patch]
    # only the eps / N smoothing of the policy softmax can carry it: 1e-6 / 65 of a 1000-sized change
    assert (out2[b, others] - out[b, others]).abs().max() < 1e-3
    assert (out2[b, 1 + patch] - out[b, 1 + patch]).abs().max() > 1.0


def test_official_checkpoint_with_predictors_and_ema(tmp_path: Path) -> None:
    source = micro_module().eval()
    state = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in source.student.state_dict().items()}
    assert any(k.startswith("score_predictor.0.in_conv.0.") for k in state)
    assert any(k.startswith("score_predictor.2.out_conv.4.") for k in state)
    torch.save({"model": state, "model_ema": {k: torch.zeros_like(v) for k, v in state.items()}, "epoch": 29,
                "args": argparse.Namespace(base_rate=0.7)}, tmp_path / "dynamicvit_070.pth")
    loaded = micro_module(weights=str(tmp_path / "dynamicvit_070.pth")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["main", "neurips"])
def test_backbone_frozen_then_scaled_and_tokens_frozen(recipe: str) -> None:
    module = micro_module(lr=1e-3, backbone_freeze_epochs=2, optimizer_recipe=recipe, weight_decay=0.05)
    groups = module.param_groups()
    names = {id(p): n for n, p in module.student.named_parameters()}
    in_groups = {names[id(p)] for g in groups for p in g["params"]}
    assert "vit.cls_token" not in in_groups and "vit.pos_embed" not in in_groups
    predictor_groups = [g for g in groups if not g.get("backbone")]
    predictor = {names[id(p)]: g["weight_decay"] for g in predictor_groups for p in g["params"]}
    assert set(predictor) == {n for n in names.values() if n.startswith("score_predictor.")}
    # main.py: no weight decay on the predictors' biases and LayerNorm; main_dynamic_vit.py: decay on all
    assert predictor["score_predictor.0.in_conv.0.weight"] == (0.0 if recipe == "main" else 0.05)
    assert predictor["score_predictor.0.out_conv.0.bias"] == (0.0 if recipe == "main" else 0.05)
    assert predictor["score_predictor.0.out_conv.0.weight"] == 0.05
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    is_backbone = [bool(g.get("backbone")) for g in optimizer.param_groups]
    module._backbone_lr(optimizer, epoch=1.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0 if b else 1e-3 for b in is_backbone]
    for g in optimizer.param_groups:  # the schedule sets every group, then the backbone rule applies
        g["lr"] = 5e-4
    module._backbone_lr(optimizer, epoch=2.0)
    # main: 0.01 x the scheduled 5e-4; neurips: min(0.01 x the peak 1e-3, 5e-4)
    expected = 0.01 * 5e-4 if recipe == "main" else 1e-5
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(expected) if b else 5e-4 for b in is_backbone]


def test_fit_with_a_tiny_teacher_learns(in_tmp: Path) -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("vit_micro_patch4_32", num_classes=10, depth=2)
    torch.save(teacher.state_dict(), in_tmp / "teacher.pth")
    assert leanvit("fit", QUICKSTART, *FAST, "method=dynamicvit", "model.reduction_layers=[1]",
                   "model.keep_rate=0.7", f"model.teacher_weights={in_tmp / 'teacher.pth'}",
                   "model.backbone_freeze_epochs=0", "model.backbone_lr_scale=1.0", "trainer.max_epochs=5",
                   "trainer.log_every_n_steps=5") == 0
    rows = metrics(in_tmp / "runs" / "digits" / "dense" / "version_0")
    for term in ("cls", "ratio", "kl", "distill"):
        assert column(rows, f"train/loss_{term}"), term
    acc = column(rows, "val/acc1")
    assert acc[-1] > 25 and acc[-1] > acc[0] + 5
    ratio = column(rows, "train/loss_ratio")
    # the predictors start at keeping half (the official init) and learn to keep 70 %
    assert sum(ratio[-3:]) / 3 < sum(ratio[:3]) / 3
    assert column(rows, "tokens/layer_1")[-1] == 1 + int(64 * 0.7)


def test_starts_from_a_dense_deit_file_offline_with_fresh_predictors_and_it_as_teacher(
        in_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The bug: a plain timm/DeiT state dict was refused for its missing predictors, and the teacher then asked
    the hub for weights. The official code loads the backbone from the DeiT file, the teacher from the same."""
    torch.manual_seed(0)
    dense = timm.create_model("vit_micro_patch4_32", num_classes=10, depth=2)
    torch.save({"model": dense.state_dict()}, in_tmp / "deit_micro.pth")  # DeiT's release format
    module = micro_module(backbone_kwargs={"depth": 2}, reduction_layers=[1], weights=str(in_tmp / "deit_micro.pth"))
    assert "score_predictor" in caplog.text and "start fresh" in caplog.text
    for name, value in dense.state_dict().items():
        assert torch.equal(module.student.vit.state_dict()[name], value), name
    module.prepare_teacher()
    assert module.teacher is not None
    for name, value in dense.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[name], value), name
    # and end to end, offline (HF_HUB_OFFLINE=1): no hub request anywhere
    assert leanvit("fit", QUICKSTART, *FAST, "method=dynamicvit", "model.reduction_layers=[1]",
                   f"model.weights={in_tmp / 'deit_micro.pth'}", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=3", "trainer.limit_val_batches=2") == 0


def test_a_teacher_without_weights_names_the_teacher(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert leanvit("fit", QUICKSTART, *FAST, "method=dynamicvit", "model.reduction_layers=[1]",
                   "trainer.max_epochs=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.teacher" in err and "model.teacher_weights=FILE" in err
    assert not (in_tmp / "runs" / "digits" / "dense" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_predictors_start_as_the_official_init() -> None:
    """The official model applies its `_init_weights` to the predictors (truncated normal std 0.02, zero bias):
    every token starts near a 50 % keep probability. PyTorch's default init spread them and let training lock
    the predictors at keeping everything."""
    torch.manual_seed(0)
    predictor = PredictorLG(384)
    linears = [m for m in predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4
    for layer in linears:
        assert torch.all(layer.bias == 0)
        assert 0.015 < float(layer.weight.std()) < 0.025
    keep = predictor(torch.randn(2, 196, 384) * 3, torch.ones(2, 196, 1))[..., 0].exp()
    assert float((keep - 0.5).abs().max()) < 0.01


def test_policy_eps_reaches_every_masked_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """`policy_eps` (official 1e-6) is the eps of the training forward's policy softmax in every block; a
    non-positive one is refused naming the key."""
    import lightning_modules.dynamicvit as dynamicvit

    seen: list[float] = []

    def recording(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        seen.append(eps)
        return policy_softmax(logits, policy, eps)

    monkeypatch.setattr(dynamicvit, "policy_softmax", recording)
    for eps in (1e-6, 1e-2):
        seen.clear()
        module = micro_module(policy_eps=eps) if eps != 1e-6 else micro_module()
        module.student.run(torch.randn(2, 3, 32, 32), train=True)
        assert seen == [eps] * module.student.depth
    with pytest.raises(ValueError, match="model.policy_eps"):
        micro_module(policy_eps=0.0)
