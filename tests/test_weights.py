"""`weights=` reads every supported file format with weights_only=True and refuses anything else."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

from lightning_modules import METHODS
from lightning_modules.vit import ViTStudent, create_teacher, load_weights, read_checkpoint

from helpers import micro_vit


class NotAllowed:
    """An arbitrary pickled object: a weights_only load must refuse it."""


@pytest.fixture
def source() -> torch.nn.Module:
    return micro_vit(depth=2)


def assert_same_logits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images), b.eval()(images), rtol=0, atol=0)


def fresh_student() -> ViTStudent:
    torch.manual_seed(1)  # other weights than the source
    return ViTStudent(micro_vit(depth=2))


def test_plain_state_dict(tmp_path: Path, source: torch.nn.Module) -> None:
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    student = fresh_student()
    load_weights(student, tmp_path / "plain.pth")
    assert_same_logits(student, source)


def test_deit_checkpoint_with_pickled_args(tmp_path: Path, source: torch.nn.Module) -> None:
    ckpt = {"model": {f"module.{k}": v for k, v in source.state_dict().items()},  # saved from DDP
            "epoch": 299, "args": argparse.Namespace(model="deit_small_patch16_224", lr=5e-4, output_dir=Path("out"))}
    torch.save(ckpt, tmp_path / "deit.pth")
    student = fresh_student()
    load_weights(student, tmp_path / "deit.pth")
    assert_same_logits(student, source)


def test_safetensors(tmp_path: Path, source: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    student = fresh_student()
    load_weights(student, tmp_path / "w.safetensors")
    assert_same_logits(student, source)


def test_leanvit_checkpoint_into_module_and_teacher(tmp_path: Path) -> None:
    module = METHODS["dense"](backbone="vit_micro_patch4_32", num_classes=10)
    ckpt = {"pytorch-lightning_version": "2.6.6", "epoch": 1, "hyper_parameters": dict(module.hparams),
            "state_dict": module.state_dict()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    state, kind = read_checkpoint(tmp_path / "last.ckpt")
    assert kind == "leanvit" and all(k.startswith("vit.") for k in state)
    again = METHODS["dense"](backbone="vit_micro_patch4_32", num_classes=10, weights=str(tmp_path / "last.ckpt"))
    assert_same_logits(again, module)
    teacher = create_teacher("vit_micro_patch4_32", num_classes=10, img_size=None, weights=str(tmp_path / "last.ckpt"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert_same_logits(teacher, module)
    with pytest.raises(ValueError, match=r"missing \['blocks.2"):  # a 2-block checkpoint in a 6-block model
        torch.save(micro_vit(depth=2).state_dict(), tmp_path / "shallow.pth")
        load_weights(micro_vit(), tmp_path / "shallow.pth")


def test_arbitrary_objects_are_refused(tmp_path: Path, source: torch.nn.Module) -> None:
    torch.save({"model": source.state_dict(), "extra": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.pth")


def test_missing_file_and_non_dict(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        read_checkpoint(tmp_path / "tensor.pth")


def test_other_head_size_is_reinitialised_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import timm

    torch.manual_seed(0)
    imagenet = timm.create_model("vit_micro_patch4_32", num_classes=1000, depth=2)
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    student = fresh_student()
    head_before = student.vit.head.weight.clone()
    with caplog.at_level(logging.WARNING):
        load_weights(student, tmp_path / "in1k.pth")
    assert "vit.head.weight" in caplog.text and "left at its initialisation" in caplog.text
    assert torch.equal(student.vit.head.weight, head_before)
    assert torch.equal(student.vit.blocks[1].mlp.fc2.weight, imagenet.blocks[1].mlp.fc2.weight)


def test_mismatched_keys_are_named(tmp_path: Path, source: torch.nn.Module) -> None:
    state = dict(source.state_dict(), **{"blocks.5.attn.qkv.weight": torch.zeros(1)})
    del state["norm.weight"]
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError) as err:
        load_weights(fresh_student(), tmp_path / "odd.pth")
    assert "vit.norm.weight" in str(err.value) and "vit.blocks.5.attn.qkv.weight" in str(err.value)


def test_position_embedding_is_resampled_to_the_model_resolution(tmp_path: Path, source: torch.nn.Module) -> None:
    torch.save(source.state_dict(), tmp_path / "w32.pth")
    big = ViTStudent(micro_vit(depth=2, img_size=64))
    load_weights(big, tmp_path / "w32.pth")
    assert big.vit.pos_embed.shape == (1, 1 + 256, 64)
    assert torch.equal(big.vit.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's entry is kept
