"""CIFAR10DVSDataModule: real DVS recordings as SpikingJelly frames (the transfer targets).

Data: ``spikingjelly.datasets.cifar10_dvs.CIFAR10DVS(root, data_type="frame",
frames_number=8, split_by="number")``: each recording's events are cut into 8 slices of equal
event count and integrated per pixel and polarity, so a sample is float32 event *counts*
[T=8, 2, 128, 128] (not binarised). SpikingJelly integrates every recording once and caches
the frames under ``<root>/frames_number_8_split_by_number/<class>/*.npz``.
Its integration threads read the recordings one at a time (``load_events_serialised``): CPython
3.11's AST constructor, which np.load's header parse goes through, is not safe across threads.

Split: 9:1 per class, as the paper (SpikingJelly's ``split_to_train_test_set(0.9, dataset, 10)``
with ``random_split=False``): per class, the first ceil(0.9 * n) indices of that class in
dataset order go to training, the rest to validation. It is computed here from the dataset's
file list (``samples`` / ``targets``), never by loading every sample.

Getting the data on a machine without network (SpikingJelly downloads whenever
``<root>/events_np`` is missing; this module never does):
- ``<root>/extract/<class>/*.aedat``: the extracted AEDAT 2.0 recordings (10 class folders,
  airplane ... truck); ``events_np`` is created from them with
  ``CIFAR10DVS.create_raw_from_extracted``;
- or ``<root>/download/<class>.zip``: the 10 zips from figshare (the names SpikingJelly lists
  in ``CIFAR10DVS.resource_url_md5``); SpikingJelly extracts them into ``extract`` first;
- or an already built ``<root>/events_np`` (copied from another machine).
While ``events_np`` is being built a marker ``<root>/events_np.building`` exists; a build that
was killed leaves it behind, and this module then stops with a message saying so.

Batches: the loader gives (frames [B, T, 2, H, W] float32, labels int64 [B]);
``on_after_batch_transfer`` makes them [T, B, 2, H, W] on the device (optionally augmented
in training with ``EventAugment``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Subset

from i2e_train.data.event_augment import build_event_augment
from i2e_train.data.base import DatasetUnavailableError, EventDataModule, resolve_info
from i2e_train.data.catalog import CIFAR10_CLASSES
from i2e_train.data.splits import per_class_split

__all__ = ["CIFAR10DVSDataModule", "build_events_np", "frames_dir_name", "DVSDatasetError", "CLASS_NAMES",
           "load_events_serialised"]

log = logging.getLogger(__name__)

CLASS_NAMES = CIFAR10_CLASSES  # alphabetical, as CIFAR-10's; the catalog holds them
_NAME = "CIFAR10-DVS"


class DVSDatasetError(DatasetUnavailableError):
    """CIFAR10-DVS is missing, half-built or blocked by a stale build marker."""


# SpikingJelly integrates the frames in a pool of threads (SJ_MAX_THREADS_NUMBER_FOR_DATASETS_PREPROCESS,
# 16 by default), each reading its recording with np.load, which parses the .npy header with
# ast.literal_eval. CPython 3.11 (seen on 3.11.7) keeps the AST constructor's recursion counter in
# state shared by all threads (python/cpython#106905): when a garbage collection inside one parse runs
# a finalizer and the interpreter switches threads, another thread's parse resets the counter and the
# first fails with "SystemError: AST constructor recursion depth mismatch". Reading one recording at a
# time avoids it; the integration and the compressed writes, where the time goes, still run in parallel.
_EVENTS_READ_LOCK = threading.Lock()


def load_events_serialised(path) -> Any:
    """SpikingJelly's events loader (dict of t, x, y, p arrays), one file at a time across threads."""
    from spikingjelly.datasets.base import _load_events

    with _EVENTS_READ_LOCK:
        return _load_events(path)


@functools.cache
def _cifar10dvs_class():
    """SpikingJelly's CIFAR10DVS whose frame builder reads the recordings with ``load_events_serialised``.

    Made on first use, so importing this module does not import SpikingJelly; the module's
    ``__getattr__`` hands out this one class, which is how pickle finds it (spawned workers, DDP)."""
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

    class SerialisedReadCIFAR10DVS(CIFAR10DVS):
        def get_dataset_builder(self):
            builder = super().get_dataset_builder()
            if hasattr(builder, "_event_loader"):  # the frame builders; the events builder reads nothing
                builder._event_loader = load_events_serialised  # instance attribute: called unbound
            return builder

    SerialisedReadCIFAR10DVS.__module__ = __name__
    SerialisedReadCIFAR10DVS.__qualname__ = SerialisedReadCIFAR10DVS.__name__
    return SerialisedReadCIFAR10DVS


