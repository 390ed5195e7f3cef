"""Keeping a training run recoverable: atomic checkpoints, and the callbacks every run gets.

- ``AtomicCheckpointIO``: every checkpoint is written to a temporary file in the same folder,
  flushed to disk and renamed over the target (``os.replace``), so a run killed while saving
  leaves the previous good file, never a half-written one. (Lightning's own writer goes
  through an fsspec transaction whose temporary file lives in the system temp folder: the
  final move is a copy when that is another filesystem.) Used by every trainer config
  (``configs/trainer/default.yaml``: ``plugins``).
- `recovery_callbacks`: exact resume (``RestoreRNGState``; with the DataModules'
  resumable sampler, `i2e_train.data.sampler`, a run interrupted mid-epoch and resumed
  with ``ckpt_path=last`` ends with the same weights as an uninterrupted one), a loud stop on a
  NaN/Inf loss that keeps the last good checkpoint (``StopOnNonFinite``) and the count of
  skipped bad records (``BadRecordsReport``); see [`i2e_train.callbacks`][i2e_train.callbacks]. Mid-epoch
  recovery points: ``StepCheckpoint`` (``callbacks.step_checkpoint.every_n_train_steps``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from i2e_train.files import atomic_write

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "recovery_callbacks"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file in the same folder + ``os.replace``."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), durable=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a half-written checkpoint where a good one was.

    Local paths are written atomically (temporary file + fsync + ``os.replace``); remote URLs
    (``s3://`` ...) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def recovery_callbacks(output_dir: str | os.PathLike | None = None) -> list[Callback]:
    """The callbacks every ``i2e-train`` run gets (not a config group: resuming exactly and
    stopping on NaN must not depend on the chosen callback set)."""
    from i2e_train.callbacks import BadRecordsReport, RestoreRNGState, StopOnNonFinite, StreamEpoch

    return [RestoreRNGState(), StopOnNonFinite(), BadRecordsReport(output_dir), StreamEpoch()]
