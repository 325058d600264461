"""Shared fixtures: no network, W&B offline, tiny ViTs, the CLI in-process or as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import lightning_modules.vit  # noqa: E402,F401  (registers the micro ViTs with timm)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "digits" / "dense.yaml")  # the dense digits recipe the quickstart builds on
# A fast variant of the quickstart for tests: 2 blocks, no progress bar or model summary.
FAST = ["model.backbone_kwargs.depth=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LEANVIT_RUN_DIR", "LEANVIT_RESUME_CKPT", "LEANVIT_LAUNCHER_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


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


def assert_trace_invariants(trace: Any, *, prefix: int, depth: int, num_patches: int, static: bool) -> bool:
    """The token trace's invariants (shapes, counts, owners in range, every token carries a patch or is a prefix
    token, merged patches stay together, a patch once gone never returns); returns whether any block reduced."""
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
            assert (here >= -1).all() and (here < count).all()
            assert groups <= count <= groups + prefix  # every token entering the block carries a patch or is a prefix token
            if static:
                assert (live >= prefix).all() and groups == count - prefix
            # merged patches stay together and a patch once gone never comes back
            after = nxt[b]
            assert (after[here < 0] < 0).all()
            table = torch.full((count,), -2, dtype=torch.long)
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