def __getattr__(name: str):
    if name == "SerialisedReadCIFAR10DVS":
        return _cifar10dvs_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def frames_dir_name(frames_number: int, split_by: str) -> str:
    """SpikingJelly's cache folder of integrated frames (FrameFixedNumberBuilder.processed_root)."""
    return f"frames_number_{frames_number}_split_by_{split_by}"


def _stale_marker_error(marker: Path, built: Path, sources: str) -> DVSDatasetError:
    return DVSDatasetError(
        f"{marker} exists: it is the marker SpikingJelly / i2e-train leave while {built.name}/ is being built "
        f"from {sources}, and it is still there because that build did not finish (killed, crashed, or still "
        f"running in another process). If no build is running, it is safe to delete it after a failed build: "
        f"delete {marker} and the partial {built}/ folder, then run again to rebuild."
    )


def _class_dirs_with_files(folder: Path) -> dict[str, int]:
    return {d.name: sum(1 for f in d.iterdir() if f.is_file()) for d in sorted(folder.iterdir()) if d.is_dir()}


def _check_class_tree(folder: Path, what: str) -> dict[str, int]:
    """Every entry is one of the 10 class folders, each non-empty: -> files per class."""
    strays = [p.name for p in folder.iterdir() if not p.is_dir() or p.name not in CLASS_NAMES]
    if strays:
        raise DVSDatasetError(f"{folder}: unexpected entries {sorted(strays)[:5]} in {what}; expected only the class "
                              f"folders {', '.join(CLASS_NAMES)}")
    counts = _class_dirs_with_files(folder)
    missing = [c for c in CLASS_NAMES if counts.get(c, 0) == 0]
    if missing:
        raise DVSDatasetError(f"{folder}: {what} is incomplete: class folder(s) {missing} missing or empty "
                              f"(expected {folder}/<class>/<files> for all of {', '.join(CLASS_NAMES)})")
    return counts


def _missing_data_error(root: Path) -> DVSDatasetError:
    zips = ", ".join(f"{c}.zip" for c in CLASS_NAMES)
    return DVSDatasetError(
        f"CIFAR10-DVS not found under {root} (no events_np/, extract/ or download/ folder; this module never "
        f"downloads). Put one of these there:\n"
        f"  {root}/extract/<class>/*.aedat   the extracted AEDAT 2.0 recordings, class folders "
        f"{', '.join(CLASS_NAMES)}\n"
        f"  {root}/download/<class>.zip      the 10 zips from https://figshare.com/articles/dataset/"
        f"CIFAR10-DVS_New/4724671 ({zips})\n"
        f"  {root}/events_np/<class>/*.npz   an events_np folder built by SpikingJelly elsewhere\n"
        f"or set data.root to where the dataset is."
    )


def build_events_np(root: str | Path, verify_md5: bool = True) -> Path:
    """Make ``<root>/events_np`` from ``extract/`` (or from the zips in ``download/``), offline.

    Returns the events_np folder. Does nothing when it exists (it is checked for completeness).
    A build that fails in this process removes what it wrote (events_np, and extract when it
    was extracted here) and its marker; a killed one leaves ``events_np.building`` behind.
    """
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

    root = Path(root)
    raw, extract, download = root / "events_np", root / "extract", root / "download"
    marker = root / "events_np.building"
    if marker.exists():
        raise _stale_marker_error(marker, raw, "extract/ or download/")
    if raw.is_dir():
        _check_class_tree(raw, "events_np (half-built? delete it and rebuild from extract/ or download/)")
        return raw
    if not extract.is_dir() and not download.is_dir():
        raise _missing_data_error(root)
    extracted_here = False
    if not extract.is_dir():
        expected = [name for name, _url, _md5 in CIFAR10DVS.resource_url_md5()]
        missing = [n for n in expected if not (download / n).is_file()]
        if missing:
            raise DVSDatasetError(f"{download}: missing {missing} (the 10 CIFAR10-DVS zips are needed; this module "
                                  "never downloads: fetch them where you have network and copy them here)")
        if verify_md5:
            from torchvision.datasets.utils import check_integrity

            for name, _url, md5 in CIFAR10DVS.resource_url_md5():
                if not check_integrity(str(download / name), md5):
                    raise DVSDatasetError(f"{download / name}: MD5 mismatch (expected {md5}): the file is corrupt or "
                                          "incomplete; download it again")
    root.mkdir(parents=True, exist_ok=True)
    marker.touch(exist_ok=False)
    try:
        if not extract.is_dir():
            extract.mkdir()
            extracted_here = True
            log.info("extracting %s into %s", download, extract)
            CIFAR10DVS.extract_downloaded_files(download, extract)
        _check_class_tree(extract, "extract")
        raw.mkdir()
        log.info("converting the AEDAT files of %s into %s", extract, raw)
        CIFAR10DVS.create_raw_from_extracted(extract, raw)
    except BaseException:
        shutil.rmtree(raw, ignore_errors=True)
        if extracted_here:
            shutil.rmtree(extract, ignore_errors=True)
        marker.unlink(missing_ok=True)
        raise
    marker.unlink()
    return raw


