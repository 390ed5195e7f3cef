"""I2E parquet files: finding them per split, checking them, and reading one column without copies.

A local ``path`` may be a folder (a snapshot of the hub repo or the output of ``i2e-convert``:
files found through the dataset card's ``configs:`` block, else the ``<name>/`` folder, else the
parquet files directly inside it), one parquet file, or a glob.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import yaml

from i2e_train.data.base import DataFileError, DatasetUnavailableError
from i2e_train.data.writer import MANIFEST, SHARD_RE, ManifestError, read_manifest, shard_name

__all__ = ["find_data_files", "check_parquet_files", "check_complete", "listed_splits", "files_fingerprint",
           "ChunkedColumn", "COLUMNS"]

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


def _card_splits(folder: Path, name: str) -> dict[str, list[str]] | None:
    """Split -> path patterns the dataset card lists for config ``name`` (None without a card block)."""
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
            out.setdefault(str(entry["split"]), []).extend(str(p) for p in pats)
        return out
    return None


def _card_data_files(folder: Path, name: str) -> dict[str, list[str]] | None:
    """The parquet files the dataset card's patterns match, inside ``folder`` only: the card is data,
    a pattern that climbs out of the folder (``..``, an absolute path) is refused naming it."""
    patterns = _card_splits(folder, name)
    if patterns is None:
        return None
    for pats in patterns.values():
        for pat in pats:
            if Path(pat).is_absolute() or ".." in Path(pat).parts or "\\" in pat:
                raise DataFileError(f"{folder / 'README.md'}: data_files pattern {pat!r} of config {name!r} points outside "
                                    f"{folder}; a dataset card lists its files by paths inside its own folder")
    root = folder.resolve()
    return {split: sorted(str(p) for pat in pats for p in folder.glob(pat)
                          if p.suffix == ".parquet" and p.resolve().is_relative_to(root))
            for split, pats in patterns.items()}


_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                "test": "test"}


def _split_of(f: Path) -> str:
    """The split a file belongs to: from a shard name (``train-00000-of-00003.parquet``), a name that
    starts with a split name, or its folder (``<config>/<split>/0000.parquet``, the hub's parquet
    branch). A name's prefix counts only when it is a split name (``0000`` is not)."""
    m = SHARD_RE.match(f.name)
    if m:
        return m.group("split")
    m = _SPLIT_FROM_NAME.match(f.name)
    if m and m.group("split").lower() in _SPLIT_NAMES:
        return _SPLIT_NAMES[m.group("split").lower()]
    parent = f.parent.name
    if parent.lower() in _SPLIT_NAMES:
        return _SPLIT_NAMES[parent.lower()]
    return m.group("split") if m and not m.group("split").isdigit() else parent


def _group_by_split(files: Sequence[Path]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(files):
        out.setdefault(_split_of(f), []).append(str(f))
    return out


def _folder_files(p: Path, name: str) -> dict[str, list[str]]:
    sub = [d for d in p.rglob(name) if d.is_dir()]
    files = [f for d in sub for f in d.rglob("*.parquet")] if sub else list(p.glob("*.parquet"))
    return _group_by_split(files)


def find_data_files(path: str | Path, name: str) -> dict[str, list[str]]:
    """Parquet files per split for config ``name`` under a local ``path`` (folder, file or glob).
    In a folder, the dataset card's ``configs:`` block is used for the splits it finds files for;
    splits it lists without files fall back to the ``<name>/`` folder."""
    p = Path(path)
    if any(ch in str(path) for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(path), recursive=True))]
        found = _group_by_split([f for f in files if f.suffix == ".parquet"])
    elif p.is_file():
        found = _group_by_split([p])
    elif p.is_dir():
        card = {k: v for k, v in (_card_data_files(p, name) or {}).items() if v}
        found = card if card and all(card.values()) and card.keys() >= set(_card_splits(p, name) or ()) else \
            {**_folder_files(p, name), **card}
    else:
        raise DatasetUnavailableError(f"data path {str(path)!r} does not exist")
    found = {k: v for k, v in (found or {}).items() if v}
    if not found:
        raise DatasetUnavailableError(
            f"no parquet files for config {name!r} under {str(path)!r} (expected <path>/{name}/<split>-*.parquet, "
            "a dataset card with a configs: block, or parquet files directly)"
        )
    return found


