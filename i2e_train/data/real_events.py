"""RealEventsDataModule: N-MNIST, N-Caltech101 or CIFAR10-DVS recordings as frames, read through tonic.

The sim-to-real targets of the released I2E configs with a real twin (the catalog's ``twin``):
N-MNIST <-> I2E-MNIST, N-Caltech101 <-> I2E-Caltech101, CIFAR10-DVS <-> I2E-CIFAR10. Reading,
binning and the frame cache are ``i2e_train.data.recordings``: T frames of equal event count,
counts per pixel, channel 0 = ON, built once by ``prepare_data`` and read from disk afterwards.

Spatial size, from the frame grid of a recording to the twin's resolution (``spatial``):

- ``"crop"`` (N-MNIST, 34x34 -> 32x32): the centre, rows and columns 1..32, as
  ``tonic.transforms.CenterCrop`` places it (offset (34 - 32) // 2 = 1). Counts stay integer
  and the digit keeps its scale: N-MNIST shows each 28x28 MNIST digit at about one sensor pixel
  per image pixel, the 6-pixel margin is saccade motion; resizing 34 -> 32 would shrink the
  digit further below I2E-MNIST's (28 -> 32 upsampled). Events in the 1-pixel border still count
  when the frames are sliced (slices are made over all events of the recording).
- ``"area"`` (N-Caltech101, each recording as large as its image was shown, about 240x180 ->
  224x224): the whole extent is resampled to 224x224, the aspect ratio not kept, as
  I2E-Caltech101 resizes each whole image to 224x224. Each output pixel is the mean of the input
  counts under its footprint, weighted by overlap (an exact box filter, ``area_resize``), so a
  stretched axis (about 180 rows -> 224) leaves no empty rows (which scattering each event to
  one output pixel would) and values stay events per input pixel (no longer integers).
- ``"none"`` (CIFAR10-DVS): 128x128 as recorded.

Labels are the twin's class indices, matched by class name (``align_classes``): the recordings'
class folder names against the twin's names (the catalog's ``class_names``, or
``twin_classes``). Recorded classes that the twin lacks must be listed in ``exclude_classes``
(N-Caltech101's BACKGROUND_Google; their recordings are left out and counted in the log), twin
classes without recordings in ``absent_classes`` (N-Caltech101 has no "Faces"); any other
mismatch is an error listing the names.

Splits (``split``): ``"official"`` (N-MNIST's Train / Test folders -> train / validation),
``"stratified"`` (seeded, ``val_fraction`` per class; N-Caltech101 has no official split),
``"per_class"`` (the paper's CIFAR10-DVS cut: per class, in path order, the first
ceil(train_ratio * n) recordings train, the rest validate; ``per_class_split``).

Batches: the loader gives (frames [B, T, 2, H, W] uint16 counts (float32 with spatial=area), labels int64 [B]);
``on_after_batch_transfer`` makes them [T, B, 2, H, W] on the device (optionally augmented in
training with ``EventAugment``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from i2e_train.data.event_augment import build_event_augment
from i2e_train.data.base import EventDataModule, resolve_info
from i2e_train.data.recordings import SOURCES, FrameCache, Recording, load_frames
from i2e_train.data.splits import per_class_split, stratified_split

__all__ = ["RealEventsDataModule", "FrameDataset", "align_classes", "area_resize", "centre_crop", "to_size",
           "ClassMatchError", "SPATIAL", "SPLITS"]

log = logging.getLogger(__name__)

SPATIAL = ("crop", "area", "none")
SPLITS = ("official", "stratified", "per_class")


class ClassMatchError(ValueError):
    """The recordings' class names and the twin's do not match."""


def align_classes(recorded: Sequence[str], twin: Sequence[str], exclude: Sequence[str] = (),
                  absent: Sequence[str] = (), where: str = "recordings") -> dict[str, int]:
    """Recorded class name -> the twin's class index, by name (exact match).

    ``exclude``: recorded classes to leave out (not in the twin). ``absent``: twin classes known
    to have no recordings. Any other unmatched name, on either side, raises ClassMatchError.
    """
    twin = [str(n) for n in twin]
    dup = sorted(n for n, k in Counter(twin).items() if k > 1)
    if dup:
        raise ClassMatchError(f"{where}: the twin's class names repeat {dup}")
    recorded_set, twin_set = {str(n) for n in recorded}, set(twin)
    both = sorted(set(exclude) & twin_set) + sorted(set(absent) & recorded_set)
    if both:
        raise ClassMatchError(f"{where}: {both} listed in exclude_classes / absent_classes but present on the other "
                              "side too; list only names that really do not match")
    unknown = sorted(recorded_set - twin_set - set(exclude))
    missing = sorted(twin_set - recorded_set - set(absent))
    if unknown or missing:
        raise ClassMatchError(
            f"{where}: class names do not match the twin's. Recorded classes not among the twin's: {unknown}; "
            f"twin classes without recordings: {missing}. Leave recorded classes out with "
            f"data.exclude_classes=[...], declare twin classes without recordings with data.absent_classes=[...], "
            f"or give the twin's class order with data.twin_classes=[...].")
    index = {n: i for i, n in enumerate(twin)}
    return {n: index[n] for n in sorted(recorded_set) if n in index}


# --------------------------------------------------------------------------- spatial size
@functools.lru_cache(maxsize=256)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input cells and weights of each output cell: (index int64 [n_out, K], weight float32 [n_out, K]).

    Output cell i covers [i, i + 1) * n_in / n_out in input coordinates; its weights are the
    overlaps with input cells [j, j + 1), divided by the cell width, so they sum to 1.
    """
    scale = n_in / n_out
    lo = np.arange(n_out, dtype=np.float64)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in, dtype=np.float64)[None, :]
    weights = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None) / scale  # [n_out, n_in]
    k = int((weights > 0).sum(1).max())
    index = np.argsort(weights <= 0, axis=1, kind="stable")[:, :k]  # the covered cells, in input order
    return index, np.take_along_axis(weights, index, 1).astype(np.float32)


