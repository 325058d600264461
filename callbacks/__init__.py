"""Callbacks: keep-rate schedule, throughput, token maps, and the run plumbing (checkpoints, reseeding)."""
from __future__ import annotations

from callbacks.checkpointing import AtomicCheckpointIO
from callbacks.determinism import ReseedEachBatch

# Callbacks a YAML can switch on under `callbacks:` (name -> class; the settings are its arguments).
CALLBACKS: dict[str, type] = {}

__all__ = ["AtomicCheckpointIO", "CALLBACKS", "ReseedEachBatch"]