def _recorded_splits(path: str | Path, name: str) -> tuple[Path, dict]:
    """The ``i2e-convert`` manifest of config ``name`` under ``path`` and its checked ``splits``
    ({} without a manifest). DataFileError names a manifest that is not one."""
    manifest = Path(path) / name / MANIFEST
    if not manifest.is_file():
        return manifest, {}
    try:
        return manifest, read_manifest(manifest).get("splits", {})
    except ManifestError as exc:
        raise DataFileError(f"{exc}; convert {name} again, or delete the manifest if these shards were not made "
                            "by i2e-convert") from None


def listed_splits(path: str | Path, name: str) -> dict[str, str]:
    """Splits that should exist under a local folder -> where that is said (the dataset card's
    ``configs:`` block, the ``i2e-convert`` manifest)."""
    p = Path(path)
    if not p.is_dir():
        return {}
    out = {split: str(p / "README.md") for split in (_card_splits(p, name) or {})}
    manifest, splits = _recorded_splits(p, name)
    out.update({split: str(manifest) for split in splits if split not in out})
    return out


def _rows(f: Path, manifest: Path) -> int:
    """Rows of a shard the manifest records (its footer); DataFileError names an unreadable one."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(f).num_rows
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, ...: all mean "unreadable"
        raise DataFileError(
            f"{f}: not a readable parquet file ({type(exc).__name__}: {exc}); it is truncated or corrupt. Delete it "
            f"and run the same i2e-convert command again (it rewrites only the missing shards; {manifest} records "
            "it), or convert again with overwrite=true") from None


def check_complete(files: dict[str, list[str]], path: str | Path, name: str) -> None:
    """Every shard of a split is there: ``<split>-0000i-of-0000N.parquet`` for i < N, and the shards
    the ``i2e-convert`` manifest recorded (with their row counts). ``DataFileError`` names the
    missing, unreadable or changed file."""
    for split, paths in files.items():
        by_folder: dict[Path, list[re.Match]] = {}
        for f in paths:
            m = SHARD_RE.match(Path(f).name)
            if m:
                by_folder.setdefault(Path(f).parent, []).append(m)
        for folder, matches in by_folder.items():
            totals = {int(m.group("total")) for m in matches}
            have = {int(m.group("index")) for m in matches}
            for total in totals:
                gone = [shard_name(split, i, total) for i in range(total) if i not in have]
                if gone:
                    raise DataFileError(f"split {split!r} of {name}: {folder / gone[0]} is missing ({len(gone)} of "
                                        f"{total} shards missing: {', '.join(gone[:5])}); download or convert it again")
    manifest, recorded = _recorded_splits(path, name)
    for split, entry in recorded.items():
        for shard, stats in entry["done"].items():  # checked: shard names of their split, row counts
            f = manifest.parent / shard
            if not f.is_file():
                raise DataFileError(f"split {split!r} of {name}: {f} is missing ({manifest} records it); "
                                    "convert again (the same command resumes)")
            rows = _rows(f, manifest)
            if rows != stats["rows"]:
                raise DataFileError(f"{f}: {rows} rows, {manifest} records {stats['rows']}: the file changed since "
                                    "it was written; delete it and convert again (the same command resumes)")


def files_fingerprint(files: Sequence[str]) -> str:
    """A key that changes whenever a file is replaced or rewritten: path, size, mtime, inode and
    ctime (which no copy tool can set back), so a cache is never reused for other bytes."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:16]
