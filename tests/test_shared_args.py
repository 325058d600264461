"""Every method honours every shared training argument, or refuses it with one line naming the key:
DeiT distillation with a teacher, EMA (once per optimiser step), mixup/cutmix, gradient checkpointing,
drop path, and training in eval mode (`train_mode: false`). Each method trains for a few steps through a
real Trainer with all of them on, while spies count what actually ran."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import timm
import torch
from timm.layers import DropPath

import lightning_modules.vit as vit_module
from datamodules import EmbeddedDataModule
from lightning_modules import METHODS

DEPTH = 3
# Shared arguments a method refuses, with the key its one-line error names.
REFUSED = {("dynamicvit", "distillation"): "model.distillation"}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(timm.create_model("vit_micro_patch4_32", num_classes=10).state_dict(), path)
    return path


def build(method: str, **shared: Any) -> pl.LightningModule:
    torch.manual_seed(0)
    return METHODS[method](backbone="deit_micro_distilled_patch4_32", num_classes=10, lr_reference_batch=None,
                           backbone_kwargs={"depth": DEPTH}, warmup_epochs=0, **METHODS[method].demo_settings, **shared)


@pytest.mark.parametrize("method", list(METHODS))
def test_distillation_is_honoured_or_refused(method: str, teacher_file: Path) -> None:
    kwargs = dict(teacher="vit_micro_patch4_32", teacher_weights=str(teacher_file), distillation="soft")
    if (method, "distillation") in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[(method, "distillation")]) as err:
            build(method, **kwargs)
        assert "\n" not in str(err.value)
        return
    module = build(method, **kwargs, distill_alpha=0.3)
    module.prepare_teacher()
    calls = []
    module.teacher.register_forward_hook(lambda *_: calls.append(1))
    module.train()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    terms = module.loss_terms(images, targets)
    weights = module.loss_weights()
    assert calls and "distill" in terms and weights["distill"] == 0.3 and weights["cls"] == pytest.approx(0.7)
    sum(weights[k] * v for k, v in terms.items()).backward()
    head_dist = module.student.vit.head_dist.weight.grad  # the distillation head learns from the teacher
    assert head_dist is not None and head_dist.abs().sum() > 0


class Spies(pl.Callback):
    """Counts, per training batch, what the student ran: checkpointed blocks, drop paths (and whether they
    were in train mode), the targets' form, the teacher, EMA updates."""

    def __init__(self, module: pl.LightningModule, monkeypatch: pytest.MonkeyPatch) -> None:
        self.checkpointed = 0
        self.drop_paths: list[tuple[float, bool]] = []
        self.targets_ndim: list[int] = []
        self.teacher_calls = 0
        self.ema_updates = 0
        self.optimizer_steps = 0
        original_checkpoint = vit_module.checkpoint

        def counting_checkpoint(*args: Any, **kwargs: Any) -> Any:
            self.checkpointed += 1
            return original_checkpoint(*args, **kwargs)

        monkeypatch.setattr(vit_module, "checkpoint", counting_checkpoint)
        for m in module.student.modules():
            if isinstance(m, DropPath):
                m.register_forward_hook(lambda mod, *_: self.drop_paths.append((mod.drop_prob, mod.training)))
        original_loss = module.classification_loss

        def spy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            self.targets_ndim.append(targets.ndim)
            return original_loss(logits, targets)

        monkeypatch.setattr(module, "classification_loss", spy_loss)
        ema = module.student_ema
        original_update = ema.update

        def spy_update(*args: Any, **kwargs: Any) -> None:
            self.ema_updates += 1
            original_update(*args, **kwargs)

        monkeypatch.setattr(ema, "update", spy_update)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.teacher is not None:
            pl_module.teacher.register_forward_hook(lambda *_: setattr(self, "teacher_calls", self.teacher_calls + 1))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.optimizer_steps += 1


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("method", list(METHODS))
def test_shared_training_arguments_all_run(method: str, train_mode: bool, teacher_file: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    distill = (method, "distillation") not in REFUSED
    drop_path_rate = 0.3
    module = build(method, ema_decay=0.5, mixup=0.8, cutmix=1.0, grad_checkpointing=True, train_mode=train_mode,
                   drop_path_rate=drop_path_rate, teacher="vit_micro_patch4_32", teacher_weights=str(teacher_file),
                   **({"distillation": "hard"} if distill else {}))
    assert not any(p.requires_grad for p in module.student_ema.parameters())  # EMA: no gradients, under DDP too
    spies = Spies(module, monkeypatch)
    ema_before = {k: v.clone() for k, v in module.student_ema.module.state_dict().items()}
    batches, accumulate = 4, 2
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=1, accumulate_grad_batches=accumulate,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=[spies])
    trainer.fit(module, datamodule=EmbeddedDataModule(batch_size=8))

    # mixup/cutmix: soft targets reach every classification loss (MCTF's training adds its branch's)
    assert set(spies.targets_ndim) == {2} and len(spies.targets_ndim) % batches == 0
    # gradient checkpointing: every block of every pass through the blocks (MCTF's training makes two)
    assert spies.checkpointed > 0 and spies.checkpointed % (DEPTH * batches) == 0
    # drop path: both of every block's drop paths ran each training forward, at timm's linearly rising rates
    # (block 0's rate is 0: timm gives it no DropPath)
    rates = [r for r in (float(v) for v in torch.linspace(0, drop_path_rate, DEPTH)) if r > 0 for _ in (0, 1)]
    assert len(spies.drop_paths) >= len(rates) * batches
    assert [p for p, _ in spies.drop_paths[:len(rates)]] == pytest.approx(rates)
    # train_mode=false: the student trained in eval mode (drop path off), as the official fine-tune scripts
    assert {mode for _, mode in spies.drop_paths[:len(rates) * batches]} == {train_mode}
    assert spies.optimizer_steps == batches // accumulate
    assert spies.ema_updates == spies.optimizer_steps  # once per optimiser step, not per micro-batch
    changed = [k for k, v in module.student_ema.module.state_dict().items() if not torch.equal(v, ema_before[k])]
    assert changed
    if distill:
        assert spies.teacher_calls >= batches


@pytest.mark.parametrize("method", list(METHODS))
def test_linear_probe_trains_the_classifier_and_the_methods_own_modules_only(method: str) -> None:
    extra = {"kl_weight": 0.0, "distill_weight": 0.0} if "kl_weight" in METHODS[method].__init__.__code__.co_varnames else {}
    module = build(method, linear_probe=True, mixup=0.0, cutmix=0.0, **extra).train()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    terms = module.loss_terms(images, targets)
    sum(module.loss_weights()[k] * v for k, v in terms.items()).backward()
    student = module.student
    learned = {name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    heads = {"vit.head.weight", "vit.head.bias", "vit.head_dist.weight", "vit.head_dist.bias"}
    own = tuple(f"{m}." for m in student.added_modules)
    assert {"vit.head.weight", "vit.head_dist.weight"} <= learned  # both DeiT heads learn
    assert all(name in heads or name.startswith(own) for name in learned)
    frozen = [p for name, p in student.named_parameters() if name not in heads and not name.startswith(own)]
    assert frozen and not any(p.requires_grad for p in frozen)
