"""Checkpoints that a killed process can never leave half-written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the target.

    A rename within one file system is atomic: a reader (or a resume after a crash) sees the old
    checkpoint or the new one, never a truncated file. (Lightning's own save goes through fsspec, whose
    temporary file lives in the system temp dir: across file systems its final move is a plain copy.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
