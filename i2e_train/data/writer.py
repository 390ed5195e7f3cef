"""Writing I2E parquet in the released schema, laid out like the hub repo.

Layout of an output folder (the same as UESTC-BICS/I2E, so ``load_dataset(folder, config)``
works on it):

    <folder>/README.md                                   dataset card with a `configs:` block
    <folder>/<config>/<split>-00000-of-00004.parquet    rows: file_path, label, data

Rows: ``file_path`` (string "<class folder>/<name>.npy"), ``label`` (ClassLabel whose names
are the class folder names), ``data`` (binary: one record, see ``i2e_train.codec``).
Shards are written to a temporary name and renamed, so a file with the final name is always
complete.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Features, Value

from i2e_train.files import atomic_write, atomic_write_text

__all__ = ["features", "shard_name", "write_shard", "write_card", "SHARD_RE"]

SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet$")


def features(class_names: Sequence[str]) -> Features:
    return Features(
        {"file_path": Value("string"), "label": ClassLabel(names=list(class_names)), "data": Value("binary")}
    )


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


def write_shard(
    path: str | Path,
    file_paths: Sequence[str],
    labels: Sequence[int],
    records: Sequence[bytes],
    class_names: Sequence[str],
) -> Path:
    """Write one parquet shard atomically (tmp file + rename) with `datasets` feature metadata."""
    if not (len(file_paths) == len(labels) == len(records)):
        raise ValueError(
            f"shard {path}: {len(file_paths)} file_paths, {len(labels)} labels, {len(records)} records"
        )
    for i, lab in enumerate(labels):
        if not 0 <= int(lab) < len(class_names):
            raise ValueError(f"shard {path}: row {i} ({file_paths[i]}) label {lab} outside 0..{len(class_names) - 1}")
    feats = features(class_names)
    table = pa.table(
        {
            "file_path": pa.array(list(file_paths), type=pa.string()),
            "label": pa.array([int(x) for x in labels], type=pa.int64()),
            "data": pa.array(list(records), type=pa.binary()),
        }
    )
    table = table.cast(feats.arrow_schema)  # carries the ClassLabel names in the schema metadata
    return atomic_write(path, lambda fh: pq.write_table(table, fh, row_group_size=1000))


def write_card(folder: str | Path, configs: dict[str, Sequence[str]], body: str = "") -> Path:
    """Write README.md with a `configs:` block: config name -> its splits (shards found by glob)."""
    lines = ["---", "configs:"]
    for name in sorted(configs):
        lines += [f"- config_name: {name}", "  data_files:"]
        for split in configs[name]:
            lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    lines += ["---", "", body.strip(), ""]
    return atomic_write_text(Path(folder) / "README.md", "\n".join(lines))