def area_resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[..., h, w] counts -> float32 [..., H, W]: each output pixel is the overlap-weighted mean of the
    input pixels under its footprint (exact box filter; columns first, then rows, float32 sums in
    input order)."""
    h, w = frames.shape[-2:]
    out = np.ascontiguousarray(frames, dtype=np.float32)
    for axis, n_in, n_out in ((-1, w, size[1]), (-2, h, size[0])):  # columns, then rows
        if n_in == n_out:
            continue
        index, weight = _area_taps(n_in, n_out)
        shape = (n_out, 1) if axis == -2 else (n_out,)
        acc = np.take(out, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
        for k in range(1, index.shape[1]):
            acc += np.take(out, index[:, k], axis=axis) * weight[:, k].reshape(shape)
        out = acc
    return out


def centre_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centre ``size`` of [..., h, w], offsets ((h - H) // 2, (w - W) // 2) (tonic's CenterCrop)."""
    h, w = frames.shape[-2:]
    if h < size[0] or w < size[1]:
        raise ValueError(f"cannot crop {h}x{w} frames to {size[0]}x{size[1]}")
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return frames[..., top:top + size[0], left:left + size[1]]


def to_size(frames: np.ndarray, size: tuple[int, int], spatial: str, where: str = "frames") -> np.ndarray:
    """uint16 counts [T, 2, h, w] -> [T, 2, H, W] by ``spatial`` ("crop", "area", "none"): the counts
    as they are (uint16: half the bytes of float32 to the device, which converts them) for "crop" and
    "none", float32 means for "area"."""
    if spatial == "area":
        return area_resize(frames, size)
    if spatial == "crop":
        frames = centre_crop(frames, size)
    elif tuple(frames.shape[-2:]) != tuple(size):
        raise ValueError(f"{where}: frames of {frames.shape[-2]}x{frames.shape[-1]}, expected {size[0]}x{size[1]} "
                         "(spatial=none); use spatial=crop or spatial=area")
    return np.ascontiguousarray(frames)


