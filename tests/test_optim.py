"""The optimiser recipe: AdamW without weight decay on norms, biases, pos_embed and prefix tokens, the
DeiT lr scaling rule, and warm-up + cosine stepped every iteration."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from lightning_modules import METHODS

from helpers import FAST, QUICKSTART, column, leanvit, metrics


def test_no_weight_decay_on_norms_biases_pos_embed_and_tokens() -> None:
    module = METHODS["dense"](backbone="deit_micro_distilled_patch4_32", num_classes=10, weight_decay=0.05,
                              backbone_kwargs={"depth": 2})
    names = {id(p): n for n, p in module.student.named_parameters()}
    groups = module.param_groups()
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed.isdisjoint(plain) and decayed | plain == set(names.values())
    for name in ("vit.pos_embed", "vit.cls_token", "vit.dist_token", "vit.blocks.0.norm1.weight",
                 "vit.blocks.0.attn.qkv.bias", "vit.norm.bias", "vit.head.bias"):
        assert name in plain, name
    for name in ("vit.blocks.0.attn.qkv.weight", "vit.blocks.1.mlp.fc2.weight", "vit.patch_embed.proj.weight",
                 "vit.head.weight", "vit.head_dist.weight"):
        assert name in decayed, name
    assert all(g["weight_decay"] == 0.05 for g in groups if g["weight_decay"] > 0)


@pytest.mark.parametrize("prefix", [False, True])
def test_warmup_cosine_per_iteration_and_batch_scaled_lr(in_tmp: Path, prefix: bool) -> None:
    lr, warmup_lr, min_lr, epochs, steps = 2e-3, 1e-5, 1e-4, 3, 10
    assert leanvit("fit", QUICKSTART, *FAST, f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={steps}",
                   "trainer.log_every_n_steps=1", f"model.lr={lr}", "model.lr_reference_batch=64",
                   "model.warmup_epochs=1", f"model.warmup_lr={warmup_lr}", f"model.min_lr={min_lr}",
                   f"model.warmup_prefix={prefix}") == 0
    logged = column(metrics(in_tmp / "runs" / "digits" / "dense" / "version_0"), "train/lr")
    assert len(logged) == epochs * steps
    peak = lr * 32 / 64  # data.batch_size 32 on one device, lr given for a batch of 64
    for step, value in enumerate(logged):
        t = step / steps  # epochs done when this step ran
        if t < 1:
            expected = warmup_lr + t * (peak - warmup_lr)  # linear warm-up over the first epoch
        elif prefix:  # DynamicViT's cosine_scheduler: the cosine starts at the peak after the warm-up
            expected = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (t - 1) / (epochs - 1)))
        else:  # DeiT (timm): one cosine over all epochs, its start replaced by the warm-up
            expected = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / epochs))
        assert value == pytest.approx(expected, rel=1e-5), step
    assert logged[1] != logged[2]  # it moves within an epoch
