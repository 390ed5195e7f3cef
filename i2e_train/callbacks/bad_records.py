"""Records dropped under ``data.on_bad_record=skip``: counted, logged, written to the run folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from i2e_train.files import atomic_write_json

__all__ = ["BadRecordsReport"]

log = logging.getLogger(__name__)


class BadRecordsReport(Callback):
    """Counts of the records dropped under ``on_bad_record='skip'``: logged as
    ``data/bad_records`` at every training epoch end (summed over processes) and written to
    ``<output_dir>/bad_records.json`` (every epoch end, fit end, and when the run fails).

    The DataModule's ``bad_records`` (a ``BadRecordCounter``) is filled in the main process from
    the messages that travel with each batch, so counts from DataLoader workers are not lost.
    Under DDP the ranks' counters are merged at fit end (one ``all_gather_object``; the file of
    earlier epochs holds rank 0's share) and rank 0 writes. No collective runs in epoch hooks:
    rank 0 alone syncs metrics for its progress bar there, and a collective of ours in between
    would pair with the wrong one.
    """

    filename = "bad_records.json"

    def __init__(self, output_dir: str | os.PathLike | None = None) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)

    @staticmethod
    def _counter(trainer: Trainer):
        dm = trainer.datamodule
        if dm is None or getattr(dm, "on_bad_record", "raise") != "skip":
            return None
        return getattr(dm, "bad_records", None)

    def _merged(self, trainer: Trainer, counter) -> dict[str, Any]:
        state = counter.state_dict()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
            merged = type(counter)()
            for s in states:
                merged.load_state_dict(s)
            return merged.report()
        return counter.report()

    def _write(self, trainer: Trainer, report: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        out = self.output_dir or Path(trainer.default_root_dir)
        atomic_write_json(out / self.filename, report, indent=1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counter = self._counter(trainer)
        if counter is None:
            return
        pl_module.log("data/bad_records", float(counter.total), reduce_fx="sum", sync_dist=True)
        self._write(trainer, counter.report())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counter = self._counter(trainer)
        if counter is None:
            return
        report = self._merged(trainer, counter)
        self._write(trainer, report)
        if report["total"] and trainer.is_global_zero:
            log.warning("%d bad record(s) were skipped (%s); see %s", report["total"], report["counts"],
                        (self.output_dir or Path(trainer.default_root_dir)) / self.filename)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        counter = self._counter(trainer)
        if counter is not None:  # no collectives here: another rank may be gone
            self._write(trainer, counter.report())
