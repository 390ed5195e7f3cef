"""Static images -> I2E parquet in the released schema (the library side of ``i2e-convert``).

Sources (``source``, kind auto-detected or given as ``source_type``):
- ``imagefolder``: a folder of class folders (``<source>/<class>/<...>/<name>.png``), or a
  folder of split folders that each hold class folders (``<source>/train/<class>/...``);
- ``hub``: a Hugging Face image dataset id (``uoft-cs/cifar10``) or a local copy of one (a
  snapshot folder, or a ``save_to_disk`` folder), read with ``datasets``;
- ``parquet``: parquet files (a file, a folder of files or a glob) with an image column
  (``datasets``' Image feature: a struct with ``bytes`` and ``path``).

Output (the layout of the hub repo UESTC-BICS/I2E, so ``datasets.load_dataset(out, config)``
and ``I2EDataModule(path=out)`` read it)::

    <out>/README.md                                        dataset card with a configs: block
    <out>/<config>/<split>-00000-of-00004.parquet          rows: file_path, label, data
    <out>/<config>/convert-manifest.json                   parameters + finished shards

Rows: ``file_path`` = "<class folder>/<source file stem, or row index>.npy", ``label`` = the
ClassLabel index of the class folder name, ``data`` = the record bytes (``i2e_train.codec``).
For an image folder the class names are its class folders (sorted numerically when they are
all numbers, else as strings); for a dataset with a ClassLabel they are the original class
indices as strings ("0", "1", ...); other label columns use their sorted distinct values.

Pipeline: DataLoader workers decode and preprocess (RGB, bicubic resize to (H, W), uint8),
the main process converts batches on the device (cuda when available) with ``I2E`` in eval
mode (canonical directions, bit-identical to the official converter) or, when asked, in
train mode (random directions from a seed), packs the bits on the device and hands finished
shards to a writer thread.

Resume: items are sorted (image folders) or kept in the dataset's row order, and shard k
holds items [k * rows_per_shard, (k + 1) * rows_per_shard), so a re-run produces identical
shards; a shard whose final file exists is kept and skipped. The manifest records the
parameters: a run with different parameters over existing shards is refused (``overwrite``
starts the config again).
"""

from __future__ import annotations

import abc
import glob
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from i2e_train.codec import pack_events, record_prefix, record_size
from i2e_train.data.catalog import CATALOG
from i2e_train.data.preprocess import preprocess_image
from i2e_train.data.writer import shard_name, write_card, write_shard
from i2e_train.files import atomic_write_json, atomic_write_text
from i2e_train.i2e import I2E, resolve_order

__all__ = [
    "ConvertError",
    "BadImageError",
    "ConvertSummary",
    "convert",
    "load_image",
    "records_from_events",
    "parse_splits",
    "resolve_device",
    "IMAGE_SUFFIXES",
    "MANIFEST",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
SPLIT_DIRS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
              "validation": "validation", "test": "test", "testing": "test"}
MANIFEST = "convert-manifest.json"
MANIFEST_FORMAT = 1
TARGET_SHARD_BYTES = 500_000_000  # rows_per_shard=None aims at shards of about this size
TIMESTEPS, CHANNELS = 8, 2


class ConvertError(ValueError):
    """Bad conversion input or parameters (the message names the file/row and what was expected)."""


class BadImageError(ConvertError):
    """An image that cannot be read, or holds NaN/Inf values."""


# =========================================================================== small helpers
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto"/None -> cuda when available, else cpu; anything else as given (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"device {str(device)!r} requested but CUDA is not available (use device=auto or cpu)")
    return dev


def parse_splits(splits: str | Sequence[str] | Mapping[str, str] | None) -> "OrderedDict[str, str] | None":
    """Output split -> source split. Accepts None (auto), "train", "train,validation=test",
    ["train", "validation=test"] or {"train": "train", "validation": "test"}."""
    if splits is None:
        return None
    if isinstance(splits, Mapping):
        out = OrderedDict((str(k), str(v if v is not None else k)) for k, v in splits.items())
    else:
        items = splits.split(",") if isinstance(splits, str) else [str(s) for s in splits]
        out = OrderedDict()
        for item in (i.strip() for i in items):
            if not item:
                continue
            dst, _, src = item.partition("=")
            out[dst.strip()] = (src or dst).strip()
    if not out:
        raise ConvertError(f"no splits given in {splits!r}")
    for dst in out:
        if not dst.replace("_", "").isalnum():
            raise ConvertError(f"output split name {dst!r} must be letters, digits and '_' (it names the shard files)")
    return out


def _sort_names(names) -> list[str]:
    names = sorted({str(n) for n in names})
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return names