class CIFAR10DVSDataModule(EventDataModule):
    """CIFAR10-DVS as SpikingJelly frames, split 9:1 per class.

    Args:
        root: dataset folder (holds events_np/, or extract/ or download/ to build it from).
        frames_number: frames per sample (T).
        split_by: "number" (equal event counts) or "time".
        train_ratio: per-class training fraction (0.9, SpikingJelly's split_to_train_test_set).
        num_classes: checked against the catalog (10).
        resolution: checked against the catalog ([128, 128]).
        timesteps: checked against ``frames_number``.
        batch_size: the GLOBAL batch; under DDP each process loads batch_size / world_size.
        num_workers: the DataLoaders' worker processes.
        pin_memory: the DataLoaders' ``pin_memory``.
        drop_last: drop the last incomplete training batch.
        augment: event augmentation in training: a list of data/event_augment.py entries (e.g.
            [nda, event_drop]) or the legacy {crop_padding: 4, hflip: 0.5}; None (paper) = none.
        verify_md5: check the zips' MD5 before extracting them (download/ route).
    """

    def __init__(
        self,
        root: str = "data/cifar10dvs",
        frames_number: int = 8,
        split_by: str = "number",
        train_ratio: float = 0.9,
        num_classes: int = 10,
        resolution: Sequence[int] = (128, 128),
        timesteps: int = 8,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        drop_last: bool = False,
        augment: Any = None,
        verify_md5: bool = True,
    ) -> None:
        if int(timesteps) != int(frames_number):
            raise ValueError(f"data config for {_NAME}: timesteps={timesteps} but frames_number={frames_number} "
                             "(each frame is one timestep)")
        info = resolve_info(_NAME, num_classes, resolution, kind="dvs")
        super().__init__(dataclasses.replace(info, timesteps=int(frames_number)), batch_size, num_workers,
                         pin_memory, drop_last)
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        if not 0.0 < float(train_ratio) <= 1.0:
            raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}")
        self.root = Path(root)
        self.frames_number, self.split_by, self.train_ratio = int(frames_number), split_by, float(train_ratio)
        self.verify_md5 = bool(verify_md5)
        self.augment = build_event_augment(augment, self.info.num_classes)
        self.class_names = list(CLASS_NAMES)
        self.dataset = None  # the whole CIFAR10DVS DatasetFolder

    @property
    def frames_root(self) -> Path:
        return self.root / frames_dir_name(self.frames_number, self.split_by)

    # ---- building (once, cached on disk)
    def _check_frames(self, raw: Path) -> None:
        marker = self.frames_root.with_name(self.frames_root.name + ".building")
        if marker.exists():
            raise _stale_marker_error(marker, self.frames_root, "events_np/ (frame integration)")
        if self.frames_root.is_dir():
            want = _class_dirs_with_files(raw)
            have = _class_dirs_with_files(self.frames_root)
            if have != want:
                diff = {c: (have.get(c, 0), n) for c, n in want.items() if have.get(c, 0) != n}
                raise DVSDatasetError(
                    f"{self.frames_root} is half-built: frames per class (have, expected from events_np) {diff}. "
                    f"Delete {self.frames_root} to integrate the frames again."
                )

    def _dataset(self):
        raw = build_events_np(self.root, self.verify_md5)
        self._check_frames(raw)
        existed = self.frames_root.is_dir()
        try:
            ds = _cifar10dvs_class()(str(self.root), data_type="frame", frames_number=self.frames_number,
                                     split_by=self.split_by)
        except BaseException:
            if not existed:  # our own half-built cache: remove it and its marker, keep nothing broken
                shutil.rmtree(self.frames_root, ignore_errors=True)
                self.frames_root.with_name(self.frames_root.name + ".building").unlink(missing_ok=True)
            raise
        if list(ds.classes) != list(CLASS_NAMES):
            raise DVSDatasetError(f"{self.frames_root}: classes {ds.classes}, expected {list(CLASS_NAMES)}")
        return ds

    def prepare_data(self) -> None:
        self._dataset()  # builds events_np and the frames on the first run (rank 0 only under DDP)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        ds = self._dataset()
        train_idx, val_idx = per_class_split(ds.targets, self.train_ratio, self.num_classes)
        if not train_idx:
            raise DVSDatasetError(f"{self.root}: no training samples")
        self.dataset = ds
        self.datasets = {"train": Subset(ds, train_idx), "validation": Subset(ds, val_idx)}
        log.info("%s: %d train / %d validation samples (%s per class, dataset order)", _NAME, len(train_idx),
                 len(val_idx), f"{self.train_ratio:g}")

    # ---- device side
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        return self.frames_to_events(batch)  # [B, T, C, H, W] counts -> [T, B, C, H, W]
