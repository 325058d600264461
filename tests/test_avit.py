"""A-ViT: the halting bookkeeping by hand, the loss terms by hand, halted tokens isolated, packed inference
== the official masked computation, no halting == timm, training lowers the depth."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from lightning_modules import METHODS
from lightning_modules.avit import act_step, average_depth, depth_prior_kl, gaussian_depth_prior, halting_score

from helpers import FAST, QUICKSTART, VARIANTS, column, leanvit, metrics


def micro(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(backbone="vit_micro_patch4_32", num_classes=10, gate_scale=10.0, gate_center=3.0, drop_path_rate=0.0)
    return METHODS["avit"](**(settings | kwargs)).eval()


def test_halting_bookkeeping_by_hand_on_three_layers() -> None:
    # three tokens, three layers (the last forces h = 1), eps = 0.01
    h = [torch.tensor([0.5, 0.2, 0.995]), torch.tensor([0.6, 0.3, 0.1]), torch.tensor([1.0, 1.0, 1.0])]
    c, R = torch.zeros(3), torch.ones(3)
    active = torch.ones(3, dtype=torch.bool)
    weights, ponder = torch.zeros(3, 3), torch.zeros(3)
    for layer in range(3):
        step = act_step(c, R, h[layer], 0.01)
        weights[layer] = step.weight * active
        ponder += active * step.ponder
        c, R, active = step.c, step.R, step.active
    # token 0: 0.5, then c = 1.1 halts at layer 1 with R = 0.5 -> weights .5, .5; rho = 2 layers + 0.5
    # token 1: 0.2, 0.3, then forced at layer 2 with R = 0.5 -> weights .2, .3, .5; rho = 3 + 0.5
    # token 2: 0.995 >= 0.99 halts at layer 0 with R = 1 -> weight 1; rho = 1 + 1
    torch.testing.assert_close(weights.T, torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    assert ponder.tolist() == pytest.approx([2.5, 3.5, 2.0])
    torch.testing.assert_close(weights.sum(0), torch.ones(3))  # output weights sum to 1 per token
    assert not active.any()


def test_depth_prior_and_kl_by_hand() -> None:
    target = gaussian_depth_prior(12, 8)
    assert target[:8].sum().item() == pytest.approx(0.98) and target.sum().item() == pytest.approx(3.2605, abs=1e-3)
    assert int(target.argmax()) == 8
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    tgt = torch.tensor([0.2, 0.3, 0.4, 0.5])
    p = (scores / scores.sum()).clamp(0.01, 0.99)
    expected = sum(float(t) * (math.log(float(t)) - math.log(float(q))) for t, q in zip(tgt, p)) / 4
    assert depth_prior_kl(scores, tgt).item() == pytest.approx(expected, rel=1e-5)


def test_loss_terms_by_hand() -> None:
    module = micro(prior_mean_over="batch").train()
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    terms = module.loss_terms(images, targets)
    out = module.student.run(images, train=True).loss_inputs
    assert terms["ponder"].item() == pytest.approx(out.ponder.mean().item(), rel=1e-6)
    batch_means = torch.stack([h[1:].mean() for h in out.layer_scores])  # the official h[1:] (drops image 0)
    expected = max(depth_prior_kl(batch_means, module.prior_target).item(), 0.0)
    assert terms["prior"].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    fixed = micro(prior_mean_over="tokens").train()
    out = fixed.student.run(images, train=True).loss_inputs
    token_means = torch.stack([h[:, 1:].mean() for h in out.layer_scores])
    assert fixed.loss_terms(images, targets)["prior"].item() == pytest.approx(
        max(depth_prior_kl(token_means, fixed.prior_target).item(), 0.0), rel=1e-5, abs=1e-7)
    assert module.loss_weights() == {"cls": 1.0, "ponder": 5e-4, "prior": 1e-3}


def test_halted_tokens_cannot_influence_active_ones() -> None:
    student = micro().student
    x = student.embed(torch.randn(2, 3, 32, 32))
    halted = torch.zeros(2, 65)
    halted[:, 10:40] = 1.0
    block = student.vit.blocks[2]
    with torch.no_grad():
        base = block.reduce(x, halted)[0]
        poked = x.clone()
        poked[:, 10:40] += 100.0 * torch.randn_like(poked[:, 10:40])
        other = block.reduce(poked, halted)[0]
    active = halted[0] == 0
    torch.testing.assert_close(other[:, active], base[:, active], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["plain", "layerscale_no_embed_class", "qk_norm", "registers",
                                     "avg_pool_no_class_token"])
def test_packed_inference_equals_the_masked_computation(variant: str) -> None:
    module = micro(backbone_kwargs=VARIANTS[variant])
    student = module.student
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = student.forward_masked(student.embed(images))
        expected = student.vit.forward_head(student.vit.norm(out.features))
        got, trace = student(images, trace=True)
    depth = out.depth.mean(1)
    assert depth.min() < 5.5 and depth.max() - depth.min() > 0.2  # a spread of halting depths
    assert (got - expected).abs().max() < 1e-4


def test_distilled_deit_finishes_when_both_heads_tokens_halt() -> None:
    module = micro(backbone="deit_micro_distilled_patch4_32")
    assert module.student.head_tokens() == 2
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = module.student.forward_masked(module.student.embed(images))
        expected = module.student.vit.forward_head(module.student.vit.norm(out.features))
        assert (module.student(images) - expected).abs().max() < 1e-4


def test_no_halting_equals_dense_timm() -> None:
    module = micro(gate_center=1e4)
    dense = timm.create_model("vit_micro_patch4_32", num_classes=10).eval()
    dense.load_state_dict(module.student.vit.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got, trace = module.student(images, trace=True)
        torch.testing.assert_close(got, dense(images), rtol=1e-5, atol=1e-5)
    assert (average_depth(trace) == 6).all()


def test_trace_marks_a_patch_halted_from_the_next_layer_and_finishes_images() -> None:
    module = micro(gate_center=2.0)
    student = module.student
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, trace = student(images, trace=True)
        out = student.forward_masked(student.embed(images))
    for b in range(4):
        finished = next((layer for layer in range(7) if trace.tokens[b, layer] == 0), 6)
        for patch in range(64):
            ran = int(out.depth[b, 1 + patch])  # layers the patch ran in the masked computation
            alive = [bool(trace.owner[layer][b, patch] >= 0) for layer in range(7)]
            # running in the first min(ran, finished) layers, -1 from the layer after it halts on
            assert alive == [layer < min(ran, finished) for layer in range(7)], (b, patch)
        assert trace.tokens[b, finished - 1] >= 1 and (trace.tokens[b, finished:] == 0).all()
    assert (trace.tokens[:, 0] == 65).all()
    # packed positions: the active tokens of an image are numbered 0..n-1 in order
    for layer in range(7):
        for b in range(4):
            live = trace.owner[layer][b][trace.owner[layer][b] >= 0]
            assert torch.equal(live, torch.sort(live).values) and (live < trace.tokens[b, layer]).all()


def test_halting_score_reads_channel_zero() -> None:
    x = torch.zeros(1, 2, 4)
    x[0, 1, 0] = 3.0
    torch.testing.assert_close(halting_score(x, 10.0, 30.0), torch.tensor([[1 / (1 + math.exp(30)), 0.5]]))


def test_fit_lowers_the_average_depth(in_tmp: Path) -> None:
    assert leanvit("fit", QUICKSTART, *FAST, "method=avit", "model.gate_center=10.0", "model.ponder_weight=0.05",
                   "trainer.max_epochs=5", "trainer.log_every_n_steps=5") == 0
    rows = metrics(in_tmp / "runs" / "digits" / "dense" / "version_0")
    for term in ("cls", "ponder", "prior"):
        assert column(rows, f"train/loss_{term}"), term
    depth = column(rows, "val/avg_depth")
    acc = column(rows, "val/acc1")
    assert depth[-1] < 2.0 and depth[-1] < depth[0]  # 2 blocks in the fast quickstart model
    assert acc[-1] > 25


def test_packed_inference_syncs_with_the_host_at_most_twice_per_block() -> None:
    """On a GPU every value the host reads (a boolean mask index, `.item()`, bincount's size) stalls the stream.
    Packing needs the number of active tokens and the padded length each block: one `nonzero` and one read of
    three sizes; everything else stays on the device. (It used to be about nine per block.)"""
    from helpers import HostSyncCounter

    module = micro(gate_center=2.0)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        x = module.student.embed(images)
        with HostSyncCounter() as counter:
            module.student.forward_packed(x)
    blocks = module.student.depth
    assert counter.calls, "the counter sees the packing's syncs"
    assert len(counter.calls) <= 2 * blocks, counter.calls
