"""What every DataModule shares: the data's facts, the errors, and the loaders.

A DataModule of i2e-train is an `EventDataModule`: it holds ``info`` (a catalog
`DatasetInfo`: resolution, classes, T, converter ratio), fills
``datasets`` ({"train", "validation"}) in ``setup``, and turns every batch into
``(events [T, B, C, H, W], targets int64 [B])`` on the training device in
``on_after_batch_transfer``. Loaders, the resumable training order and the global-batch rule
come from `ResumableTrainData`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from lightning import LightningDataModule

from i2e_train.data.catalog import CATALOG, DatasetInfo, check_facts
from i2e_train.data.sampler import ResumableTrainData
from i2e_train.naming import unknown_name

__all__ = ["EventDataModule", "DatasetUnavailableError", "DataFileError", "as_size", "resolve_info"]


class DatasetUnavailableError(FileNotFoundError):
    """The requested data is neither local nor reachable (the message says what to place where)."""


class DataFileError(ValueError):
    """A data file that is not a readable I2E parquet file (corrupt, truncated, other columns)."""


def as_size(value: int | Sequence[int], what: str = "resolution") -> tuple[int, int]:
    """H or [H, W] (or [H]) -> (H, W); anything else is a ValueError naming ``what``."""
    if isinstance(value, (int, np.integer)):
        out = (int(value), int(value))
    else:
        out = tuple(int(v) for v in value)
        if len(out) == 1:
            out = out * 2
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{what} must be a positive size H or [H, W], got {value!r}")
    return out  # type: ignore[return-value]


def resolve_info(name: str, num_classes: int | None = None, resolution: int | Sequence[int] | None = None,
                 timesteps: int | None = None, *, kind: str = "i2e", own: bool = True,
                 need: str = "num_classes and resolution") -> DatasetInfo:
    """The catalog entry ``name``, checked against the facts a config states (None = not stated).

    A name outside the catalog is data of your own: with ``own`` and both ``num_classes`` and
    ``resolution`` given, a new entry of ``kind`` is made; otherwise a KeyError lists the
    catalog and says what to give (``need``). Real-DVS entries are refused unless ``kind="dvs"``.
    """
    res = None if resolution is None else as_size(resolution)
    info = CATALOG.get(name)
    if info is None:
        if not own or num_classes is None or res is None:
            err = unknown_name("dataset config", name, CATALOG, error=KeyError)
            raise KeyError(f"{err.args[0]}\nFor data of your own, give {need}.") from None
        return DatasetInfo(name=name, source="local", resolution=res, num_classes=int(num_classes),
                           timesteps=int(timesteps or 8), ratio=None, kind=kind, hub_repo=None)
    if info.kind == "dvs" and kind != "dvs":
        raise ValueError(f"{name} is real event-sensor data: use data=cifar10dvs, cifar10dvs_tonic, nmnist or "
                         "ncaltech101 (CIFAR10DVSDataModule / RealEventsDataModule)")
    return check_facts(info, num_classes, res, timesteps)


class EventDataModule(ResumableTrainData, LightningDataModule):
    """Base class: facts (``info``), datasets per split, loaders (see the module docstring).

    Args:
        info: the data's facts.
        batch_size: the GLOBAL batch; under DDP each process loads batch_size / world_size.
        num_workers, pin_memory, drop_last: the DataLoaders'.
        seed: the training order is a function of (seed, epoch); None = the run's seed.
    """

    def __init__(self, info: DatasetInfo, batch_size: int, num_workers: int, pin_memory: bool,
                 drop_last: bool = False, seed: int | None = None) -> None:
        super().__init__()
        self.info = info
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.pin_memory, self.drop_last = bool(pin_memory), bool(drop_last)
        if seed is not None:
            self.seed = int(seed)
        self.datasets: dict = {}
        self.class_names: list[str] = []

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Event tensor shape of one sample, (T, C, H, W)."""
        return self.info.shape

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def resolution(self) -> tuple[int, int]:
        return self.info.resolution

    def frames_to_events(self, batch) -> tuple:
        """A loader batch of real-recording frames, (counts [B, T, C, H, W], targets [B]), as
        (events [T, B, C, H, W] float32, targets int64), with ``self.augment`` in training."""
        frames, targets = batch
        if frames.dim() != 5 or tuple(frames.shape[1:]) != self.shape:
            expected = ", ".join(map(str, self.shape))
            raise ValueError(f"{self.info.name}: frames of shape {tuple(frames.shape)}, expected [B, {expected}]")
        # integer counts cross to the device as they are and become float32 here, in one copy
        events = frames.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)  # [T, B, C, H, W]
        from i2e_train.data.event_augment import augment_batch

        return augment_batch(self, events, targets.long())  # training only
