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
import yaml
from datasets import ClassLabel, Features, Value

from i2e_train.files import atomic_write, atomic_write_text

__all__ = ["MANIFEST", "features", "shard_name", "write_shard", "write_card", "read_card", "update_card", "CardError", "SHARD_RE"]

MANIFEST = "convert-manifest.json"  # <folder>/<config>/: what i2e-convert made them with (i2e_train.convert)
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


class CardError(ValueError):
    """A dataset card (README.md) whose front matter cannot be read."""


def read_card(path: Path) -> tuple[dict, str]:
    """(front matter, body text) of a dataset card; ({}, "") when there is none."""
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}, text
    parts = text.split("---", 2)
    if len(parts) < 3:
        return {}, text
    try:
        meta = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError as exc:
        raise CardError(f"{path}: unreadable dataset card front matter ({exc})") from None
    return (meta if isinstance(meta, dict) else {}), parts[2].strip()


def update_card(out: Path, config: str, splits: Sequence[str], description: str) -> Path:
    """Add/extend ``config`` in the card's configs block; other configs and text are kept."""
    card = out / "README.md"
    meta, body = read_card(card)
    entries = list(meta.get("configs") or [])
    order = {"train": 0, "validation": 1, "test": 2}
    existing = next((e for e in entries if isinstance(e, dict) and e.get("config_name") == config), None)
    have = [d.get("split") for d in (existing or {}).get("data_files", []) or [] if isinstance(d, dict)]
    merged = sorted(dict.fromkeys([*have, *splits]), key=lambda s: (order.get(s, 3), s))
    new_entry = {"config_name": config, "data_files": [{"split": s, "path": f"{config}/{s}-*"} for s in merged]}

    def standard(e) -> bool:
        return isinstance(e, dict) and set(e) == {"config_name", "data_files"} and all(
            isinstance(d, dict) and set(d) == {"split", "path"} and d["path"] == f"{e['config_name']}/{d['split']}-*"
            for d in e["data_files"] or []
        )

    entries = [e for e in entries if e is not existing] + [new_entry]
    header = "# I2E event datasets\n\nConverted with `i2e-convert` (i2e-train):\n"
    if not body:
        body = header
    if body.startswith(header.strip()):  # our own card: one line per config, the latest parameters
        lines = [ln for ln in body.strip().splitlines() if not ln.startswith(f"- {config}: ")]
        body = "\n".join(lines + [f"- {description}"]) + "\n"
    if set(meta) <= {"configs"} and all(standard(e) for e in entries):
        return write_card(out, {e["config_name"]: [d["split"] for d in e["data_files"]] for e in entries}, body)
    meta["configs"] = sorted(entries, key=lambda e: str(e.get("config_name")))
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body.strip() + "\n"
    atomic_write_text(card, text)
    return card
