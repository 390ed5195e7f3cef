"""Validation samples as event animations and the confusion matrix, logged to Weights & Biases."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from i2e_train.tracking import find_wandb_logger

__all__ = ["EventMediaLogger"]

log = logging.getLogger(__name__)


class EventMediaLogger(Callback):
    """Validation samples as event-stream animations and the confusion matrix, to wandb.

    Only active when a ``WandbLogger`` is attached (otherwise it does nothing, not even
    keep a batch). The first ``num_samples`` samples of the first validation batch become GIF
    videos (``media/val_events``: one frame per time step, ON red / OFF blue, drawn by
    `i2e_train.viz.event_frames`, ``fps`` frames per second) captioned with the label and
    the prediction; the confusion matrix of the epoch (``pl_module.last_confusion``) is drawn by
    `i2e_train.plots.plot_confusion` (``media/confusion_matrix``). Every
    ``every_n_epochs`` validation epochs, on rank 0, never during the sanity check.
    """

    def __init__(self, num_samples: int = 4, fps: float = 4.0, min_side: int = 128, confusion: bool = True,
                 every_n_epochs: int = 1) -> None:
        self.num_samples = int(num_samples)
        self.fps = float(fps)
        self.min_side = int(min_side)
        self.confusion = bool(confusion)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self._events: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._preds: torch.Tensor | None = None
        self._hook = None

    def _active(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking or find_wandb_logger(trainer) is None:
            return False
        if trainer.state.fn is not None and trainer.state.fn.value == "fit":
            return trainer.current_epoch % self.every_n_epochs == 0
        return True

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or self.num_samples <= 0 or not self._active(trainer):
            return
        n = self.num_samples

        def grab(module, inputs, output):
            if torch.is_tensor(output) and output.dim() == 2 and self._preds is None:
                self._preds = output[:n].detach().argmax(-1).cpu()

        self._preds = None
        self._hook = pl_module.register_forward_hook(grab)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if batch_idx != 0 or dataloader_idx != 0 or self.num_samples <= 0 or not self._active(trainer):
            return
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and torch.is_tensor(batch[0]) and batch[0].dim() == 5:
            self._events = batch[0][:, : self.num_samples].detach().cpu()  # [T, n, C, H, W]
            self._labels = batch[1][: self.num_samples].detach().cpu()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            if self._active(trainer) and trainer.is_global_zero:
                self._log(trainer, pl_module)
        finally:
            self._events = self._labels = self._preds = None

    def _gif(self, events: torch.Tensor) -> io.BytesIO:
        from PIL import Image

        from i2e_train.viz import event_frames

        frames = event_frames(events > 0, scale=None, min_side=self.min_side)  # [T, H, W, 3] uint8
        images = [Image.fromarray(f).convert("P", palette=Image.ADAPTIVE, colors=16) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000 / self.fps)), loop=0)
        buf.seek(0)
        return buf

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import numpy as np
        import wandb
        from PIL import Image

        wb = find_wandb_logger(trainer)
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        names = list(names) if names else None

        def label(i: int) -> str:
            return names[i] if names and 0 <= i < len(names) else str(i)

        media: dict[str, Any] = {}
        if self._events is not None and self._events.shape[2] == 2:
            videos = []
            for k in range(self._events.shape[1]):
                caption = f"label {label(int(self._labels[k]))}"
                if self._preds is not None and k < len(self._preds):
                    caption += f" | predicted {label(int(self._preds[k]))}"
                videos.append(wandb.Video(self._gif(self._events[:, k]), caption=caption, format="gif"))
            media["media/val_events"] = videos
        elif self._events is not None:
            log.info("EventMediaLogger: events have %d channels (expected ON/OFF = 2): no animation",
                     self._events.shape[2])
        cm = getattr(pl_module, "last_confusion", None)
        if self.confusion and cm is not None:
            import tempfile

            from i2e_train.plots import plot_confusion

            with tempfile.TemporaryDirectory() as tmp:
                png = plot_confusion(np.asarray(cm), Path(tmp) / "confusion.png", class_names=names,
                                     title=f"validation, epoch {trainer.current_epoch}")
                with Image.open(png) as im:
                    media["media/confusion_matrix"] = wandb.Image(np.asarray(im.convert("RGB")))
        if media:
            wb.log_metrics(media, step=trainer.global_step)
