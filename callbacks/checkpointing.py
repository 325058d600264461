"""Checkpoints that a killed process can never leave half-written, and that never replace a good one with a bad one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder, ...); the previous one is intact."""


class NonFiniteCheckpointError(ValueError):
    """The weights hold NaN or inf: writing them would replace the last good checkpoint."""


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the target.

    A rename within one file system is atomic: a reader (or a resume after a crash) sees the old
    checkpoint or the new one, never a truncated file. (Lightning's own save goes through fsspec, whose
    temporary file lives in the system temp dir: across file systems its final move is a plain copy.)
    A write that fails (disk full, read-only folder) raises `CheckpointWriteError` naming the file and leaves
    the previous checkpoint as it was; weights with NaN or inf are refused (`NonFiniteCheckpointError`), so
    a diverged run never overwrites its last good checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(f"checkpoint: not writing {path}: non-finite weights in {', '.join(bad[:4])}"
                                           f"{' ...' if len(bad) > 4 else ''}; the previous checkpoint is kept")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise CheckpointWriteError(f"checkpoint: cannot write {path}: {reason}; the previous checkpoint is "
                                       f"intact") from err
        except RuntimeError as err:
            if not is_zip_writer_failure(err):
                raise
            # torch's zip writer reports a refused write (a file-size limit, a quota, some network file systems)
            # as a RuntimeError: "[enforce fail at inline_container.cc:...] unexpected pos ..."
            reason = str(err).strip().splitlines()[0]
            raise CheckpointWriteError(f"checkpoint: cannot write {path}: the file system refused the write ({reason}; "
                                       f"a file-size limit or quota?); the previous checkpoint is intact") from err
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def is_zip_writer_failure(err: RuntimeError) -> bool:
    """A RuntimeError from torch.save's zip writer failing to write (not a pickling error)."""
    text = str(err)
    return any(mark in text for mark in ("inline_container", "PytorchStreamWriter", "file write failed"))


def at_last_training_batch(trainer: pl.Trainer) -> bool:
    """The batch just trained is the epoch's last (validation and the epoch-end checkpoint come next)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for `every_n_train_steps` / `train_time_interval`, mid-epoch only.

    At an epoch's last batch it writes nothing: the epoch-end checkpoint follows after validation, and Lightning
    2.6 resumed from a checkpoint taken between the two marks the epoch done without starting the next one's
    bookkeeping (a later mid-epoch checkpoint of that next epoch then resumes it from its first batch)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not at_last_training_batch(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
