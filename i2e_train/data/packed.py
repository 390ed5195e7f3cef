"""Packed I2E records as datasets: rows -> validated packed payloads + targets, map-style or streamed.

Labels: the ClassLabel names (= class folder names in ``file_path``) are the source dataset's
original class indices; they may be ordered as strings ("0", "1", "10", ...), so targets are
mapped by name (`LabelMap`), and every row's label is checked against its ``file_path``.
Bad records raise [`RecordError`][i2e_train.codec.RecordError] naming split, row and file, or, under
``on_bad_record="skip"``, are dropped and counted (`BadRecordCounter`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset, IterableDataset

from i2e_train.codec import RecordError, packed_size, parse_record, record_prefix
from i2e_train.data.catalog import DatasetInfo
from i2e_train.data.parquet import ChunkedColumn

__all__ = ["LabelMap", "BadRecordCounter", "PackedI2EDataset", "StreamingI2EDataset", "collate_packed"]

log = logging.getLogger(__name__)


@dataclass
class LabelMap:
    """ClassLabel index -> target index (the source dataset's original class index)."""

    names: list[str]
    targets: np.ndarray  # int64 [len(names)]
    # what the class folder of file_path holds (see `with_folders`): "names" (the label's
    # name), "indices" (the class index, e.g. names are words or wnids but folders numbers) or
    # "other" (folders named otherwise, e.g. wnids for index names: not checked per row)
    folders: str = "names"

    def with_folders(self, paths: Sequence[str | None], labels: Sequence[int | None], where: str) -> "LabelMap":
        """The folder naming of ``file_path`` found in a sample of rows, logged with what was found."""
        pairs = [(p.split("/", 1)[0], int(lab)) for p, lab in zip(paths, labels)
                 if p and "/" in p and lab is not None and 0 <= int(lab) < len(self.names)]
        if not pairs:
            return self
        by_name = sum(f == self.names[lab] for f, lab in pairs)
        by_index = sum(f == str(int(self.targets[lab])) for f, lab in pairs)
        if by_name == 0 and by_index == 0:  # no row agrees either way: another naming, e.g. wnids
            kind, how = "other", "neither the class name nor the index (e.g. wnids): not checked against the label"
        elif by_name >= by_index:  # rows that disagree are reported when read
            kind, how = "names", "the label's class name"
        else:
            kind, how = "indices", "the class index"
        log.info("%s: the class folder of file_path holds %s (e.g. %r for label %r)", where, how, pairs[0][0],
                 self.names[pairs[0][1]])
        return LabelMap(self.names, self.targets, kind)

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
            if fp is not None and "/" in fp and label_map.folders != "other":
                folder = fp.split("/", 1)[0]
                expected = name if label_map.folders == "names" else str(int(label_map.targets[int(lab)]))
                if folder != expected:
                    what = "label name" if label_map.folders == "names" else "class index of label"
                    raise RecordError(f"{where}: {what} {expected!r} does not match the class folder of file_path")
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
    DDP streaming is refused by the DataModule (unequal batch counts per rank would hang).
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
