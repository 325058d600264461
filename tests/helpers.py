"""Helpers shared by the test files (fixtures live in conftest.py): the CLI in-process and as a subprocess, micro
ViTs, the token-trace invariants, the backbone families, metrics read from a run's CSV logs."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import timm
import torch

import lightning_modules.vit  # noqa: F401  (registers the micro ViTs with timm)
from lightning_modules import METHODS

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "digits" / "dense.yaml")  # the dense digits recipe the quickstart builds on
# A fast variant of the quickstart for tests: 2 blocks, no progress bar or model summary.
FAST = ["model.backbone_kwargs.depth=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0"]





def leanvit(*args: str) -> int:
    """The CLI in this process."""
    from experiments.cli import main

    return main(list(args))


def free_port() -> int:
    """A TCP port nobody listens on now (for a DDP run's rendezvous, so parallel runs never collide)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name in ("LEANVIT_RUN_DIR", "LEANVIT_RESUME_CKPT", "LEANVIT_LAUNCHER_PID"):
        env.pop(name, None)
    return env


def leanvit_subprocess(*args: str, cwd: Path, timeout: float = 600, script: Optional[Path] = None,
                       env: Optional[dict[str, Optional[str]]] = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter (needed for DDP: never launch ddp inside pytest), with its own free
    rendezvous port and a generous timeout (a loaded CI machine is slow). `script` runs a wrapper instead of
    `-m experiments.cli` (Lightning's DDP launcher re-runs the same command line for the other ranks)."""
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "experiments.cli"]
    try:
        merged = {k: v for k, v in (subprocess_env() | (env or {})).items() if v is not None}  # None: unset it
        return subprocess.run([*command, *args], cwd=cwd, env=merged, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"leanvit {' '.join(args)} timed out after {timeout} s\n--- stdout ---\n{err.stdout}\n"
                    f"--- stderr ---\n{err.stderr}", pytrace=False)


def check_success(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the subprocess's whole output (every rank's traceback), not its cut-off tail."""
    if done.returncode != 0:
        pytest.fail(f"exit status {done.returncode}: {' '.join(map(str, done.args))}\n--- stdout ---\n"
                    f"{done.stdout}\n--- stderr ---\n{done.stderr}", pytrace=False)
    return done


def micro_vit(**kwargs: Any) -> torch.nn.Module:
    """A random micro ViT (32 px, patch 4, width 64) in eval mode."""
    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch4_32", num_classes=10, **kwargs).eval()


def assert_trace_invariants(trace: Any, *, prefix: int, depth: int, num_patches: int, static: bool,
                            masked: bool = False) -> bool:
    """The token trace's invariants (shapes, counts, owners in range, every token carries a patch or is a prefix
    token, merged patches stay together, a patch once gone never returns); returns whether any block reduced.
    `masked`: a training pass that masks tokens in place (DynamicViT, A-ViT), so an owner is a position in the whole
    sequence rather than among the tokens taking part."""
    batch = trace.tokens.shape[0]
    assert trace.num_prefix_tokens == prefix and trace.depth == depth
    assert trace.grid_size[0] * trace.grid_size[1] == num_patches
    assert trace.tokens.shape == (batch, depth + 1) and trace.mlp_tokens.shape == (batch, depth)
    assert [tuple(o.shape) for o in trace.owner] == [(batch, num_patches)] * (depth + 1)
    assert torch.equal(trace.owner[0], torch.arange(prefix, prefix + num_patches).expand(batch, -1))
    assert (trace.tokens[:, 0] == num_patches + prefix).all()
    assert (trace.mlp_tokens <= trace.tokens[:, :-1]).all() and (trace.tokens[:, 1:] <= trace.mlp_tokens).all()
    reduced = False
    for layer, (owner, nxt) in enumerate(zip(trace.owner, trace.owner[1:])):
        for b in range(batch):
            here = owner[b]
            live = here[here >= 0]
            groups = live.unique().numel()  # tokens that carry patches
            count = int(trace.tokens[b, layer])
            assert (here >= -1).all() and (here < (num_patches + prefix if masked else count)).all()
            assert groups <= count <= groups + prefix  # every token entering the block carries a patch or is a prefix token
            if static:
                assert (live >= prefix).all() and groups == count - prefix
            # merged patches stay together and a patch once gone never comes back
            after = nxt[b]
            assert (after[here < 0] < 0).all()
            table = torch.full((num_patches + prefix if masked else count,), -2, dtype=torch.long)
            table[live] = after[here >= 0]
            assert torch.equal(table[live], after[here >= 0])
        reduced |= bool((trace.tokens[:, layer + 1] < trace.tokens[:, layer]).any())
    return reduced


def assert_fused_matches_explicit(student: torch.nn.Module, images: torch.Tensor) -> None:
    """timm's fused SDPA and explicit attention paths give the same logits and the same token trace."""
    outputs = []
    for fused in (True, False):
        for block in student.vit.blocks:
            block.attn.fused_attn = fused
        with torch.no_grad():
            outputs.append(student(images, trace=True))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outputs[0][1].owner, outputs[1][1].owner):
        assert torch.equal(a, b)


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the calls that make a GPU wait for the host to read a value (a host sync): `.item()`, `.tolist()`,
    a tensor's truth or int value, `nonzero`, `bincount`, `masked_select`, `unique`, and indexing with a boolean
    mask. On the CPU nothing waits, but the same code syncs on a GPU, so the count is what a GPU would pay."""

    SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "bincount",
               "masked_select", "unique", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        # repeat_interleave syncs for tensor repeats without an output_size (an int repeat does not)
        counts_repeats = len(args) > 1 and isinstance(args[1], torch.Tensor) and not (kwargs or {}).get("output_size")
        if name in self.SYNCING and (name != "repeat_interleave" or counts_repeats):
            self.calls.append(name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append(f"{name}[bool]")
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- run logs
def metrics(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


# ---------------------------------------------------------------------------------------------- ViT variants
VARIANTS = {
    "plain": {},
    "layerscale_no_embed_class": {"init_values": 1e-2, "no_embed_class": True},  # deit3-style
    "qk_norm": {"qk_norm": True},
    "registers": {"reg_tokens": 4},
    "avg_pool_no_class_token": {"class_token": False, "global_pool": "avg", "fc_norm": True},
}


# ---------------------------------------------------------------------------------------------- backbone families
MICRO = {"patch_size": 4, "embed_dim": 64, "num_heads": 2, "depth": 3}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "DeiT": ("deit_tiny_patch16_224", {}),
    "DeiT III": ("deit3_small_patch16_224", {}),  # LayerScale, position embedding without the class token
    "AugReg": ("vit_tiny_patch16_224.augreg_in21k", {}),
    "CLIP": ("vit_base_patch16_clip_224", {}),  # pre-norm, quick GELU-free OpenCLIP layout
    "SigLIP": ("vit_base_patch16_siglip_224", {}),  # no class token, MAP head
    "DINOv2 + registers": ("vit_small_patch14_reg4_dinov2", {}),  # 4 registers, LayerScale
    "MAE": ("vit_base_patch16_224.mae", {"global_pool": "avg"}),  # MAE fine-tuning's average pooling
    "EVA-02": ("eva02_tiny_patch14_224", {}),  # Eva: RoPE, SwiGLU, separate q/k/v
    "DINOv3": ("vit_small_patch16_dinov3", {}),  # Eva: RoPE (DINOv3's), 4 registers, LayerScale, no abs. pos.
    "PE-core": ("vit_pe_core_tiny_patch16_384", {}),  # Eva: RoPE, AttentionRope, pre-norm, MAP head
    "RoPE-ViT mixed": ("vit_small_patch16_rope_mixed_224", {}),  # Eva: a learned RoPE table per block
    # Eva's other options: qk-norm, sub-LN in the attention and the MLP, no class token (average pooling)
    "EVA-02 qk-norm, no class token": ("eva02_tiny_patch14_224", {"qk_norm": True, "scale_attn_inner": True,
                                                                  "scale_mlp": True, "class_token": False}),
}
ROPE = [f for f, (name, _) in FAMILIES.items() if name.split("_")[0] in ("eva02",) or "dinov3" in name
        or "_pe_" in name or "rope" in name]


def kwargs_of(family: str) -> dict[str, Any]:
    return MICRO | FAMILIES[family][1]


def reference(family: str) -> torch.nn.Module:
    name = FAMILIES[family][0]
    return timm.create_model(name, num_classes=10, img_size=32, **kwargs_of(family)).eval()


def build(method: str, family: str, **settings: Any) -> Any:
    torch.manual_seed(0)
    kwargs = dict(METHODS[method].demo_settings) | settings
    return METHODS[method](backbone=FAMILIES[family][0], num_classes=10, img_size=32,
                           backbone_kwargs=kwargs_of(family), **kwargs).eval()


def refuses(method: str, family: str) -> bool:
    return METHODS[method].needs_class_token and getattr(reference(family), "cls_token", None) is None


# ---------------------------------------------------------------------------------------------- long runs
STEPS_PER_EPOCH = 1280 // 32  # repeated augmentation x3 keeps DeiT's epoch length: 1,438 // 256 * 256 images
# Every random draw (mixup/cutmix, drop path, RandAugment, random erasing, repeated augmentation copies, EMA) and
# loader workers, with a last.ckpt every 5 optimiser steps.
RANDOM = [*FAST, "trainer.max_epochs=2", "model.mixup=0.8", "model.cutmix=1.0", "model.drop_path_rate=0.1",
          "model.ema_decay=0.9", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25", "data.repeated_aug=3",
          "data.num_workers=1", "data.persistent_workers=true", "checkpoint.every_n_train_steps=5"]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and any(k.startswith("student_ema.") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
