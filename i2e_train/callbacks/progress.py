"""The training progress bar, showing the step loss without a host read every step."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepLossProgressBar"]


class StepLossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, plus the latest training loss read only when the bar refreshes.

    A metric logged with ``prog_bar=True`` and ``on_step=True`` is turned into a Python number
    by Lightning after every batch (``.item()``: on a GPU the host waits for the step to finish
    before it can queue the next one). ``SNNClassifier`` logs ``train/loss`` without
    ``prog_bar``; this bar reads the logged step value (``trainer.callback_metrics[loss_key]``,
    still a device tensor) once per ``refresh_rate`` batches instead, as ``loss``.
    """

    def __init__(self, refresh_rate: int = 10, process_position: int = 0, leave: bool = False,
                 loss_key: str = "train/loss_step") -> None:  # fmt: skip
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.loss_key = loss_key

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Close the open bars now: left open, each prints its last state when the process exits,
        after the entry point's one-line error."""
        for bar in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar,
                    self._predict_progress_bar):
            if bar is not None and not getattr(bar, "disable", True):
                bar.close()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(self.loss_key) if trainer.training else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            items["loss"] = f"{loss.item():.4g}"  # one host read per refresh
        return items
