"""I2EDataModule: released or converted I2E parquet -> packed batches -> events on the device.

Host side moves packed bits only: a batch leaves the DataLoader as (packed uint8 [B, N],
labels int64 [B]) with N = T*C*H*W/8, and ``on_after_batch_transfer`` unpacks it on the
training device into events [T, B, C, H, W] (float32 by default), then applies the optional
event augmentation in training.

Sources (``path``):
- ``None``: the hub dataset ``UESTC-BICS/I2E`` with config ``name`` (cached under data_dir);
- a folder: a local snapshot of that hub repo, or the output of ``i2e-convert`` (files are
  found through the dataset card's ``configs:`` block, else by the ``<name>/`` folder, else
  the parquet files directly inside ``path``);
- a parquet file or glob.
The embedded demo (``I2E-Digits``) is built into ``data_dir`` on first use.

Labels: the ClassLabel names (= class folder names in ``file_path``) are the source
dataset's original class indices; they may be ordered as strings ("0", "1", "10", ...), so
targets are mapped by name, and every row's label is checked against its ``file_path``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from i2e_train.codec import unpack_events
from i2e_train.data.base import DataFileError, DatasetUnavailableError, EventDataModule, resolve_info
from i2e_train.data.event_augment import augment_batch, build_event_augment
from i2e_train.data.packed import (
    BadRecordCounter,
    LabelMap,
    PackedI2EDataset,
    StreamingI2EDataset,
    collate_packed,
)
from i2e_train.data.parquet import (check_complete, check_parquet_files, files_fingerprint, find_data_files,
                                    listed_splits)
from i2e_train.data.splits import stratified_split

__all__ = ["I2EDataModule"]

log = logging.getLogger(__name__)


def _load_parquet(files: list[str], split: str, streaming: bool, data_dir: Path, where: str):
    """``datasets`` over local parquet files. Its Arrow cache is keyed on file modification times
    only, so it lives under a folder keyed by `files_fingerprint` (size, inode, ctime too): a
    replaced file is always read again. A file that fails to decode is named."""
    import datasets

    cache = data_dir / "hf-cache" / f"local-{files_fingerprint(files)}"
    try:
        return datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming,
                                     cache_dir=str(cache))
    except Exception as exc:  # noqa: BLE001 - DatasetGenerationError names no file: find it
        import pyarrow.parquet as pq

        for f in files:
            try:
                pq.read_table(f)
            except Exception as bad:  # noqa: BLE001
                raise DataFileError(f"{f}: its data cannot be read ({type(bad).__name__}: {bad}); the file is "
                                    f"corrupt: download or convert it again ({where})") from None
        raise DataFileError(f"{where}: reading {len(files)} parquet file(s) failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


class I2EDataModule(EventDataModule):
    """Released or converted I2E data as packed batches; events are unpacked on the device.

    Args:
        name: config name from ``i2e_train.data.catalog`` (e.g. "I2E-CIFAR10").
        path: local folder / parquet file / glob; None = the hub (or, for the embedded demo,
            ``<data_dir>/i2e-digits``).
        data_dir: where hub downloads are cached and embedded data is built.
        streaming: read as a stream (no random access) instead of map-style.
        batch_size: the GLOBAL batch; under DDP each process loads batch_size / world_size.
        num_workers: the DataLoaders' worker processes.
        pin_memory: the DataLoaders' ``pin_memory``.
        val_fraction: the fraction of train held out by the stratified split made for configs
            without a validation split.
        seed: the seed of that split.
        shuffle_buffer: streaming shuffle buffer (rows).
        dtype: dtype of the unpacked events ("float32", "bfloat16", "float16", "bool", ...).
        augment: event augmentation in training: a list of data/event_augment.py entries (e.g.
            [nda, event_drop]) or the legacy {crop_padding: 4, hflip: 0.5}.
        on_bad_record: "raise" (default) or "skip" (drop, count, log, write to the run folder).
        train_split: the training split's name.
        val_split: the validation split's name. ``None`` carves a stratified validation split of
            ``val_fraction`` from train on purpose (otherwise that happens only where the catalog,
            card and manifest list no validation split).
        num_classes: the data's class count. For catalog configs it, ``resolution`` and
            ``timesteps`` may be omitted and are checked when given; a config of your own (e.g.
            written by ``i2e-convert`` under a new name) needs num_classes and resolution, and a
            ``path``.
        resolution: [H, W] of the events.
        timesteps: T of the events.
    """

    collate_fn = collate_packed  # packed batches stay packed until on_after_batch_transfer

    def __init__(
        self,
        name: str = "I2E-CIFAR10",
        path: str | None = None,
        data_dir: str = "data",
        streaming: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = True,
        val_fraction: float = 0.1,
        seed: int = 2024,
        shuffle_buffer: int = 2048,
        dtype: str = "float32",
        augment: Any = None,
        on_bad_record: str = "raise",
        train_split: str = "train",
        val_split: str | None = "validation",
        drop_last: bool = False,
        num_classes: int | None = None,
        resolution: Sequence[int] | None = None,
        timesteps: int | None = None,
    ) -> None:
        info = resolve_info(name, num_classes, resolution, timesteps, own=path is not None,
                            need="num_classes, resolution and path")
        super().__init__(info, batch_size, num_workers, pin_memory, drop_last, seed)
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
        self.name, self.path, self.data_dir = name, path, Path(data_dir)
        self.streaming, self.val_fraction = streaming, val_fraction
        self.shuffle_buffer, self.on_bad_record = shuffle_buffer, on_bad_record
        self.train_split, self.val_split = train_split, val_split
        self.event_dtype = getattr(torch, str(dtype).removeprefix("torch."))
        self.augment = build_event_augment(augment, self.info.num_classes)
        self.bad_records = BadRecordCounter()
        self.datasets: dict[str, Dataset] = {}
        self.label_map: LabelMap | None = None

    def _local_root(self) -> Path | None:
        if self.path is not None:
            return Path(self.path)
        if self.info.kind == "embedded":
            return self.data_dir / "i2e-digits"
        return None

    def prepare_data(self) -> None:
        if self.info.kind == "embedded" and self.path is None:
            from i2e_train.data.digits import build_digits

            build_digits(self._local_root())

    # ---- loading
    def _load(self, split: str, streaming: bool, columns: list[str] | None = None):
        import datasets

        root = self._local_root()
        if root is not None:
            files = find_data_files(root, self.name)
            if split not in files:
                raise DatasetUnavailableError(
                    f"split {split!r} of {self.name} not found under {str(root)!r}; found splits: {sorted(files)}"
                )
            where = f"split {split!r} of {self.name} under {str(root)!r}"
            ds = _load_parquet(check_parquet_files(files[split], where), split, streaming, self.data_dir, where)
        else:
            try:
                ds = datasets.load_dataset(self.info.hub_repo, self.name, split=split, streaming=streaming,
                                           cache_dir=str(self.data_dir / "hf-cache"))
            except Exception as exc:  # noqa: BLE001 - connection/offline/missing-split errors all end here
                raise DatasetUnavailableError(
                    f"cannot load {self.name} split {split!r} from the hub ({self.info.hub_repo}): "
                    f"{type(exc).__name__}: {exc}\nTo use a local copy, download it where you have network:\n"
                    f"  hf download {self.info.hub_repo} --repo-type dataset --include '{self.name}/*' "
                    f"--local-dir <folder>\nand point the data config at it: data.path=<folder>"
                ) from exc
        if columns is not None:
            ds = ds.select_columns(columns)
        return ds

    def _local_needs_split(self) -> bool:
        """Whether the validation split is carved from train: ``val_split=null`` (on purpose), or no
        validation split where neither the catalog, the dataset card nor the i2e-convert manifest
        lists one. A listed split that is absent, or a missing shard, is an error naming it."""
        root = self._local_root()
        files = find_data_files(root, self.name)
        check_complete(files, root, self.name)
        if self.val_split is None:
            return True
        if self.val_split in files:
            return False
        listed = listed_splits(root, self.name)
        catalog = self.info.has_validation and self.info.kind != "embedded"
        if self.val_split in listed or catalog or self.val_split != "validation":
            said = (f"though {listed[self.val_split]} lists it" if self.val_split in listed else
                    f"though the catalog entry of {self.name} has one" if catalog else "and data.val_split names it")
            raise DatasetUnavailableError(
                f"split {self.val_split!r} of {self.name} is missing under {str(root)!r} (found {sorted(files)}), "
                f"{said}; download or convert it again (data.val_split=null carves a validation split of "
                f"data.val_fraction from train on purpose)")
        return True

    def _label_map(self, features, table=None, split: str = "") -> LabelMap:
        """Label index -> target; with a table, the folder naming of its file_path is found from
        its first rows (class names, indices or other names such as wnids: logged)."""
        label = features["label"] if features is not None and "label" in features else None
        names = getattr(label, "names", None)
        if names is None:  # plain integer labels: identity on 0..K-1
            names = [str(i) for i in range(self.num_classes)]
        lmap = LabelMap.from_names(names, self.num_classes, f"{self.name} label feature")
        if table is not None and "file_path" in table.column_names:
            head = table.slice(0, 256)
            lmap = lmap.with_folders(head.column("file_path").to_pylist(), head.column("label").to_pylist(),
                                     f"{self.name} split {split!r}")
        return lmap

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = {"train": self.train_split, "validation": self.val_split}
        need_made_split = self.val_split is None or (not self.info.has_validation and self.path is None
                                                     and self.info.kind != "embedded")
        if self._local_root() is not None:
            need_made_split = self._local_needs_split()
        if self.streaming:
            self._setup_streaming(splits, need_made_split)
        else:
            self._setup_map(splits, need_made_split)

    def _setup_map(self, splits: dict[str, str], made: bool) -> None:
        if made:
            ds = self._load(self.train_split, False)
            self.label_map = self._label_map(ds.features, ds.data.table, self.train_split)
            labels = np.asarray(ds.data.table.column("label").to_numpy(zero_copy_only=False))
            tr, va = stratified_split(labels, self.val_fraction, self.seed)
            for key, rows in (("train", tr), ("validation", va)):
                self.datasets[key] = PackedI2EDataset(ds.data.table, rows, self.info, self.label_map,
                                                      f"{self.train_split}[{key}]", self.on_bad_record, self.bad_records)
            return
        for key, split in splits.items():
            ds = self._load(split, False)
            if len(ds) == 0:
                raise DatasetUnavailableError(f"{self.name} split {split!r} is empty")
            self.label_map = self._label_map(ds.features, ds.data.table, split)
            self.datasets[key] = PackedI2EDataset(ds.data.table, np.arange(len(ds)), self.info, self.label_map,
                                                  split, self.on_bad_record, self.bad_records)

    def _setup_streaming(self, splits: dict[str, str], made: bool) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:
            raise ValueError(
                f"data.streaming=true with {world} processes (DDP) is refused: split_dataset_by_node can give the "
                "ranks unequal batch counts, and a rank waiting for another's batch hangs the run. Train under DDP "
                "with data.streaming=false (memory-mapped Arrow files, equal batches per rank)")
        val_paths = None
        if made:  # a stratified split needs the labels once: read only the light columns
            light = self._load(self.train_split, True, columns=["file_path", "label"])
            fps, labs = [], []
            for ex in light:
                fps.append(ex["file_path"])
                labs.append(ex["label"])
            _, va = stratified_split(np.asarray(labs), self.val_fraction, self.seed)
            val_paths = {fps[i] for i in va}
            train_paths = set(fps) - val_paths
        for key, split in splits.items():
            src = self.train_split if made else split
            stream = self._load(src, True)
            head = list(self._load(src, True, columns=["file_path", "label"]).take(256))
            self.label_map = self._label_map(stream.features).with_folders(
                [ex["file_path"] for ex in head], [ex["label"] for ex in head], f"{self.name} split {src!r}")
            if key == "train":
                stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            keep = None if not made else (train_paths if key == "train" else val_paths)
            self.datasets[key] = StreamingI2EDataset(stream, self.info, self.label_map, src if not made else
                                                     f"{src}[{key}]", keep, self.on_bad_record, self.bad_records)

    # ---- device side
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        packed, targets = batch[:2]
        for split, message in (batch[2] if len(batch) > 2 else ()):  # records skipped in the loader
            self.bad_records.add(split, message, carry=False)
        if packed.shape[0] == 0:  # every record of the batch was skipped
            events = torch.zeros((self.shape[0], 0, *self.shape[1:]), dtype=self.event_dtype, device=packed.device)
        else:
            events = unpack_events(packed, self.shape, self.event_dtype)  # [T, B, C, H, W]
        return augment_batch(self, events, targets)  # training only (data/event_augment.py)

    def state_dict(self) -> dict[str, Any]:
        return {"bad_records": self.bad_records.state_dict(), **self._position_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bad = state.get("bad_records", {})
        self.bad_records.load_state_dict(bad if "counts" in bad else {"counts": bad})
        self._load_position_state(state)
