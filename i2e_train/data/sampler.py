"""Training order that survives an interruption: a function of (seed, epoch), resumable mid-epoch.

Lightning 2.6 restores the loop counters of a mid-epoch checkpoint (the resumed run continues
at batch k of epoch e) but not the data: a plain DataLoader starts its epoch again from the
beginning, with a permutation drawn from the (re-seeded, not restored) global RNG, so batches
are repeated and others never seen. Here the permutation of epoch e is
``randperm(n, seed + e)`` (torch's DistributedSampler recipe, one rank's share of it), and the
DataModule's ``state_dict`` (saved by Lightning in every checkpoint) records the epoch and the
number of batches already trained; on resume the sampler of that epoch starts after them.

``ResumableSampler`` is a ``DistributedSampler``, so Lightning never replaces it under DDP; it
splits the epoch's permutation between ranks itself. Its ``generator`` is handed to the
DataLoader: the workers' base seed is then a function of (seed, epoch) too, never a draw from
the global RNG (which ``i2e_train.callbacks.RestoreRNGState`` restores exactly).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = ["ResumableSampler", "ResumableTrainData"]

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Shuffled indices of one epoch for one rank, ``randperm(len(dataset), seed + epoch)``
    padded (or, with ``drop_last``, cut) to a multiple of ``num_replicas`` and strided by rank
    (as ``DistributedSampler``; the DataModules' training loaders cut, as the official scripts).

    ``resume_at(epoch, samples)`` makes the next iteration of ``epoch`` skip its first
    ``samples`` indices (this rank's), once.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, tag_epoch: bool = False, drop_last: bool = False) -> None:
        # drop_last: drop the epoch's tail that does not split evenly between ranks (the official
        # scripts' DistributedSampler(train, drop_last=True)) instead of repeating samples
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed),
                         drop_last=bool(drop_last))
        # tag_epoch: yield (index, epoch) pairs, for datasets that seed per-sample augmentation
        self.tag_epoch = bool(tag_epoch)
        self.generator = torch.Generator()  # the DataLoader's: worker base seeds per (seed, epoch)
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(int(epoch))
        mixed = np.random.SeedSequence([self.seed % 2**32, int(epoch), 0x5EED]).generate_state(1, np.uint64)[0]
        self.generator.manual_seed(int(mixed) % 2**63)

    def resume_at(self, epoch: int, samples: int) -> None:
        self._skip = (int(epoch), max(int(samples), 0))
        self.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] <= self.epoch:
            epoch, samples = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[samples:]
        if self.tag_epoch:
            return iter([(i, self.epoch) for i in indices])
        return iter(indices)


class ResumableTrainData:
    """Mixin for our LightningDataModules: their DataLoaders, a resumable training sampler and the
    data position in the DataModule's ``state_dict`` (which Lightning stores in every checkpoint).

    A DataModule using it has ``datasets`` ({"train", "validation"}), ``batch_size`` (global),
    ``num_workers``, ``pin_memory``, ``drop_last``, optionally ``seed``, and sets ``collate_fn``.
    """

    _resume_position: dict[str, Any] | None = None
    collate_fn: Callable | None = None  # how the loader stacks items (None: torch's default)

    def _loader(self, key: str, train: bool) -> DataLoader:
        from i2e_train.data.distributed import per_device_batch_size

        if not self.datasets:
            self.setup()
        ds = self.datasets[key]
        batch_size = per_device_batch_size(self.batch_size, self.trainer)
        # training order: a function of (seed, epoch), resumable mid-epoch; a stream keeps its own
        streaming = isinstance(ds, IterableDataset)
        order = self._train_sampling(ds, batch_size, getattr(self, "seed", None)) if train and not streaming \
            else {"shuffle": False}
        return DataLoader(
            ds,
            batch_size=batch_size,
            **order,
            num_workers=self.num_workers,
            collate_fn=type(self).collate_fn,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=self.drop_last and train,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def _train_sampling(self, dataset: Dataset, batch_size: int, seed: int | None = None) -> dict[str, Any]:
        """DataLoader keyword arguments (sampler, generator, shuffle) of the training loader."""
        trainer = getattr(self, "trainer", None)
        world, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
        if seed is None:  # seed_everything's seed (the run's), else 0
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(dataset, seed=seed, num_replicas=world, rank=rank,
                                   tag_epoch=bool(getattr(dataset, "wants_epoch", False)), drop_last=True)
        pos, self._resume_position = self._resume_position, None
        if pos:
            if pos.get("world_size") != world or pos.get("batch_size") != batch_size:
                log.warning(
                    "resuming with %d process(es) x batch %d, the checkpoint was written with %s x %s: the data "
                    "position of the interrupted epoch is only approximately restored",
                    world, batch_size, pos.get("world_size"), pos.get("batch_size"))
            sampler.resume_at(pos["epoch"], int(pos["batches"]) * batch_size)
            # Lightning warns that a plain DataLoader cannot resume mid-epoch: this one does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            log.info("data position restored: epoch %d continues after %d batch(es)", pos["epoch"], pos["batches"])
        return {"sampler": sampler, "generator": sampler.generator, "shuffle": False}

    def _position_state(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or getattr(trainer.state, "fn", None) != "fit":
            return {}
        from i2e_train.data.distributed import per_device_batch_size

        # batches trained in the epoch in progress (none when saved after an epoch completed, e.g. at train end)
        epochs = trainer.fit_loop.epoch_progress.current
        in_progress = epochs.started > epochs.completed
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if in_progress else 0
        return {"data_position": {"epoch": int(trainer.current_epoch), "batches": int(done),
                                  "batch_size": per_device_batch_size(self.batch_size, trainer),
                                  "world_size": int(trainer.world_size)}}

    def _load_position_state(self, state: dict[str, Any]) -> None:
        self._resume_position = state.get("data_position") or None

    def state_dict(self) -> dict[str, Any]:
        return self._position_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_position_state(state_dict)