def _sha256(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(str(line).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


# =========================================================================== reading images
def _array_image(arr: np.ndarray, where: str) -> Image.Image:
    """A numeric array (H, W), (H, W, C) or (C, H, W) -> PIL image (float must be in [0, 1])."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise BadImageError(f"{where}: image array has dtype {arr.dtype}, expected numbers")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise BadImageError(f"{where}: image array of shape {arr.shape}, expected (H, W), (H, W, 3|4) or (3, H, W)")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadImageError(f"{where}: image holds NaN/Inf values")
        if arr.min() < 0 or arr.max() > 1:
            raise BadImageError(
                f"{where}: float image values span [{arr.min():g}, {arr.max():g}], expected [0, 1]"
            )
        arr = np.rint(arr * 255.0)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise BadImageError(f"{where}: integer image values span [{arr.min()}, {arr.max()}], expected 0..255")
    arr = arr.astype(np.uint8)
    return Image.fromarray(arr, mode="L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA"))


def _float_mode_image(img: Image.Image, where: str) -> Image.Image:
    """PIL mode "F" (32-bit float): check finiteness, scale [0, 1] (or [0, 255]) to 8 bit."""
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise BadImageError(f"{where}: image holds NaN/Inf values")
    scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")


def load_image(value: Any, where: str = "image") -> Image.Image:
    """Decode one image: a file path, encoded bytes, a ``datasets`` Image dict ({bytes, path}),
    a PIL image or a numeric array. Raises BadImageError naming ``where`` when it cannot."""
    if value is None:
        raise BadImageError(f"{where}: missing image (None)")
    try:
        if isinstance(value, Image.Image):
            img = value
            img.load()
        elif isinstance(value, Mapping):
            if value.get("bytes") is not None:
                return load_image(bytes(value["bytes"]), where)
            if value.get("path"):
                return load_image(str(value["path"]), where)
            raise BadImageError(f"{where}: image record has neither bytes nor a path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
            img.load()
        elif isinstance(value, (str, os.PathLike)):
            with open(value, "rb") as fh:
                img = Image.open(fh)
                img.load()
        elif isinstance(value, (np.ndarray, list, tuple)) or torch.is_tensor(value):
            arr = value.numpy() if torch.is_tensor(value) else np.asarray(value)
            return _array_image(arr, where)
        else:
            raise BadImageError(f"{where}: cannot read an image from a {type(value).__name__}")
    except BadImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; all mean "unreadable"
        raise BadImageError(f"{where}: cannot read image ({type(exc).__name__}: {exc})") from None
    if img.mode in ("F", "I;16F"):
        img = _float_mode_image(img, where)
    return img


class _Reader(abc.ABC):
    """Picklable access to the raw image values of one split (runs inside DataLoader workers)."""

    @abc.abstractmethod
    def fetch(self, positions: Sequence[int]) -> list[Any]:
        """Raw values (paths, bytes, arrays) at these positions."""

    @abc.abstractmethod
    def where(self, position: int) -> str:
        """How to name this item in an error message."""


class _FileReader(_Reader):
    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def fetch(self, positions):
        return [self.files[p] for p in positions]

    def where(self, position):
        return self.files[position]


class _TableReader(_Reader):
    """Rows of a ``datasets.Dataset`` whose image column is read undecoded."""

    def __init__(self, ds, column: str, label: str) -> None:
        self.ds, self.column, self.label = ds, column, label

    def fetch(self, positions):
        return self.ds[list(int(p) for p in positions)][self.column]

    def where(self, position):
        return f"{self.label}, row {position}"


class _Images(Dataset):
    """Decode + preprocess a batch of items: (uint8 [B, 3, H, W], positions [B], [(k, error)])."""

    def __init__(self, reader: _Reader, count: int, size: tuple[int, int]) -> None:
        self.reader, self.count, self.size = reader, count, tuple(size)

    def __len__(self) -> int:
        return self.count

    def __getitems__(self, positions: Sequence[int]):
        h, w = self.size
        out = torch.zeros((len(positions), 3, h, w), dtype=torch.uint8)
        errors: list[tuple[int, str]] = []
        try:
            values = self.reader.fetch(positions)
        except Exception as exc:  # noqa: BLE001 - a failing batch read: name its first row
            where = self.reader.where(positions[0]) if len(positions) else "?"
            values = [None] * len(positions)
            errors = [(k, f"{where}: cannot read rows ({type(exc).__name__}: {exc})") for k in range(len(positions))]
            return out, torch.as_tensor(list(positions), dtype=torch.int64), errors
        for k, (pos, value) in enumerate(zip(positions, values)):
            where = self.reader.where(pos)
            try:
                img = load_image(value, where)
                out[k] = preprocess_image(img, (h, w), where)
            except BadImageError as exc:
                errors.append((k, str(exc)))
            except Exception as exc:  # noqa: BLE001 - conversion/resize failures name the file too
                errors.append((k, f"{where}: cannot preprocess image ({type(exc).__name__}: {exc})"))
        return out, torch.as_tensor(list(positions), dtype=torch.int64), errors

    def __getitem__(self, position: int):
        return self.__getitems__([position])


def _passthrough(batch):
    return batch


# =========================================================================== sources
@dataclass
class _SplitSource:
    name: str  # output split
    source_split: str
    reader: _Reader
    file_paths: list[str]  # output file_path per item
    classes: list[str]  # class folder name per item
    identity: dict[str, Any]  # what the manifest compares on resume

    @property
    def count(self) -> int:
        return len(self.file_paths)


@dataclass
class _Source:
    kind: str
    splits: list[_SplitSource]
    class_names: list[str]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _looks_like_imagefolder(root: Path) -> bool:
    if any(root.glob("*.parquet")) or any(root.glob("*/*.parquet")) or (root / "dataset_info.json").exists():
        return False
    for d in _class_dirs(root):
        if any(_is_image(p) for p in d.rglob("*")):
            return True
    return False


def _detect_kind(source: str) -> str:
    p = Path(source)
    if any(ch in source for ch in "*?["):
        return "parquet"
    if p.is_file():
        if p.suffix == ".parquet":
            return "parquet"
        raise ConvertError(f"source {source!r} is a file but not a .parquet file (give a folder of class folders, "
                           "parquet files or a Hugging Face dataset id)")
    if p.is_dir():
        if _looks_like_imagefolder(p):
            return "imagefolder"
        return "hub"  # a local copy of a hub dataset (snapshot or save_to_disk folder)
    if p.is_absolute() or source.startswith(".") or source.count("/") > 1:
        raise ConvertError(f"source {source!r} does not exist")
    return "hub"


def _imagefolder_splits(root: Path, wanted: "OrderedDict[str, str] | None") -> "OrderedDict[str, Path]":
    """Output split -> class root folder."""
    subdirs = {d.name: d for d in _class_dirs(root)}
    split_layout = bool(subdirs) and all(n.lower() in SPLIT_DIRS for n in subdirs) and all(
        any(x.is_dir() for x in d.iterdir()) for d in subdirs.values()
    )
    out: OrderedDict[str, Path] = OrderedDict()
    if wanted is None:
        if split_layout:
            for name in sorted(subdirs, key=lambda n: ("train", "validation", "test").index(SPLIT_DIRS[n.lower()])):
                dst = SPLIT_DIRS[name.lower()]
                if dst == "test" and not any(SPLIT_DIRS[n.lower()] == "validation" for n in subdirs):
                    dst = "validation"
                out[dst] = subdirs[name]
        else:
            out["train"] = root
        return out
    for dst, src in wanted.items():
        if split_layout or src in subdirs and SPLIT_DIRS.get(src.lower()):
            if src not in subdirs:
                raise ConvertError(f"split folder {str(root / src)!r} not found (found: {sorted(subdirs)})")
            out[dst] = subdirs[src]
        elif len(wanted) == 1:
            out[dst] = root
        else:
            raise ConvertError(
                f"{root}: several splits requested ({list(wanted)}) but the folder has no split folders "
                f"({', '.join(sorted(SPLIT_DIRS))}) holding class folders"
            )
    return out


def _imagefolder_source(source: str, wanted, limit: int | None) -> _Source:
    root = Path(source)
    roots = _imagefolder_splits(root, wanted)
    per_split: list[tuple[str, str, list[str], list[str], list[str]]] = []
    all_classes: set[str] = set()
    for dst, croot in roots.items():
        files, fps, classes = [], [], []
        for cdir in _class_dirs(croot):
            seen: dict[str, Path] = {}
            imgs = sorted((p for p in cdir.rglob("*") if _is_image(p)), key=lambda p: p.relative_to(cdir).as_posix())
            for p in imgs:
                rel = p.relative_to(cdir).with_suffix("").as_posix()
                if rel in seen:
                    raise ConvertError(
                        f"{seen[rel]} and {p} would both be stored as file_path {cdir.name}/{rel}.npy "
                        "(same name, different extension): rename one"
                    )
                seen[rel] = p
                files.append(str(p))
                fps.append(f"{cdir.name}/{rel}.npy")
                classes.append(cdir.name)
        if limit is not None:
            files, fps, classes = files[:limit], fps[:limit], classes[:limit]
        if not files:
            raise ConvertError(
                f"no images found under {str(croot)!r} (expected <class folder>/<image> with a suffix in "
                f"{', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        all_classes.update(classes)
        per_split.append((dst, croot.name if croot != root else ".", files, fps, classes))
    class_names = _sort_names(all_classes)
    splits = []
    for dst, src, files, fps, classes in per_split:
        identity = {"kind": "imagefolder", "source": str((root / src).resolve()) if src != "." else str(root.resolve()),
                    "count": len(files), "items_sha256": _sha256(fps)}
        splits.append(_SplitSource(dst, src, _FileReader(files), fps, classes, identity))
    return _Source("imagefolder", splits, class_names)


def _group_parquet(files: Sequence[Path]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(files):
        stem = f.name.split("-")[0].split(".")[0].split("_")[0]
        split = stem if stem.lower() in SPLIT_DIRS else (f.parent.name if f.parent.name.lower() in SPLIT_DIRS else None)
        out.setdefault(split or "train", []).append(str(f))
    return out


def _load_hf_splits(source: str, kind: str, wanted, hf_config: str | None, cache_dir: str | None) -> dict[str, Any]:
    """Source split -> datasets.Dataset (not yet restricted to the wanted splits when auto)."""
    import datasets

    if kind == "parquet":
        p = Path(source)
        if any(ch in source for ch in "*?["):
            files = [Path(f) for f in sorted(glob.glob(source, recursive=True)) if f.endswith(".parquet")]
        elif p.is_dir():
            files = sorted(p.rglob("*.parquet"))
        else:
            files = [p]
        if not files:
            raise ConvertError(f"no parquet files match {source!r}")
        groups = _group_parquet(files)
        if wanted is not None and len(wanted) == 1 and next(iter(wanted.values())) not in groups:
            groups = {next(iter(wanted.values())): [str(f) for f in files]}
        names = list(groups) if wanted is None else list(dict.fromkeys(wanted.values()))
        out = {}
        for s in names:
            if s not in groups:
                raise ConvertError(f"no parquet files for split {s!r} in {source!r} (found splits: {sorted(groups)})")
            out[s] = datasets.load_dataset("parquet", data_files={s: groups[s]}, split=s, cache_dir=cache_dir)
        return out
    p = Path(source)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(p))
        dd = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        names = list(dd) if wanted is None else list(dict.fromkeys(wanted.values()))
        missing = [s for s in names if s not in dd]
        if missing:
            raise ConvertError(f"{source}: split(s) {missing} not found (found: {sorted(dd)})")
        return {s: dd[s] for s in names}
    try:
        if wanted is None:
            names = datasets.get_dataset_split_names(source, hf_config, cache_dir=cache_dir) if not p.is_dir() else None
            if names is None:
                dd = datasets.load_dataset(source, hf_config, cache_dir=cache_dir)
                return dict(dd)
        else:
            names = list(dict.fromkeys(wanted.values()))
        return {s: datasets.load_dataset(source, hf_config, split=s, cache_dir=cache_dir) for s in names}
    except ConvertError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, missing split, unknown id: all end here
        raise ConvertError(
            f"cannot load dataset {source!r}" + (f" (config {hf_config!r})" if hf_config else "")
            + f": {type(exc).__name__}: {exc}"
        ) from exc


def _auto_split_names(names: Sequence[str]) -> "OrderedDict[str, str]":
    lower = {n.lower(): n for n in names}
    out: OrderedDict[str, str] = OrderedDict()
    for n in names:
        dst = SPLIT_DIRS.get(n.lower(), n)
        if dst == "test" and "validation" not in out.values() and not any(SPLIT_DIRS.get(x) == "validation" for x in lower):
            dst = "validation"
        out[dst] = n
    return OrderedDict(sorted(out.items(), key=lambda kv: {"train": 0, "validation": 1}.get(kv[0], 2)))


def _pick_column(names: Sequence[str], given: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    if given:
        if given not in names:
            raise ConvertError(f"{where}: {what} column {given!r} not found; columns: {list(names)}")
        return given
    for c in candidates:
        if c in names:
            return c
    raise ConvertError(
        f"{where}: no {what} column found (looked for {', '.join(candidates)}); columns: {list(names)}. "
        f"Name it with {what}_column=<name>"
    )


def _hf_source(source: str, kind: str, wanted, hf_config, image_column, label_column, cache_dir, limit) -> _Source:
    import datasets

    loaded = _load_hf_splits(source, kind, wanted, hf_config, cache_dir)
    mapping = _auto_split_names(list(loaded)) if wanted is None else wanted
    prepared = []
    label_kind, class_label_names = None, None
    for dst, src in mapping.items():
        ds = loaded[src]
        where = f"{source} split {src!r}"
        img_col = _pick_column(ds.column_names, image_column, IMAGE_COLUMNS, "image", where)
        lab_col = _pick_column(ds.column_names, label_column, LABEL_COLUMNS, "label", where)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        if len(ds) == 0:
            raise ConvertError(f"{where}: no rows")
        feat = ds.features.get(img_col)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(img_col, datasets.Image(decode=False))
        lab_feat = ds.features.get(lab_col)
        if isinstance(lab_feat, datasets.ClassLabel):
            label_kind = "classlabel"
            class_label_names = class_label_names or list(lab_feat.names)
            if len(lab_feat.names) != len(class_label_names):
                raise ConvertError(f"{where}: ClassLabel has {len(lab_feat.names)} classes, other splits have "
                                   f"{len(class_label_names)}")
        labels = ds.with_format("arrow")[lab_col].to_pylist()  # respects select()'s indices mapping
        prepared.append((dst, src, ds, img_col, lab_col, labels, where))
    # class folder names
    if label_kind == "classlabel":
        class_names = [str(i) for i in range(len(class_label_names))]
    else:
        class_names = _sort_names(lab for *_, labels, _w in prepared for lab in labels if lab is not None)
    splits = []
    for dst, src, ds, img_col, lab_col, labels, where in prepared:
        fps, classes = [], []
        for i, lab in enumerate(labels):
            if lab is None or (label_kind == "classlabel" and not 0 <= int(lab) < len(class_names)):
                raise ConvertError(f"{where}, row {i}: label {lab!r} is not a class "
                                   f"(column {lab_col!r}; unlabelled splits cannot be converted)")
            name = str(int(lab)) if label_kind == "classlabel" else str(lab)
            fps.append(f"{name}/{i}.npy")
            classes.append(name)
        identity = {"kind": kind, "source": str(Path(source).resolve()) if Path(source).exists() else source,
                    "hf_config": hf_config, "split": src, "image_column": img_col, "label_column": lab_col,
                    "count": len(fps), "items_sha256": _sha256(fps)}
        reader = _TableReader(ds.select_columns([img_col]), img_col, where)
        splits.append(_SplitSource(dst, src, reader, fps, classes, identity))
    return _Source(kind, splits, class_names)


def _open_source(source, source_type, wanted, hf_config, image_column, label_column, cache_dir, limit) -> _Source:
    source = str(source)
    kind = _detect_kind(source) if source_type in (None, "auto") else source_type
    if kind == "imagefolder":
        if not Path(source).is_dir():
            raise ConvertError(f"image folder {source!r} does not exist")
        return _imagefolder_source(source, wanted, limit)
    if kind in ("hub", "parquet"):
        return _hf_source(source, kind, wanted, hf_config, image_column, label_column, cache_dir, limit)
    raise ConvertError(f"source_type must be auto, imagefolder, hub or parquet, got {source_type!r}")


# =========================================================================== records
def records_from_packed(packed: np.ndarray, shape: Sequence[int]) -> list[bytes]:
    """Packed payloads uint8 [B, N] -> record bytes (same bytes as ``codec.encode_record``)."""
    prefix = record_prefix(shape)
    return [prefix + row.tobytes() for row in packed]


def _convert_packed(conv: I2E, images: torch.Tensor, generator) -> torch.Tensor:
    """images [B, 3, H, W] -> packed payloads uint8 [B, N] on the device (no dense event tensor
    when the converter has ``forward_packed``; else events [T, B, 2, H, W] + ``pack_events``)."""
    fwd = getattr(conv, "forward_packed", None)
    if fwd is not None:
        return fwd(images, generator=generator)
    return pack_events(conv(images, generator=generator))


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def _popcount(packed: np.ndarray) -> int:
    """Number of set bits (= events) in packed payloads."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT[packed].sum())


def records_from_events(events: torch.Tensor) -> list[bytes]:
    """Events [T, B, C, H, W] (any device) -> B records, packed on the events' device."""
    t, _, c, h, w = events.shape
    packed = pack_events(events).cpu().numpy()
    return records_from_packed(packed, (t, c, h, w))


# =========================================================================== manifest + card
@dataclass
class ConvertSummary:
    out: str
    config: str
    splits: dict[str, int]  # split -> total rows (after skipped bad images)
    samples: int  # converted in this run
    shards_written: int
    shards_skipped: int  # already there from an earlier run
    shards_total: int
    seconds: float
    images_per_s: float
    event_rate: float | None  # mean fraction of ON+OFF events over all rows of the converted splits
    published_event_rate: float | None
    bad_images: int
    bad_examples: list[str] = field(default_factory=list)
    complete: bool = True
    device: str = "cpu"

    def format(self) -> str:
        rate = "n/a" if self.event_rate is None else f"{100 * self.event_rate:.2f}%"
        if self.published_event_rate is not None:
            rate += f" (published for {self.config}: {100 * self.published_event_rate:.2f}%)"
        lines = [
            f"i2e-convert {self.config} -> {self.out} ({'complete' if self.complete else 'INCOMPLETE: run again to resume'})",
            f"  splits:          {', '.join(f'{k}={v}' for k, v in self.splits.items())}",
            f"  samples:         {self.samples} converted in this run on {self.device}",
            f"  shards:          {self.shards_written} written, {self.shards_skipped} kept from an earlier run, "
            f"{self.shards_total} in total",
            f"  time:            {self.seconds:.1f} s, {self.images_per_s:.1f} images/s",
            f"  mean event rate: {rate}",
        ]
        if self.bad_images:
            lines.append(f"  bad images:      {self.bad_images} skipped, e.g. {self.bad_examples[0]}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_card(path: Path) -> tuple[dict, str]:
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
        raise ConvertError(f"{path}: unreadable dataset card front matter ({exc})") from None
    return (meta if isinstance(meta, dict) else {}), parts[2].strip()


def _update_card(out: Path, config: str, splits: Sequence[str], description: str) -> Path:
    """Add/extend ``config`` in the card's configs block; other configs and text are kept."""
    card = out / "README.md"
    meta, body = _read_card(card)
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


def _diff(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# =========================================================================== the conversion
def _auto_rows_per_shard(shape) -> int:
    return max(1, TARGET_SHARD_BYTES // record_size(shape))


def _shard_seed(seed: int, split: str, shard: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}/{shard}".encode()).digest()[:8], "little") >> 1


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: str,
    splits: str | Sequence[str] | Mapping[str, str] | None = None,
    resolution: int | Sequence[int] | None = None,
    ratio: float | None = None,
    order: int | Sequence[int] | None = None,
    *,
    source_type: str = "auto",
    hf_config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    rows_per_shard: int | None = None,
    device: str | torch.device | None = "auto",
    train_mode: bool = False,
    seed: int = 0,
    padding_mode: str = "replicate",
    on_bad_image: str = "raise",
    overwrite: bool = False,
    limit: int | None = None,
    max_shards: int | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    on_shard: Callable[[Path], None] | None = None,
) -> ConvertSummary:
    """Convert ``source`` images into ``<out>/<config>/<split>-*.parquet`` (released I2E schema).

    Args:
        source: image folder, Hugging Face dataset id / local copy, or parquet file(s).
        out: output folder (the dataset repo root: README.md + one folder per config).
        config: output config name, e.g. "I2E-CIFAR10". A catalog name supplies the defaults
            for resolution, ratio and order.
        splits: output split -> source split (None: every split found; a source "test" split
            becomes "validation" when there is no validation split). See ``parse_splits``.
        resolution: H (square) or (H, W). ratio: threshold ratio. order: preset 0..5 or 8 groups.
        batch_size: images per converter call. num_workers: DataLoader workers (decode/resize).
        rows_per_shard: rows per parquet shard (None: about 500 MB per shard).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda:1", ...
        train_mode: random direction vectors (I2E augmentation) drawn from ``seed``; the draw
            is seeded per shard, so a resumed run gives the same bytes as a clean one.
        on_bad_image: "raise" (stop with an error naming the file) or "skip" (drop the image,
            count it in the summary and the manifest).
        overwrite: delete the config's existing shards and manifest first.
        limit: convert only the first ``limit`` items of each split (quick tries).
        max_shards: stop after writing this many shards (the rest is done by a later run).
        on_shard: called with the path of every shard written.
    """
    t0 = time.perf_counter()
    if on_bad_image not in ("raise", "skip"):
        raise ConvertError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
    if batch_size < 1:
        raise ConvertError(f"batch_size must be >= 1, got {batch_size}")
    info = CATALOG.get(config)
    if resolution is None:
        if info is None:
            raise ConvertError(f"resolution is required for config {config!r} (not a catalog config)")
        resolution = info.resolution
    size = (int(resolution), int(resolution)) if isinstance(resolution, (int, np.integer)) else tuple(int(x) for x in resolution)
    if len(size) != 2 or min(size) < 1:
        raise ConvertError(f"resolution must be H or (H, W) with positive sizes, got {resolution!r}")
    if ratio is None:
        if info is None or info.ratio is None:
            raise ConvertError(f"ratio is required for config {config!r} (not a catalog config)")
        ratio = info.ratio
    if order is None:
        order = info.order if info is not None and info.order is not None else 4
    groups = list(resolve_order(order if isinstance(order, int) else list(order)))
    shape = (TIMESTEPS, CHANNELS, *size)
    rows = int(rows_per_shard) if rows_per_shard else _auto_rows_per_shard(shape)
    if rows < 1:
        raise ConvertError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    dev = resolve_device(device)

    wanted = parse_splits(splits)
    src = _open_source(source, source_type, wanted, hf_config, image_column, label_column, cache_dir, limit)

    out = Path(out)
    cfg_dir = out / config
    manifest_path = cfg_dir / MANIFEST
    params = {
        "resolution": list(size), "ratio": float(ratio), "order": groups, "timesteps": TIMESTEPS,
        "padding_mode": padding_mode, "train_mode": bool(train_mode), "rows_per_shard": rows,
        "class_names": src.class_names,
    }
    if train_mode:  # the random draws depend on these too
        params.update(seed=int(seed), batch_size=int(batch_size), device_type=dev.type)

    if overwrite and cfg_dir.exists():
        for f in list(cfg_dir.glob("*.parquet")) + [manifest_path]:
            if f.exists():
                f.unlink()
    manifest = _load_manifest(manifest_path, cfg_dir, config, params, src)

    # plan: shards per split, which exist
    class_index = {n: i for i, n in enumerate(src.class_names)}
    plans = []
    for sp in src.splits:
        n_shards = math.ceil(sp.count / rows)
        names = [shard_name(sp.name, k, n_shards) for k in range(n_shards)]
        stale = sorted(p.name for p in cfg_dir.glob(f"{sp.name}-*.parquet") if p.name not in names)
        if stale:
            raise ConvertError(f"{cfg_dir}: shard files {stale} do not belong to this conversion of split "
                               f"{sp.name!r} ({n_shards} shards); remove them or use overwrite=true")
        entry = manifest["splits"].setdefault(sp.name, {"source": sp.identity, "count": sp.count,
                                                        "shards": n_shards, "done": {}})
        pending = []
        for k, name in enumerate(names):
            path = cfg_dir / name
            if path.exists():
                stats = _check_existing_shard(path, entry["done"].get(name), min(rows, sp.count - k * rows))
                entry["done"][name] = stats
            else:
                entry["done"].pop(name, None)
                pending.append(k)
        plans.append((sp, n_shards, names, pending))
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for tmp in cfg_dir.glob(".*.parquet.tmp-*"):  # a shard whose writer was killed: never complete
        log.info("removing the unfinished shard %s", tmp)
        tmp.unlink(missing_ok=True)
    manifest["params"] = params
    _save_manifest(manifest_path, manifest)

    conv = I2E(ratio=float(ratio), order=groups, padding_mode=padding_mode, dtype=torch.bool).to(dev)
    conv.train(bool(train_mode))
    total_pending = sum(min(rows, sp.count - k * rows) for sp, _, _, pending in plans for k in pending)
    skipped = sum(len(names) - len(pending) for _, _, names, pending in plans)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_pending, unit="img", desc=f"i2e-convert {config}", disable=not progress, dynamic_ncols=True)
    written, converted, bad, bad_examples = 0, 0, 0, []
    stopped = False
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="i2e-shard-writer")
    inflight: list[tuple[Future, str, str, dict]] = []

    def finish_writes(keep: int = 0) -> None:
        nonlocal written
        while len(inflight) > keep:
            fut, split_name, name, stats = inflight.pop(0)
            path = fut.result()
            manifest["splits"][split_name]["done"][name] = stats
            _save_manifest(manifest_path, manifest)
            written += 1
            if on_shard is not None:
                on_shard(path)

    try:
        for sp, n_shards, names, pending in plans:
            if stopped or not pending:
                continue
            batches = [
                list(range(start, min(start + batch_size, end)))
                for k in pending
                for end in [min((k + 1) * rows, sp.count)]
                for start in range(k * rows, end, batch_size)
            ]
            loader = DataLoader(
                _Images(sp.reader, sp.count, size), batch_sampler=batches, num_workers=num_workers,
                collate_fn=_passthrough, pin_memory=dev.type == "cuda",
            )
            buf: dict[str, list] = {"fps": [], "labels": [], "records": [], "events": 0, "bad": []}
            gen = None
            for images, positions, errors in loader:
                first = int(positions[0])
                shard, offset = divmod(first, rows)
                if offset == 0 and train_mode:
                    gen = torch.Generator(device=dev).manual_seed(_shard_seed(int(seed), sp.name, shard))
                keep = torch.ones(len(positions), dtype=torch.bool)
                for k, msg in errors:
                    if on_bad_image == "raise":
                        raise BadImageError(msg + " (on_bad_image=skip drops such images)")
                    keep[k] = False
                    bad += 1
                    buf["bad"].append(sp.file_paths[int(positions[k])])
                    if len(bad_examples) < 20:
                        bad_examples.append(msg)
                    log.warning("skipping bad image: %s", msg)
                with torch.no_grad():
                    packed_dev = _convert_packed(conv, images.to(dev, non_blocking=True), gen)  # uint8 [B, N]
                    if not bool(keep.all()):
                        packed_dev = packed_dev[keep.to(dev)]
                    packed = packed_dev.cpu().numpy()
                buf["events"] += _popcount(packed)
                kept = positions[keep].tolist()
                buf["records"].extend(records_from_packed(packed, shape))
                buf["fps"].extend(sp.file_paths[p] for p in kept)
                buf["labels"].extend(class_index[sp.classes[p]] for p in kept)
                converted += len(kept)
                bar.update(len(positions))
                if int(positions[-1]) + 1 == min((shard + 1) * rows, sp.count):  # shard complete
                    stats = {"rows": len(buf["records"]), "events": buf["events"], "bad": buf["bad"]}
                    finish_writes(keep=0)
                    fut = pool.submit(write_shard, cfg_dir / names[shard], buf["fps"], buf["labels"],
                                      buf["records"], src.class_names)
                    inflight.append((fut, sp.name, names[shard], stats))
                    buf = {"fps": [], "labels": [], "records": [], "events": 0, "bad": []}
                    if max_shards is not None and written + len(inflight) >= max_shards:
                        stopped = True
                        break
            del loader
        finish_writes(keep=0)
    finally:
        bar.close()
        try:
            finish_writes(keep=0)  # a shard already handed to the writer is finished, never lost
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        pool.shutdown(wait=True)

    # summary over every shard of the converted splits
    complete = all((cfg_dir / name).exists() for _, _, names, _ in plans for name in names)
    total_rows, total_events, known_rows = {}, 0, 0
    for sp, _, names, _ in plans:
        done = manifest["splits"][sp.name]["done"]
        total_rows[sp.name] = sum(done[n]["rows"] for n in names if n in done)
        total_events += sum(done[n]["events"] for n in names if n in done)
        known_rows += total_rows[sp.name]
    per_sample = int(np.prod(shape))
    if complete:
        description = (f"{config}: source {source}, {size[0]}x{size[1]}, ratio {ratio}, order {groups}, "
                       f"{'train-mode random directions, seed ' + str(seed) if train_mode else 'eval mode'}.")
        _update_card(out, config, [sp.name for sp in src.splits], description)
    seconds = time.perf_counter() - t0
    summary = ConvertSummary(
        out=str(out), config=config, splits=total_rows, samples=converted, shards_written=written,
        shards_skipped=skipped, shards_total=sum(len(n) for _, _, n, _ in plans), seconds=seconds,
        images_per_s=converted / seconds if seconds > 0 else 0.0,
        event_rate=total_events / (known_rows * per_sample) if known_rows else None,
        published_event_rate=info.event_rate if info is not None and info.ratio == float(ratio) else None,
        bad_images=bad, bad_examples=bad_examples, complete=complete, device=str(dev),
    )
    manifest.setdefault("runs", []).append({
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3), "converted": converted,
        "shards_written": written, "bad_images": bad, "device": str(dev), "batch_size": batch_size,
        "num_workers": num_workers, "complete": complete,
    })
    _save_manifest(manifest_path, manifest)
    return summary


def _load_manifest(path: Path, cfg_dir: Path, config: str, params: dict, src: _Source) -> dict:
    fresh = {"format": MANIFEST_FORMAT, "tool": "i2e-convert", "config": config, "params": params, "splits": {}}
    shards = sorted(p.name for p in cfg_dir.glob("*.parquet")) if cfg_dir.is_dir() else []
    if not path.exists():
        if shards:
            raise ConvertError(
                f"{cfg_dir} already holds parquet shards ({', '.join(shards[:3])}{'...' if len(shards) > 3 else ''}) "
                f"but no {MANIFEST}: refusing to mix them with a new conversion. Use another config name or "
                "output folder, or overwrite=true to delete them"
            )
        return fresh
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: unreadable manifest ({exc}); delete it and the shards, or use overwrite=true") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConvertError(f"{path}: manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    hint = (f"Existing shards in {cfg_dir} were made with other parameters: refusing to resume. Convert into "
            f"another output folder or config name, or pass overwrite=true to delete them and start again.")
    diff = _diff(manifest.get("params", {}), params)
    if diff:
        raise ConvertError(f"{hint}\n  changed: " + "\n  changed: ".join(diff))
    for sp in src.splits:
        old = manifest.get("splits", {}).get(sp.name)
        if old is not None:
            d = _diff(old.get("source", {}), sp.identity)
            if d:
                raise ConvertError(f"{hint}\n  split {sp.name!r} source changed: " + "; ".join(d))
    manifest.setdefault("splits", {})
    return manifest


def _save_manifest(path: Path, manifest: dict) -> None:
    atomic_write_json(path, manifest, indent=1)


def _check_existing_shard(path: Path, stats: dict | None, expected_max: int) -> dict:
    """Validate a shard kept from an earlier run; returns its stats (recounted if unknown)."""
    import pyarrow.parquet as pq

    try:
        n = pq.read_metadata(path).num_rows
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"{path}: existing shard is unreadable ({exc}); delete it and run again") from None
    if stats is not None and n != stats.get("rows"):
        raise ConvertError(f"{path}: existing shard holds {n} rows, the manifest says {stats.get('rows')}; "
                           "delete it and run again")
    if n > expected_max:
        raise ConvertError(f"{path}: existing shard holds {n} rows, at most {expected_max} expected")
    if stats is not None:
        return stats
    # written but not recorded (interrupted between the rename and the manifest update): recount
    from i2e_train.codec import parse_record

    events = 0
    for i, data in enumerate(pq.read_table(path, columns=["data"]).column("data").to_pylist()):
        events += _popcount(parse_record(data, f"{path} row {i}").payload)
    return {"rows": n, "events": events, "bad": []}
