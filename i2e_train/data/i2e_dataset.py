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

import glob
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import yaml
from lightning import LightningDataModule
from torch.utils.data import Dataset, IterableDataset

from i2e_train.codec import (
    RecordError,
    packed_size,
    parse_record,
    record_prefix,
    unpack_events,
)
from i2e_train.data.augment import EventAugment
from i2e_train.data.catalog import DatasetInfo, check_facts, get_info
from i2e_train.data.sampler import ResumableTrainData

__all__ = ["I2EDataModule", "PackedI2EDataset", "StreamingI2EDataset", "LabelMap", "find_data_files",
           "stratified_split", "DatasetUnavailableError", "DataFileError", "BadRecordCounter", "check_parquet_files"]

log = logging.getLogger(__name__)

_SPLIT_FROM_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)[-_.]")


class DatasetUnavailableError(FileNotFoundError):
    """The requested data is neither local nor reachable."""


class DataFileError(ValueError):
    """A data file that is not a readable I2E parquet file (corrupt, truncated, other columns)."""


_COLUMNS = ("file_path", "label", "data")


def check_parquet_files(files: Sequence[str], where: str) -> list[str]:
    """Read the footer of every parquet file (cheap): a corrupt / truncated / foreign file raises
    ``DataFileError`` naming it; files with 0 rows are left out (with a warning); a split with no
    rows at all raises ``DatasetUnavailableError``. Returns the files to read."""
    import pyarrow.parquet as pq

    keep, empty = [], []
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, ...: all mean "unreadable"
            raise DataFileError(
                f"{f}: not a readable parquet file ({type(exc).__name__}: {exc}); it is probably truncated or "
                f"corrupt (an interrupted download or copy): download / convert it again ({where})"
            ) from None
        names = meta.schema.names
        missing = [c for c in _COLUMNS if c not in names]
        if missing:
            hint = (" It looks like an image dataset: convert it with i2e-convert, or train on it in the online mode "
                    "(data=cifar10 / data=imagenet)" if any(c in names for c in ("img", "image")) else "")
            raise DataFileError(f"{f}: columns {names}, an I2E parquet file needs {list(_COLUMNS)} "
                                f"(missing {missing}) ({where}).{hint}")
        (keep if meta.num_rows > 0 else empty).append(str(f))
    if empty:
        log.warning("%s: leaving out %d parquet file(s) with 0 rows: %s", where, len(empty), ", ".join(empty[:5]))
    if not keep:
        raise DatasetUnavailableError(f"{where} is empty: {len(files)} parquet file(s), 0 rows "
                                      f"({', '.join(str(f) for f in files[:3])}{', ...' if len(files) > 3 else ''})")
    return keep


# --------------------------------------------------------------------------- labels
@dataclass
class LabelMap:
    """ClassLabel index -> target index (the source dataset's original class index)."""

    names: list[str]
    targets: np.ndarray  # int64 [len(names)]

    @classmethod
    def from_names(cls, names: Sequence[str], num_classes: int, where: str) -> "LabelMap":
        names = [str(n) for n in names]
        if len(names) != num_classes:
            raise RecordError(f"{where}: ClassLabel has {len(names)} names, the config expects {num_classes} classes")
        if all(n.isdigit() for n in names):
            targets = np.array([int(n) for n in names], dtype=np.int64)
            if sorted(targets.tolist()) != list(range(num_classes)):
                raise RecordError(
                    f"{where}: numeric class names must be 0..{num_classes - 1}, got {sorted(targets.tolist())[:5]}..."
                )
        else:  # non-numeric folder names (own data): the ClassLabel order is the class index
            targets = np.arange(len(names), dtype=np.int64)
        return cls(names, targets)


