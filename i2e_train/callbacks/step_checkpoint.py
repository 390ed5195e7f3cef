"""Mid-epoch recovery points: ``last.ckpt`` every N optimiser steps."""

from __future__ import annotations

import os

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["StepCheckpoint"]


class StepCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimiser steps (mid-epoch recovery
    points); ``None`` or 0 = never (the epoch-end ``last.ckpt`` of the main ModelCheckpoint stays).

    It overwrites the same ``last.ckpt`` as the main checkpoint callback (which must therefore
    have ``enable_version_counter: false``), so ``ckpt_path=last`` always finds the newest state.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None) -> None:
        n = int(every_n_train_steps or 0)
        if n < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (or null), got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=n,
                         every_n_epochs=0, enable_version_counter=False, save_on_train_epoch_end=False)
        self.every_n = n

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self.every_n, kind="step_checkpoint")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # ModelCheckpoint would save last.ckpt here if this callback never saved: the main one did
