"""DiffRate against its definition re-derived with loops (class-attention ranking with proportional attention,
prune, similarity merge into the first tokens, sizes), the official compression_rate.json, the search's proxies
and FLOP formula by hand, and a search that moves the rates toward the target. The contract checks are in
test_contract.py; the official code itself was run on the same weights in scripts (README, DiffRate section)."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from datamodules import EmbeddedDataModule
from lightning_modules import METHODS
from lightning_modules.diffrate import RateProxy, available_rates, check_counts, official_macs, official_rates

from helpers import assert_trace_invariants, micro_vit


def test_official_rates_are_read_from_the_shipped_file() -> None:
    prune, merge = official_rates("deit_small_patch16_224", 2.9)
    assert len(prune) == len(merge) == 12 and prune[0] == merge[0] == 197  # block 0 never compresses
    assert all(m <= p for p, m in zip(prune, merge))
    assert official_rates("deit_small_patch16_224.fb_in1k", 2.9) == (prune, merge)  # a timm tag changes nothing
    assert available_rates("deit_tiny_patch16_224") == ["0.6", "0.7", "0.8", "0.9", "1.0"]
    assert official_rates("deit_small_patch16_224", 2.8) is None and official_rates("vit_micro_patch4_32", 1.0) is None


def test_counts_are_checked() -> None:
    assert check_counts("prune_kept_num", 40, 3) == [40, 40, 40]
    with pytest.raises(ValueError, match=r"model.merge_kept_num: expected 3 token counts"):
        check_counts("merge_kept_num", [50, 40], 3)
    with pytest.raises(ValueError, match="give both"):
        METHODS["diffrate"](backbone="vit_micro_patch4_32", num_classes=10, prune_kept_num=40)
    with pytest.raises(ValueError, match="not both"):
        METHODS["diffrate"](backbone="vit_micro_patch4_32", num_classes=10, prune_kept_num=40, merge_kept_num=30,
                            target_flops=1.0)


def test_rate_proxy_by_hand() -> None:
    proxy = RateProxy(num_patches=10, granularity=4)  # candidates 10, 6, 2
    assert proxy.candidates.tolist() == [10, 6, 2]
    proxy.logits.data = torch.tensor([0.0, math.log(2.0), math.log(5.0)])  # probabilities 1/8, 2/8, 5/8
    assert float(proxy.expected().detach()) == math.ceil(10 / 8 + 12 / 8 + 10 / 8)  # ceil(4.0) = 4
    mask = proxy.token_mask(kept=4, upto=8)
    assert mask.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]  # values: 0 on [kept, upto)
    # gradient: each position's probability of being kept (< candidate): positions 0-1 always, 2-5: p(10) + p(6)
    (mask * torch.arange(10.0)).sum().backward()
    p = torch.tensor([1, 2, 5]) / 8.0
    weights = torch.tensor([sum(range(0, 2)) + sum(range(2, 6)) + sum(range(6, 10)),
                            sum(range(0, 2)) + sum(range(2, 6)), sum(range(0, 2))], dtype=torch.float)
    expected = p * (weights - (p * weights).sum())  # d/d logits of sum_c p_c w_c (softmax Jacobian)
    torch.testing.assert_close(proxy.logits.grad, expected)


def test_official_flop_formula_by_hand() -> None:
    c, n0 = 8.0, 16
    counts = [(torch.tensor(16.0), torch.tensor(12.0)), (torch.tensor(10.0), torch.tensor(10.0))]
    got = official_macs(n0, counts, attn_macs=int(4 * c * c), attn_dim=int(c), mlp_macs=int(8 * c * c),
                        embed_macs=48, head_macs=80)
    n1, n2 = 17, 13  # tokens entering blocks 0 and 1 (class token included)
    expected = 17 * 48 + 80
    expected += 4 * n1 * c * c + 2 * n1 * n1 * c + 8 * 13 * c * c  # block 0: MLP on min(17, 17, 13)
    expected += 4 * n2 * c * c + 2 * n2 * n2 * c + 8 * 11 * c * c  # block 1: min(13, 11, 11)
    assert float(got) == expected


def slow_diffrate_reference(vit: torch.nn.Module, images: torch.Tensor, prune: list[int], merge: list[int]) -> torch.Tensor:
    """The official inference re-derived per image with loops; counts are patch tokens per block."""
    logits = []
    heads = vit.blocks[0].attn.num_heads
    for image in images:
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[0]
        size = torch.ones(x.shape[0])
        for layer, block in enumerate(vit.blocks):
            h = block.norm1(x)
            q, k, v = block.attn.qkv(h).reshape(x.shape[0], 3, heads, -1).permute(1, 2, 0, 3)
            attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + size.log()[None, None, :]).softmax(-1)
            x = x + block.ls1(block.attn.proj((attn @ v).transpose(0, 1).reshape(x.shape[0], -1)))
            n = x.shape[0] - 1
            kept_p = min(prune[layer], n)
            kept_m = min(merge[layer], kept_p)
            if kept_m < n:
                row = attn[:, 0, 1:].mean(0)
                order = sorted(range(n), key=lambda i: -float(row[i]))
                dst, src = order[:kept_m], order[kept_m:kept_p]
                members = {d: [d] for d in dst}
                sizes = {d: size[1 + d].clone() for d in dst}
                for s in src:
                    cos = [float(torch.cosine_similarity(x[1 + s], x[1 + d], dim=0)) for d in dst]
                    best = max(range(len(dst)), key=lambda j: cos[j])
                    members[dst[best]].append(s)
                    sizes[dst[best]] = sizes[dst[best]] + size[1 + s] * cos[best]
                x = torch.stack([x[0]] + [torch.stack([x[1 + m] for m in members[d]]).mean(0) for d in dst])
                size = torch.stack([size[0]] + [sizes[d] for d in dst])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(vit.forward_head(vit.norm(x)[None]))
    return torch.cat(logits)


def test_student_matches_the_slow_reference() -> None:
    vit = micro_vit(init_values=0.5)
    prune, merge = [65, 57, 45, 45, 30, 20], [60, 49, 45, 33, 30, 12]  # class token included
    module = METHODS["diffrate"](backbone="vit_micro_patch4_32", num_classes=10, prune_kept_num=prune,
                                 merge_kept_num=merge, backbone_kwargs={"init_values": 0.5}).eval()
    module.student.vit.load_state_dict(vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = slow_diffrate_reference(vit, images, [p - 1 for p in prune], [m - 1 for m in merge])
        got, trace = module.student(images, trace=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert trace.tokens[0].tolist() == [65, 60, 49, 45, 33, 30, 12] and trace.mlp_tokens[0].tolist() == [60, 49, 45, 33, 30, 12]


def test_deit_small_at_the_official_2_9_rates() -> None:
    module = METHODS["diffrate"](backbone="deit_small_patch16_224", target_flops=2.9).eval()
    prune, merge = official_rates("deit_small_patch16_224", 2.9)
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, 224, 224), trace=True)
    expected, n = [197], 197
    for p, m in zip(prune, merge):
        n = min(n, p, m)
        expected.append(n)
    assert trace.tokens[0].tolist() == expected


def searched_gmacs(module: pl.LightningModule) -> float:
    kept = module.student.rates.kept.double()
    with torch.no_grad():
        return float(module.official_gmacs(list(zip(kept[0], kept[1]))))


def test_the_search_moves_the_rates_toward_the_target(tmp_path: object) -> None:
    torch.manual_seed(0)
    target = 0.006
    module = METHODS["diffrate"](backbone="vit_micro_patch4_32", num_classes=10, backbone_kwargs={"depth": 3},
                                 target_flops=target, granularity=4, lr=0.05, lr_reference_batch=None, warmup_epochs=0,
                                 min_lr=0.05, weight_decay=0.0, mixup=0.0, cutmix=0.0, flops_weight=1e6)
    backbone = {k: v.clone() for k, v in module.student.vit.state_dict().items()}
    start = searched_gmacs(module)  # the proxies' starting counts: the expectation under uniform probabilities
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=20, limit_val_batches=0, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=EmbeddedDataModule(batch_size=8))
    for k, v in module.student.vit.state_dict().items():  # the backbone is frozen: only the rates learn
        assert torch.equal(v, backbone[k]), k
    assert abs(searched_gmacs(module) - target) < 0.75 * abs(start - target)  # 20 steps: 0.0026 -> 0.0015 G off
    kept = module.student.rates.kept
    assert kept[0, 0] == kept[1, 0] == 64  # block 0 is never compressed
    module.eval()
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, 32, 32), trace=True)
    expected, n = [65], 65
    for p, m in zip(kept[0].tolist(), kept[1].tolist()):
        n = min(n, p + 1, m + 1)
        expected.append(n)
    assert trace.tokens[0].tolist() == expected  # evaluation uses the searched counts


def test_sizes_below_one_are_the_official_quirk_and_clamp_sizes_fixes_them() -> None:
    # two destinations; a source opposite to its best destination (similarity -1 after the max) lowers its size
    from lightning_modules.diffrate import prune_and_merge

    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])  # prefix, two destinations, one source
    size = torch.ones(1, 4, 1)
    order = torch.tensor([[0, 1, 2]])  # patch tokens 0, 1 are the destinations, 2 the source
    out, sizes, _ = prune_and_merge(x, size, order, prune=3, merge=2, num_prefix=1)
    best = -1 / math.sqrt(2)  # cosine of (-1, -1) with (1, 0) (and with (0, 1): a tie, the first wins)
    assert sizes[0, :, 0].tolist() == pytest.approx([1.0, 1.0 + best, 1.0])
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 3]) / 2)  # the unweighted mean, the destination included
    _, clamped, _ = prune_and_merge(x, size, order, prune=3, merge=2, num_prefix=1, clamp_sizes=True)
    assert clamped[0, :, 0].tolist() == [1.0, 2.0, 1.0]


def test_a_search_pass_records_its_token_trace() -> None:
    """`run(train=True, trace=True)` during the search: the trace follows each block's sort, merges and prunes. The
    patch tokens taking part after block l are min(before, prune_l, merge_l) (the official FLOP formula's counts),
    every owner sits among them (the sort puts them first), and tracing does not change the pass (`train` is the
    search whatever the module's mode: eval here, so no drop path)."""
    torch.manual_seed(0)
    module = METHODS["diffrate"](backbone="deit_micro_distilled_patch4_32", num_classes=10,
                                 backbone_kwargs={"depth": 4}, target_flops=0.004, granularity=8).eval()
    with torch.no_grad():  # probabilities away from uniform, so the blocks differ
        for proxy in [*module.student.rates.prune, *module.student.rates.merge]:
            proxy.logits.normal_(std=2.0)
    images = torch.randn(2, 3, 32, 32)
    plain = module.student.run(images, train=True)
    first = module.student.vit.blocks[0]
    search, outputs = first.search, []
    first.search = lambda *args: outputs.append(search(*args)) or outputs[-1]  # keep block 0's sorted output
    try:
        traced = module.student.run(images, train=True, trace=True)
    finally:
        del first.search
    torch.testing.assert_close(traced.logits, plain.logits, rtol=0, atol=0)
    assert plain.trace is None and traced.trace is not None and traced.loss_inputs is not None
    trace = traced.trace
    assert assert_trace_invariants(trace, prefix=2, depth=4, num_patches=64, static=False)
    with torch.no_grad():  # block 0 never reduces but sorts: the token owning patch i is patch i's dense output
        dense = first(module.student.embed(images))[:, 2:]
    sorted_x, owner = outputs[0][0], trace.owner[1]
    torch.testing.assert_close(sorted_x.gather(1, owner[..., None].expand_as(dense)), dense, rtol=0, atol=1e-4)
    alive = 64
    for layer, (prune, merge) in enumerate(traced.loss_inputs):
        alive = min(alive, int(prune), int(merge))
        assert (trace.mlp_tokens[:, layer] == 2 + alive).all()
        owner = trace.owner[layer + 1]
        assert ((owner >= 2) & (owner < 2 + alive)).sum(1).eq(64 - (owner < 0).sum(1)).all()