@dataclass
class BadRecordCounter:
    """Counts records dropped under ``on_bad_record='skip'`` (per split, with the first messages).

    A record is counted once however often it is read (every epoch re-reads it): the message,
    which names split, row and file_path, is the key. ``drain()`` hands over the messages added
    since its last call: the datasets return them with each batch, so that records skipped
    inside DataLoader workers (which hold a copy of the counter) reach the main process's
    counter in ``on_after_batch_transfer``.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)  # message -> split
    pending: list[tuple[str, str]] = field(default_factory=list)

    def add(self, split: str, message: str, carry: bool = True) -> bool:
        """Count one skipped record; False if it was counted before."""
        if message in self.seen:
            return False
        self.seen[message] = split
        self.counts[split] = self.counts.get(split, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(message)
        if carry:
            self.pending.append((split, message))
        log.warning("skipping bad record: %s", message)
        return True

    def drain(self) -> list[tuple[str, str]]:
        out, self.pending = self.pending, []
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": list(self.examples)}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": list(self.examples),
                "seen": [[split, message] for message, split in self.seen.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Merge a saved state (a checkpoint's, another rank's) into this counter."""
        seen = state.get("seen")
        if seen is None:  # an old state with counts only
            for split, n in state.get("counts", {}).items():
                self.counts[split] = max(self.counts.get(split, 0), int(n))
            return
        for split, message in seen:
            if message not in self.seen:
                self.seen[message] = split
                self.counts[split] = self.counts.get(split, 0) + 1
        for message in state.get("examples", ()):
            if len(self.examples) < 20 and message not in self.examples:
                self.examples.append(message)