class FrameDataset(Dataset):
    """Cached frame files -> (frames [T, 2, H, W], label): read, brought to ``size`` by ``spatial``
    (uint16 counts, or float32 with spatial="area"; see `to_size`)."""

    def __init__(self, files: Sequence[str | os.PathLike], targets: Sequence[int], size: tuple[int, int],
                 spatial: str) -> None:
        self.files, self.targets = [str(f) for f in files], [int(t) for t in targets]
        self.size, self.spatial = tuple(size), spatial

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        frames = to_size(load_frames(self.files[i]), self.size, self.spatial, self.files[i])
        return torch.from_numpy(frames), self.targets[i]


class RealEventsDataModule(EventDataModule):
    """Real recordings (N-MNIST, N-Caltech101, CIFAR10-DVS) as frames through tonic (module docstring).

    Args:
        name: "N-MNIST", "N-Caltech101" or "CIFAR10-DVS" (``recordings.SOURCES``).
        root: the folder the recordings lie under (tonic's ``save_to`` for N-MNIST / N-Caltech101,
            the CIFAR10-DVS root holding ``extract/``); nothing is ever downloaded.
        cache_dir: where the frames are cached; None = ``<root>/tonic_frames/<name>_T<timesteps>``.
        timesteps: frames per sample (T).
        num_classes: checked against the catalog (the twin's class count).
        resolution: checked against the catalog (the twin's resolution).
        spatial: "crop", "area" or "none" (frame grid -> resolution).
        split: "official", "stratified" or "per_class".
        val_fraction: the stratified split's validation fraction.
        seed: the stratified split's seed (None: 0 for the split, the run's seed for the
            training order).
        train_ratio: the per-class split's training fraction.
        twin_classes: the twin's class names by label index; None = the catalog's.
        exclude_classes: declared class mismatches: recorded classes left out (see ``align_classes``).
        absent_classes: declared class mismatches: twin classes with no recordings (see ``align_classes``).
        batch_size: the GLOBAL batch; under DDP each process loads batch_size / world_size.
        num_workers: the DataLoaders' worker processes.
        pin_memory: the DataLoaders' ``pin_memory``.
        drop_last: drop the last incomplete training batch.
        augment: event augmentation in training: a list of data/event_augment.py entries (e.g.
            [nda, event_drop]) or the legacy {crop_padding: 4, hflip: 0.5}; None = none.
        build_workers: processes that build the frame cache (0 = this process); progress: a bar.
    """

    def __init__(self, name: str = "N-MNIST", root: str = "data/nmnist", cache_dir: str | None = None,
                 timesteps: int = 8, num_classes: int | None = None, resolution: Sequence[int] | None = None,
                 spatial: str = "crop", split: str = "official", val_fraction: float = 0.1, train_ratio: float = 0.9,
                 seed: int | None = None, twin_classes: Sequence[str] | None = None,
                 exclude_classes: Sequence[str] = (), absent_classes: Sequence[str] = (), batch_size: int = 32,
                 num_workers: int = 4, pin_memory: bool = True, drop_last: bool = False,
                 augment: Any = None, build_workers: int = 0, progress: bool = True) -> None:
        if name not in SOURCES:
            raise ValueError(f"unknown recordings {name!r}; known: {', '.join(SOURCES)}")
        info = resolve_info(name, num_classes, resolution, kind="dvs")
        super().__init__(dataclasses.replace(info, timesteps=int(timesteps)), batch_size, num_workers, pin_memory,
                         drop_last, seed)
        for key, value, allowed in (("spatial", spatial, SPATIAL), ("split", split, SPLITS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        self.source = SOURCES[name]
        self.root = Path(os.path.expanduser(str(root)))
        cache = Path(cache_dir) if cache_dir else self.root / "tonic_frames" / f"{name}_T{int(timesteps)}"
        self.cache = FrameCache(cache, name, int(timesteps))
        self.spatial, self.split = spatial, split
        self.val_fraction, self.train_ratio = float(val_fraction), float(train_ratio)
        self.twin_classes = list(twin_classes) if twin_classes is not None else list(info.class_names)
        if len(self.twin_classes) != self.num_classes:
            raise ValueError(f"{name}: {len(self.twin_classes)} twin class names for {self.num_classes} classes")
        self.exclude_classes, self.absent_classes = list(exclude_classes), list(absent_classes)
        self.augment = build_event_augment(augment, self.info.num_classes)
        self.build_workers, self.progress = int(build_workers), bool(progress)
        self.class_names = list(self.twin_classes)
        self.recordings: list[Recording] = []  # those served (excluded classes left out), path order
        self.targets: list[int] = []

    # ---- building (once, cached on disk)
    def prepare_data(self) -> None:
        recordings, reader = self.source.open(self.root)
        built = self.cache.build(recordings, reader, self.source, self.build_workers, self.progress)
        if built:
            log.info("%s: binned %d recordings into %s", self.info.name, built, self.cache.folder)

    def _served(self) -> tuple[list[Recording], list[int]]:
        recordings, _ = self.source.open(self.root)
        self.cache.check(recordings)
        where = f"{self.info.name} under {self.source.folder(self.root)} (twin {self.info.twin})"
        mapping = align_classes([r.label for r in recordings], self.twin_classes, self.exclude_classes,
                                self.absent_classes, where)
        left_out = Counter(r.label for r in recordings if r.label not in mapping)
        if left_out:
            log.info("%s: left out the recordings of %s (data.exclude_classes)", self.info.name, dict(left_out))
        kept = [r for r in recordings if r.label in mapping]
        return kept, [mapping[r.label] for r in kept]

    def _split(self, recordings: list[Recording], targets: list[int]) -> tuple[list[int], list[int]]:
        if self.split == "official":
            splits = {r.split for r in recordings}
            if splits != {"train", "test"}:
                raise ValueError(f"{self.info.name} has no official train/test split (found {sorted(splits)}); use "
                                 "data.split=stratified or per_class")
            train = [i for i, r in enumerate(recordings) if r.split == "train"]
            return train, [i for i, r in enumerate(recordings) if r.split == "test"]
        if self.split == "per_class":
            return per_class_split(targets, self.train_ratio, self.num_classes)
        train, val = stratified_split(np.asarray(targets), self.val_fraction, getattr(self, "seed", 0))
        return train.tolist(), val.tolist()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.recordings, self.targets = self._served()
        train, val = self._split(self.recordings, self.targets)
        if not train:
            raise ValueError(f"{self.info.name}: no training recordings under {self.source.folder(self.root)}")
        if not val:
            how = (f"data.train_ratio={self.train_ratio} leaves none of each class's" if self.split == "per_class"
                   else f"data.val_fraction={self.val_fraction} leaves none of the" if self.split == "stratified"
                   else "the official test folder holds no")
            raise ValueError(
                f"{self.info.name}: no validation recordings under {self.source.folder(self.root)}: {how} "
                f"{len(self.recordings)} recording(s) for validation, so the run would have no validation, no best "
                "checkpoint and no metrics. Add recordings, or lower data.train_ratio / raise data.val_fraction")
        for key, rows in (("train", train), ("validation", val)):
            self.datasets[key] = FrameDataset([self.cache.path(self.recordings[i]) for i in rows],
                                              [self.targets[i] for i in rows], self.resolution, self.spatial)
        log.info("%s: %d train / %d validation recordings (split=%s), frames %s -> %dx%d by %s", self.info.name,
                 len(train), len(val), self.split, self.cache.folder, *self.resolution, self.spatial)

    # ---- device side
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        return self.frames_to_events(batch)  # [B, T, C, H, W] counts -> [T, B, C, H, W]
