"""Writing I2E parquet in the released schema, laid out like the hub repo.

Layout of an output folder (the same as UESTC-BICS/I2E, so ``load_dataset(folder, config)``
works on it):

    <folder>/README.md                                   dataset card with a `configs:` block
    <folder>/<config>/<split>-00000-of-00004.parquet    rows: file_path, label, data

Rows: ``file_path`` (string "<class folder>/<name>.npy"), ``label`` (ClassLabel whose names
are the class folder names), ``data`` (binary: one record, see ``i2e_train.codec``).
Shards are written to a temporary name and renamed, so a file with the final name is always
complete.

``<folder>/<config>/convert-manifest.json`` records how i2e-convert made a config (its
parameters, splits and finished shards). It is read back as untrusted data: `read_manifest`
checks it against `check_manifest` (the schema i2e-convert writes) before any name in it is
used, so a crafted manifest cannot point a read or a delete outside its folder. A config name
is a name (`check_config_name`), never a path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import ClassLabel, Features, Value

from i2e_train.files import atomic_write, atomic_write_text

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "features", "shard_name", "write_shard", "write_card", "read_card",
           "update_card", "CardError", "SHARD_RE", "CONFIG_NAME_FORM", "check_config_name", "ManifestError",
           "check_manifest", "read_manifest", "manifest_lists"]

MANIFEST = "convert-manifest.json"  # <folder>/<config>/: what i2e-convert made them with (i2e_train.convert)
MANIFEST_FORMAT = 1
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet$")
_SHARD_ANY = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d+)-of-(?P<total>\d+)\.parquet$")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
_CONFIG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
CONFIG_NAME_FORM = ("letters, digits, '-', '_' and '.', starting with a letter or digit, no '..', at most 100 "
                    "characters (it names one folder inside the output folder)")


def check_config_name(name: object, key: str = "config") -> str:
    """``name`` if it is a dataset config name (`CONFIG_NAME_FORM`: no separator, no ``..``,
    not absolute), else ValueError naming ``key``."""
    if not isinstance(name, str) or not _CONFIG_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"{key}={name!r} is not a config name: use {CONFIG_NAME_FORM}")
    return name


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


class ManifestError(ValueError):
    """A convert-manifest.json that is not what i2e-convert writes: the message names the file and the key."""


def _nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_split(split: str, entry: object) -> str | None:
    """The first problem of one ``splits.<split>`` entry (a key path and what is wrong), or None."""
    where = f"splits.{split}"
    if not _SPLIT_RE.fullmatch(split):
        return f"{where}: not a split name (letters, digits and '_')"
    if not isinstance(entry, dict):
        return f"{where}: not an object"
    unknown = sorted(set(entry) - {"source", "count", "shards", "done"})
    if unknown:
        return f"{where}.{unknown[0]}: unknown key"
    if not isinstance(entry.get("source", {}), dict):
        return f"{where}.source: not an object"
    if not _nonneg_int(entry.get("count")):
        return f"{where}.count: {entry.get('count')!r} is not a count"
    shards = entry.get("shards")
    if not _nonneg_int(shards) or shards < 1:
        return f"{where}.shards: {shards!r} is not a number of shards"
    done = entry.get("done")
    if not isinstance(done, dict):
        return f"{where}.done: not an object"
    for name, stats in done.items():
        m = _SHARD_ANY.fullmatch(name)
        if not m or m.group("split") != split or name != shard_name(split, int(m.group("index")), shards) \
                or int(m.group("index")) >= shards:
            return f"{where}.done.{name!r}: not a shard of split {split!r} ({split}-0000i-of-{shards:05d}.parquet)"
        if not isinstance(stats, dict) or not _nonneg_int(stats.get("rows")) or not _nonneg_int(stats.get("events")) \
                or not isinstance(stats.get("bad", []), list) or set(stats) - {"rows", "events", "bad"}:
            return f"{where}.done.{name!r}: not {{rows, events, bad}} counts"
    return None


def check_manifest(data: object, path: str | Path, config: str | None = None) -> dict:
    """``data`` if it is a manifest as i2e-convert writes it (format, tool, config, params, splits,
    runs; shard names that belong to their split), for config ``config`` when given; else
    ManifestError naming ``path`` and the first wrong key."""
    def bad(problem: str) -> ManifestError:
        return ManifestError(f"{path}: not an i2e-convert manifest ({problem})")

    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    unknown = sorted(set(data) - {"format", "tool", "config", "params", "splits", "runs"})
    if unknown:
        raise bad(f"{unknown[0]}: unknown key")
    for key, want in (("format", MANIFEST_FORMAT), ("tool", "i2e-convert")):
        if data.get(key) != want:
            raise bad(f"{key}: {data.get(key)!r}, expected {want!r}")
    try:
        check_config_name(data.get("config"), "config")
    except ValueError as exc:
        raise bad(str(exc)) from None
    if config is not None and data["config"] != config:
        raise bad(f"config: it was made for config {data['config']!r}, not {config!r}")
    if not isinstance(data.get("params"), dict) or not isinstance(data.get("splits", {}), dict) \
            or not isinstance(data.get("runs", []), list):
        raise bad("params and splits must be objects, runs a list")
    for split, entry in data.get("splits", {}).items():
        problem = _check_split(split, entry)
        if problem:
            raise bad(problem)
    return data


def read_manifest(path: str | Path, config: str | None = None) -> dict:
    """The checked manifest at ``path`` (`check_manifest`); ManifestError names the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    return check_manifest(data, path, config)


def manifest_lists(manifest: dict, file_name: str) -> bool:
    """Whether ``file_name`` is a shard of a split that the (checked) manifest records:
    ``<split>-<i>-of-<N>.parquet`` with the split's N shards and i < N."""
    m = _SHARD_ANY.fullmatch(file_name)
    entry = (manifest.get("splits") or {}).get(m.group("split")) if m else None
    return entry is not None and int(m.group("index")) < entry["shards"] and \
        file_name == shard_name(m.group("split"), int(m.group("index")), entry["shards"])
