"""Callbacks: reduction schedule, throughput, token maps, and the run plumbing (checkpoints, reseeding)."""
from __future__ import annotations

from callbacks.checkpointing import AtomicCheckpointIO
from callbacks.determinism import ReseedEachBatch
from callbacks.throughput import ThroughputCallback
from callbacks.token_maps import TokenMapCallback
from lightning_modules.schedule import ReductionSchedule  # the methods add it themselves (configure_callbacks)

# Callbacks a YAML can switch on under `callbacks:` (name -> class; the settings are its arguments).
CALLBACKS: dict[str, type] = {
    "throughput": ThroughputCallback,
    "token_maps": TokenMapCallback,
}

__all__ = ["AtomicCheckpointIO", "CALLBACKS", "ReductionSchedule", "ReseedEachBatch", "ThroughputCallback", "TokenMapCallback"]