# --------------------------------------------------------------------------- batch decoding
def _decode_rows(
    datas: Sequence[bytes | None], labels: Sequence[int | None], paths: Sequence[str | None],
    rows: Sequence[int], info: DatasetInfo, label_map: LabelMap, split: str,
    on_bad_record: str, counter: BadRecordCounter | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch of rows and slice their packed payloads -> (uint8 [B, N], int64 [B])."""
    shape = info.shape
    prefix = record_prefix(shape)
    plen, n = len(prefix), packed_size(shape)
    out = np.empty((len(datas), n), dtype=np.uint8)
    targets = np.empty(len(datas), dtype=np.int64)
    keep = np.ones(len(datas), dtype=bool)
    for i, (data, lab, fp, row) in enumerate(zip(datas, labels, paths, rows)):
        where = f"split {split!r}, row {row}, file_path {fp!r}"
        try:
            if data is None:
                raise RecordError(f"{where}: missing data")
            if len(data) == plen + n and bytes(data[:plen]) == prefix:
                out[i] = np.frombuffer(data, dtype=np.uint8, count=n, offset=plen)
            else:
                rec = parse_record(data, where)
                if rec.shape != shape:
                    raise RecordError(f"{where}: header shape {rec.shape} does not match the config's {shape}")
                out[i] = rec.payload
            if lab is None or not 0 <= int(lab) < len(label_map.names):
                raise RecordError(f"{where}: label {lab} outside 0..{len(label_map.names) - 1}")
            name = label_map.names[int(lab)]
            if fp is not None and "/" in fp and fp.split("/", 1)[0] != name:
                raise RecordError(f"{where}: label name {name!r} does not match the class folder of file_path")
            targets[i] = label_map.targets[int(lab)]
        except RecordError as exc:
            if on_bad_record != "skip":
                raise
            keep[i] = False
            if counter is not None:
                counter.add(split, str(exc))
    if not keep.all():
        out, targets = out[keep], targets[keep]
    return out, targets


class ChunkedColumn:
    """Random access to the rows of a chunked Arrow binary/string column, without copying.

    ``Table.take`` on a chunked binary column concatenates its chunks first, i.e. copies the
    whole column for every batch. This index views each chunk's offsets and data buffers as
    numpy arrays (over the memory-mapped Arrow file) and slices rows out of them.
    """

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.offsets: list[np.ndarray] = []
        self.data: list[np.ndarray] = []
        self.valid: list[np.ndarray | None] = []
        lengths = []
        for chunk in column.chunks:
            wide = pa.types.is_large_binary(chunk.type) or pa.types.is_large_string(chunk.type)
            odt = np.dtype(np.int64 if wide else np.int32)
            _, offsets, data = chunk.buffers()
            self.offsets.append(np.frombuffer(offsets, dtype=odt, count=len(chunk) + 1,
                                              offset=chunk.offset * odt.itemsize))
            self.data.append(np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8))
            self.valid.append(chunk.is_valid().to_numpy(zero_copy_only=False) if chunk.null_count else None)
            lengths.append(len(chunk))
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def gather(self, rows: np.ndarray) -> list[np.ndarray | None]:
        """Row values as uint8 views (None for nulls)."""
        chunks = np.searchsorted(self.starts, rows, side="right") - 1
        out: list[np.ndarray | None] = []
        for c, local in zip(chunks.tolist(), (rows - self.starts[chunks]).tolist()):
            valid = self.valid[c]
            if valid is not None and not valid[local]:
                out.append(None)
            else:
                off = self.offsets[c]
                out.append(self.data[c][off[local] : off[local + 1]])
        return out


class PackedI2EDataset(Dataset):
    """Map-style view of one split: ``__getitems__`` gathers a whole batch from Arrow at once.

    ``table`` is the split's pyarrow table (columns file_path, label, data); ``rows`` the row
    indices that belong to this split (a seeded stratified subset for made-up splits).
    Items are (packed uint8 [N], target); batches (packed uint8 [B, N], targets [B]).
    The column index is built lazily in each process (workers never receive numpy views).
    """

    def __init__(self, table: pa.Table, rows: np.ndarray, info: DatasetInfo, label_map: LabelMap,
                 split: str, on_bad_record: str = "raise", counter: BadRecordCounter | None = None) -> None:
        self.table, self.rows, self.info, self.label_map, self.split = table, np.asarray(rows), info, label_map, split
        self.on_bad_record, self.counter = on_bad_record, counter
        self._columns: tuple[ChunkedColumn, ChunkedColumn, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_columns"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def _index(self) -> tuple[ChunkedColumn, ChunkedColumn, np.ndarray]:
        if self._columns is None:
            t = self.table
            label = t.column("label")
            labels = np.asarray(label.to_pylist(), dtype=object) if label.null_count else label.to_numpy()
            self._columns = (ChunkedColumn(t.column("data")), ChunkedColumn(t.column("file_path")), labels)
        return self._columns

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        data, paths, labels = self._index()
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        fps = [None if p is None else p.tobytes().decode("utf-8") for p in paths.gather(rows)]
        packed, targets = _decode_rows(
            data.gather(rows), labels[rows].tolist(), fps, rows.tolist(), self.info, self.label_map,
            self.split, self.on_bad_record, self.counter,
        )
        return _with_skipped(torch.from_numpy(packed), torch.from_numpy(targets), self.on_bad_record, self.counter)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        packed, targets = self.__getitems__([index])[:2]
        if len(targets) == 0:
            raise RecordError(f"split {self.split!r}: row {int(self.rows[index])} is a bad record (skipped)")
        return packed[0], int(targets[0])


class StreamingI2EDataset(IterableDataset):
    """Streaming view of one split (a `datasets` IterableDataset): yields (packed [N], target).

    Worker sharding comes from `datasets` (each worker reads its own parquet shards); under
    DDP the stream is first split with ``split_dataset_by_node``.
    """

    def __init__(self, stream, info: DatasetInfo, label_map: LabelMap, split: str,
                 keep_paths: set[str] | None = None, on_bad_record: str = "raise",
                 counter: BadRecordCounter | None = None) -> None:
        self.stream, self.info, self.label_map, self.split = stream, info, label_map, split
        self.keep_paths, self.on_bad_record, self.counter = keep_paths, on_bad_record, counter

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for row, ex in enumerate(self.stream):
            fp = ex.get("file_path")
            if self.keep_paths is not None and fp not in self.keep_paths:
                continue
            packed, targets = _decode_rows(
                [ex.get("data")], [ex.get("label")], [fp], [row], self.info, self.label_map,
                self.split, self.on_bad_record, self.counter,
            )
            if len(targets):
                yield _with_skipped(torch.from_numpy(packed[0]), int(targets[0]), self.on_bad_record, self.counter)
        if self.on_bad_record == "skip" and self.counter is not None and self.counter.pending:
            yield None, -1, self.counter.drain()  # bad records at the end of the stream: messages only


def _with_skipped(packed, targets, on_bad_record: str, counter: BadRecordCounter | None):
    """A batch (or streamed item), plus, under ``on_bad_record='skip'``, a third element: the
    (split, message) of every record skipped since the last one, for the main process's counter."""
    if on_bad_record != "skip":
        return packed, targets
    return packed, targets, (counter.drain() if counter is not None else [])


def collate_packed(batch) -> tuple:
    """Stack (packed, target[, skipped]) items; a batch already gathered by ``__getitems__``
    passes through. Batches are (packed [B, N], targets [B]) or, under on_bad_record='skip',
    (packed, targets, skipped records [(split, message), ...])."""
    if isinstance(batch, tuple) and len(batch) in (2, 3) and isinstance(batch[0], torch.Tensor) \
            and batch[0].dim() == 2:
        return batch
    items = [b for b in batch if b[0] is not None]
    packed = torch.stack([b[0] for b in items]) if items else torch.empty(0, 0, dtype=torch.uint8)
    targets = torch.tensor([int(b[1]) for b in items], dtype=torch.int64)
    if not any(len(b) > 2 for b in batch):
        return packed, targets
    return packed, targets, [m for b in batch if len(b) > 2 for m in b[2]]


# --------------------------------------------------------------------------- finding files
def _card_data_files(folder: Path, name: str) -> dict[str, list[str]] | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as exc:
        raise DatasetUnavailableError(f"{card}: unreadable dataset card ({exc})") from None
    for cfg in meta.get("configs", []) or []:
        if cfg.get("config_name") != name:
            continue
        out: dict[str, list[str]] = {}
        for entry in cfg.get("data_files", []) or []:
            pats = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            files = sorted(str(p) for pat in pats for p in folder.glob(pat) if p.suffix == ".parquet")
            out.setdefault(entry["split"], []).extend(files)
        return out
    return None


def _group_by_split(files: Sequence[Path]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(files):
        m = _SPLIT_FROM_NAME.match(f.name)
        split = m.group("split") if m else f.parent.name
        if split in ("val", "valid", "test") and split not in out:
            split = {"val": "validation", "valid": "validation"}.get(split, split)
        out.setdefault(split, []).append(str(f))
    return out


def find_data_files(path: str | Path, name: str) -> dict[str, list[str]]:
    """Parquet files per split for config ``name`` under a local ``path`` (folder, file or glob)."""
    p = Path(path)
    if any(ch in str(path) for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(path), recursive=True))]
        found = _group_by_split([f for f in files if f.suffix == ".parquet"])
    elif p.is_file():
        found = _group_by_split([p])
    elif p.is_dir():
        found = _card_data_files(p, name)
        if not found:
            sub = [d for d in p.rglob(name) if d.is_dir()]
            files = [f for d in sub for f in d.rglob("*.parquet")] if sub else list(p.glob("*.parquet"))
            found = _group_by_split(files)
    else:
        raise DatasetUnavailableError(f"data path {str(path)!r} does not exist")
    found = {k: v for k, v in (found or {}).items() if v}
    if not found:
        raise DatasetUnavailableError(
            f"no parquet files for config {name!r} under {str(path)!r} (expected <path>/{name}/<split>-*.parquet, "
            "a dataset card with a configs: block, or parquet files directly)"
        )
    return found


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: returns (train rows, validation rows), both sorted."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val.append(rng.permutation(idx)[:k])
    val_rows = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    return train_rows, val_rows


