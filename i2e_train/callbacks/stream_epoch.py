"""Tell a streaming training set which epoch it is (Lightning calls ``set_epoch`` on samplers only).

A ``datasets`` stream reshuffles its shards and its shuffle buffer from ``seed + epoch``; without
this callback every epoch would see the same order. Map-style sets are ordered by their sampler
(`i2e_train.data.sampler`) and are left alone.
"""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from torch.utils.data import IterableDataset

__all__ = ["StreamEpoch"]


class StreamEpoch(Callback):
    """``set_epoch(current_epoch)`` on every iterable training dataset at the start of each epoch
    (before the epoch's iterator is made; ``datasets`` shares the value with persistent workers)."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.train_dataloader
        if loaders is None:
            return
        flat = loaders if isinstance(loaders, (list, tuple)) else list(loaders.values()) if isinstance(loaders, dict) \
            else [loaders]
        for loader in flat:
            dataset = getattr(loader, "dataset", None)
            if isinstance(dataset, IterableDataset) and callable(getattr(dataset, "set_epoch", None)):
                dataset.set_epoch(trainer.current_epoch)
