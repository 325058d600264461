"""pytest set-up: no network, W&B offline, the micro ViTs registered, and the fixtures every test file may use.
Shared helpers (not fixtures) live in helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

import lightning_modules.vit  # noqa: E402,F401  (registers the micro ViTs with timm)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in ("LEANVIT_RUN_DIR", "LEANVIT_RESUME_CKPT", "LEANVIT_LAUNCHER_PID"):
        monkeypatch.delenv(name, raising=False)
    # leanvit's cache (zero-shot class weights) in the session's temporary folder, never the user's
    monkeypatch.setenv("LEANVIT_CACHE", str(tmp_path_factory.getbasetemp() / "leanvit_cache"))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