# --------------------------------------------------------------------------- the DataModule
def resolve_info(name: str, num_classes: int | None = None, resolution: Sequence[int] | None = None,
                 timesteps: int | None = None, path: str | None = None) -> DatasetInfo:
    """Catalog entry for ``name`` checked against the given facts, or an entry for own data."""
    res = None if resolution is None else tuple(int(r) for r in resolution)
    if res is not None and len(res) == 1:
        res = res * 2
    try:
        info = get_info(name)
    except KeyError as exc:
        if num_classes is None or res is None or path is None:
            raise KeyError(f"{exc.args[0]}\nFor data of your own, give num_classes, resolution and path.") from None
        return DatasetInfo(name=name, source="local", resolution=res, num_classes=int(num_classes),
                           timesteps=int(timesteps or 8), hub_repo=None)
    return check_facts(info, num_classes, res, timesteps)


class I2EDataModule(ResumableTrainData, LightningDataModule):
    """Released or converted I2E data as packed batches; events are unpacked on the device.

    Args:
        name: config name from ``i2e_train.data.catalog`` (e.g. "I2E-CIFAR10").
        path: local folder / parquet file / glob; None = the hub (or, for the embedded demo,
            ``<data_dir>/i2e-digits``).
        data_dir: where hub downloads are cached and embedded data is built.
        streaming: read as a stream (no random access) instead of map-style.
        batch_size: the GLOBAL batch; under DDP each process loads batch_size / world_size.
        num_workers, pin_memory: the DataLoaders'.
        val_fraction, seed: the stratified split made for configs without a validation split.
        shuffle_buffer: streaming shuffle buffer (rows).
        dtype: dtype of the unpacked events ("float32", "bfloat16", "float16", "bool", ...).
        augment: event augmentation in training, e.g. {crop_padding: 4, hflip: 0.5}.
        on_bad_record: "raise" (default) or "skip" (drop, count, log, write to the run folder).
        train_split, val_split: split names to read.
        num_classes, resolution, timesteps: the data's facts. For catalog configs they may be
            omitted and are checked when given; a config of your own (e.g. written by
            ``i2e-convert`` under a new name) needs num_classes and resolution, and a ``path``.
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
        augment: dict[str, Any] | None = None,
        on_bad_record: str = "raise",
        train_split: str = "train",
        val_split: str = "validation",
        drop_last: bool = False,
        num_classes: int | None = None,
        resolution: Sequence[int] | None = None,
        timesteps: int | None = None,
    ) -> None:
        super().__init__()
        self.info = resolve_info(name, num_classes, resolution, timesteps, path)
        if self.info.kind == "dvs":
            raise ValueError(f"{name} is real DVS data: use CIFAR10DVSDataModule")
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
        self.name, self.path, self.data_dir = name, path, Path(data_dir)
        self.streaming, self.batch_size, self.num_workers = streaming, batch_size, num_workers
        self.pin_memory, self.val_fraction, self.seed = pin_memory, val_fraction, seed
        self.shuffle_buffer, self.on_bad_record, self.drop_last = shuffle_buffer, on_bad_record, drop_last
        self.train_split, self.val_split = train_split, val_split
        self.event_dtype = getattr(torch, str(dtype).removeprefix("torch."))
        self.augment = EventAugment(**(augment or {}))
        self.bad_records = BadRecordCounter()
        self.datasets: dict[str, Dataset] = {}
        self.label_map: LabelMap | None = None

    # ---- facts used by the rest of the pipeline
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.info.shape

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

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
            ds = datasets.load_dataset("parquet", data_files={split: check_parquet_files(files[split], where)},
                                       split=split, streaming=streaming, cache_dir=str(self.data_dir / "hf-cache"))
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

    def _label_map(self, features) -> LabelMap:
        label = features["label"] if features is not None and "label" in features else None
        names = getattr(label, "names", None)
        if names is None:  # plain integer labels: identity on 0..K-1
            names = [str(i) for i in range(self.num_classes)]
        return LabelMap.from_names(names, self.num_classes, f"{self.name} label feature")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = {"train": self.train_split, "validation": self.val_split}
        need_made_split = not self.info.has_validation and self.path is None and self.info.kind != "embedded"
        if self._local_root() is not None:
            need_made_split = self.val_split not in find_data_files(self._local_root(), self.name)
        if self.streaming:
            self._setup_streaming(splits, need_made_split)
        else:
            self._setup_map(splits, need_made_split)

    def _setup_map(self, splits: dict[str, str], made: bool) -> None:
        if made:
            ds = self._load(self.train_split, False)
            self.label_map = self._label_map(ds.features)
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
            self.label_map = self._label_map(ds.features)
            self.datasets[key] = PackedI2EDataset(ds.data.table, np.arange(len(ds)), self.info, self.label_map,
                                                  split, self.on_bad_record, self.bad_records)

    def _setup_streaming(self, splits: dict[str, str], made: bool) -> None:
        from datasets.distributed import split_dataset_by_node

        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
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
            self.label_map = self._label_map(stream.features)
            if key == "train":
                stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            if world > 1:
                stream = split_dataset_by_node(stream, rank=rank, world_size=world)
            keep = None if not made else (train_paths if key == "train" else val_paths)
            self.datasets[key] = StreamingI2EDataset(stream, self.info, self.label_map, src if not made else
                                                     f"{src}[{key}]", keep, self.on_bad_record, self.bad_records)

    # ---- loaders
    # ---- device side
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        packed, targets = batch[:2]
        for split, message in (batch[2] if len(batch) > 2 else ()):  # records skipped in the loader
            self.bad_records.add(split, message, carry=False)
        if packed.shape[0] == 0:  # every record of the batch was skipped
            events = torch.zeros((self.shape[0], 0, *self.shape[1:]), dtype=self.event_dtype, device=packed.device)
        else:
            events = unpack_events(packed, self.shape, self.event_dtype)  # [T, B, C, H, W]
        if self.augment.active and self.trainer is not None and self.trainer.training and events.shape[1]:
            events = self.augment(events)
        return events, targets

    def state_dict(self) -> dict[str, Any]:
        return {"bad_records": self.bad_records.state_dict(), **self._position_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bad = state.get("bad_records", {})
        self.bad_records.load_state_dict(bad if "counts" in bad else {"counts": bad})
        self._load_position_state(state)
