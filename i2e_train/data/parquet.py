"""I2E parquet files: finding them per split, checking them, and reading one column without copies.

A local ``path`` may be a folder (a snapshot of the hub repo or the output of ``i2e-convert``:
files found through the dataset card's ``configs:`` block, else the ``<name>/`` folder, else the
parquet files directly inside it), one parquet file, or a glob.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import yaml

from i2e_train.data.base import DataFileError, DatasetUnavailableError

__all__ = ["find_data_files", "check_parquet_files", "ChunkedColumn", "COLUMNS"]

log = logging.getLogger(__name__)

_SPLIT_FROM_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)[-_.]")
COLUMNS = ("file_path", "label", "data")


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
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            hint = (" It looks like an image dataset: convert it with i2e-convert, or train on it in the online mode "
                    "(data=cifar10 / data=imagenet)" if any(c in names for c in ("img", "image")) else "")
            raise DataFileError(f"{f}: columns {names}, an I2E parquet file needs {list(COLUMNS)} "
                                f"(missing {missing}) ({where}).{hint}")
        (keep if meta.num_rows > 0 else empty).append(str(f))
    if empty:
        log.warning("%s: leaving out %d parquet file(s) with 0 rows: %s", where, len(empty), ", ".join(empty[:5]))
    if not keep:
        raise DatasetUnavailableError(f"{where} is empty: {len(files)} parquet file(s), 0 rows "
                                      f"({', '.join(str(f) for f in files[:3])}{', ...' if len(files) > 3 else ''})")
    return keep


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
