"""Learning curves (loss and top-1 per epoch) as a PNG at the end of fit."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from i2e_train.tracking import find_wandb_logger

__all__ = ["LearningCurves"]

log = logging.getLogger(__name__)


class LearningCurves(Callback):
    """At the end of fit (rank 0): ``<output_dir>/learning_curves.png`` (train / validation loss
    and top-1 per epoch) drawn from the ``CSVLogger``'s ``metrics.csv``; also logged to wandb
    (``plots/learning_curves``) when attached. Does nothing without a CSV logger."""

    def __init__(self, output_dir: str | Path | None = None, filename: str = "learning_curves.png") -> None:
        self.output_dir = output_dir
        self.filename = filename

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.loggers import CSVLogger

        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            log.info("LearningCurves: no CSV logger attached (logger=csv or logger=many): no learning curves")
            return
        csv_logger.save()  # flush what is buffered
        metrics = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics.is_file():
            return
        from i2e_train.plots import plot_learning_curves

        png = plot_learning_curves(metrics, (Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir)) / self.filename)
        log.info("learning curves: %s", png)
        wb = find_wandb_logger(trainer)
        if wb is not None:
            wb.log_image("plots/learning_curves", [str(png)], step=trainer.global_step)
