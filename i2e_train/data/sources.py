"""Where static images come from: image folders, Hugging Face datasets (hub id or local copy) and
parquet files, read the same way by ``i2e-convert`` and by the online-mode ImageDataModule.

Kinds (``source_type``, auto-detected by `detect_kind`):
- ``imagefolder``: a folder of class folders (``<source>/<class>/<...>/<name>.png``), or a
  folder of split folders that each hold class folders (``<source>/train/<class>/...``);
- ``hub``: a Hugging Face image dataset id (``owner/name``, e.g. ``uoft-cs/cifar10``) or a local
  copy of one (a snapshot folder, or a ``save_to_disk`` folder), read with ``datasets``. Local
  first: a name is looked up on the Hub only when no file or folder of that name exists here and
  it has the form of a Hub id; anything else is refused before any network call, and a lookup
  that cannot reach the Hub says so, naming the source;
- ``parquet``: parquet files (a file, a folder of files or a glob) with an image column
  (``datasets``' Image feature: a struct with ``bytes`` and ``path``).

`open_source` gives an `ImageSource`: the class names and, per split, a picklable
`Reader` of the raw image values (run inside DataLoader workers), the output
``file_path`` and class name of every item, and an identity that a resumed conversion compares.
Class names: for an image folder its class folders (sorted numerically when they are all
numbers, else as strings); for a dataset with a ClassLabel the original class indices as
strings ("0", "1", ...); other label columns their sorted distinct values.
`load_image` decodes any raw value (path, bytes, ``datasets`` Image dict, PIL image,
array) or raises `BadImageError` naming the file or row.
"""

from __future__ import annotations

import abc
import glob
import hashlib
import io
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["SourceError", "BadImageError", "ImageSource", "SplitSource", "Reader", "FileReader", "TableReader",
           "open_source", "detect_kind", "load_image", "sort_class_names", "IMAGE_SUFFIXES", "IMAGE_COLUMNS",
           "LABEL_COLUMNS", "SPLIT_DIRS"]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # owner/name, as the Hub spells ids
SPLIT_DIRS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
              "validation": "validation", "test": "test", "testing": "test"}


class SourceError(ValueError):
    """A source that cannot be read as asked (the message names the folder/file/row and what was expected)."""


class BadImageError(SourceError):
    """An image that cannot be read, or holds NaN/Inf values."""


def sort_class_names(names) -> list[str]:
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

class Reader(abc.ABC):
    """Picklable access to the raw image values of one split (runs inside DataLoader workers)."""

    @abc.abstractmethod
    def fetch(self, positions: Sequence[int]) -> list[Any]:
        """Raw values (paths, bytes, arrays) at these positions."""

    @abc.abstractmethod
    def where(self, position: int) -> str:
        """How to name this item in an error message."""


class FileReader(Reader):
    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def fetch(self, positions):
        return [self.files[p] for p in positions]

    def where(self, position):
        return self.files[position]


class TableReader(Reader):
    """Rows of a ``datasets.Dataset`` whose image column is read undecoded."""

    def __init__(self, ds, column: str, label: str) -> None:
        self.ds, self.column, self.label = ds, column, label

    def fetch(self, positions):
        return self.ds[list(int(p) for p in positions)][self.column]

    def where(self, position):
        return f"{self.label}, row {position}"

@dataclass
class SplitSource:
    """One split of a source: its items in a fixed order (the order shards are cut in)."""

    name: str  # output split
    source_split: str
    reader: Reader
    file_paths: list[str]  # output file_path per item
    classes: list[str]  # class folder name per item
    identity: dict[str, Any]  # what the manifest compares on resume

    @property
    def count(self) -> int:
        return len(self.file_paths)


@dataclass
class ImageSource:
    """An opened source: its kind, its splits and the class names shared by all of them."""

    kind: str
    splits: list[SplitSource]
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


def detect_kind(source: str) -> str:
    p = Path(source)
    if any(ch in source for ch in "*?["):
        return "parquet"
    if p.is_file():
        if p.suffix == ".parquet":
            return "parquet"
        raise SourceError(f"source {source!r} is a file but not a .parquet file (give a folder of class folders, "
                           "parquet files or a Hugging Face dataset id)")
    if p.is_dir():
        if _looks_like_imagefolder(p):
            return "imagefolder"
        return "hub"  # a local copy of a hub dataset (snapshot or save_to_disk folder)
    if not _HUB_ID.fullmatch(source) or ".." in source or "--" in source or source.endswith(".git"):
        raise SourceError(f"source {source!r} does not exist: no local folder or file of that name, and not a "
                          "Hugging Face Hub dataset (a Hub id reads owner/name, e.g. uoft-cs/cifar10); check the path")
    if p.parent.is_dir():  # owner/name where owner is a local folder: a path, not a Hub id
        raise SourceError(f"source {source!r} does not exist: {p.parent} is a local folder without {p.name!r} in it "
                          "(so this is a path, not a Hugging Face Hub id); check the path")
    return "hub"


def _hub_failure(source: str, exc: BaseException) -> str | None:
    """What a failed Hub lookup of ``source`` (no such local path) means, when the error says
    so: the Hub unreachable / offline mode, or no such dataset. None: some other failure."""
    names = set()
    err: BaseException | None = exc
    while err is not None and len(names) < 100:
        names.update(c.__name__ for c in type(err).__mro__)
        names.add(str(err).rpartition("(")[2].rstrip(")"))  # datasets names the hub library's error in brackets
        err = err.__cause__ or err.__context__
    lead = f"source {source!r}: no local folder or file of that name"
    if names & {"OfflineModeIsEnabled"}:
        return (f"{lead}, and offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) with no cached copy, so it "
                "cannot be looked up as a Hugging Face Hub dataset; check the path, or unset offline mode")
    if names & {"ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "TimeoutException", "NetworkError",
                "LocalEntryNotFoundError", "gaierror"}:
        return (f"{lead}, and the Hugging Face Hub cannot be reached to look it up as a dataset id (network "
                "unreachable); check the path, or download it where there is network (hf download "
                f"{source} --repo-type dataset --local-dir <folder>) and pass source=<folder>")
    if names & {"DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"}:
        return f"{lead}, and not a Hugging Face Hub dataset (or a gated one you have no access to); check the name"
    return None


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
                raise SourceError(f"split folder {str(root / src)!r} not found (found: {sorted(subdirs)})")
            out[dst] = subdirs[src]
        elif len(wanted) == 1:
            out[dst] = root
        else:
            raise SourceError(
                f"{root}: several splits requested ({list(wanted)}) but the folder has no split folders "
                f"({', '.join(sorted(SPLIT_DIRS))}) holding class folders"
            )
    return out


def _imagefolder_source(source: str, wanted, limit: int | None) -> ImageSource:
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
                    raise SourceError(
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
            raise SourceError(
                f"no images found under {str(croot)!r} (expected <class folder>/<image> with a suffix in "
                f"{', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        all_classes.update(classes)
        per_split.append((dst, croot.name if croot != root else ".", files, fps, classes))
    class_names = sort_class_names(all_classes)
    splits = []
    for dst, src, files, fps, classes in per_split:
        identity = {"kind": "imagefolder", "source": str((root / src).resolve()) if src != "." else str(root.resolve()),
                    "count": len(files), "items_sha256": _sha256(fps)}
        splits.append(SplitSource(dst, src, FileReader(files), fps, classes, identity))
    return ImageSource("imagefolder", splits, class_names)


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
            raise SourceError(f"no parquet files match {source!r}")
        groups = _group_parquet(files)
        if wanted is not None and len(wanted) == 1 and next(iter(wanted.values())) not in groups:
            groups = {next(iter(wanted.values())): [str(f) for f in files]}
        names = list(groups) if wanted is None else list(dict.fromkeys(wanted.values()))
        out = {}
        for s in names:
            if s not in groups:
                raise SourceError(f"no parquet files for split {s!r} in {source!r} (found splits: {sorted(groups)})")
            out[s] = datasets.load_dataset("parquet", data_files={s: groups[s]}, split=s, cache_dir=cache_dir)
        return out
    p = Path(source)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(p))
        dd = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        names = list(dd) if wanted is None else list(dict.fromkeys(wanted.values()))
        missing = [s for s in names if s not in dd]
        if missing:
            raise SourceError(f"{source}: split(s) {missing} not found (found: {sorted(dd)})")
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
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, missing split, unknown id: all end here
        plain = None if p.exists() else _hub_failure(source, exc)
        if plain is not None:
            raise SourceError(plain) from exc
        raise SourceError(
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
            raise SourceError(f"{where}: {what} column {given!r} not found; columns: {list(names)}")
        return given
    for c in candidates:
        if c in names:
            return c
    raise SourceError(
        f"{where}: no {what} column found (looked for {', '.join(candidates)}); columns: {list(names)}. "
        f"Name it with {what}_column=<name>"
    )


def _hf_source(source: str, kind: str, wanted, hf_config, image_column, label_column, cache_dir, limit) -> ImageSource:
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
            raise SourceError(f"{where}: no rows")
        feat = ds.features.get(img_col)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(img_col, datasets.Image(decode=False))
        lab_feat = ds.features.get(lab_col)
        if isinstance(lab_feat, datasets.ClassLabel):
            label_kind = "classlabel"
            class_label_names = class_label_names or list(lab_feat.names)
            if len(lab_feat.names) != len(class_label_names):
                raise SourceError(f"{where}: ClassLabel has {len(lab_feat.names)} classes, other splits have "
                                   f"{len(class_label_names)}")
        labels = ds.with_format("arrow")[lab_col].to_pylist()  # respects select()'s indices mapping
        prepared.append((dst, src, ds, img_col, lab_col, labels, where))
    # class folder names
    if label_kind == "classlabel":
        class_names = [str(i) for i in range(len(class_label_names))]
    else:
        class_names = sort_class_names(lab for *_, labels, _w in prepared for lab in labels if lab is not None)
    splits = []
    for dst, src, ds, img_col, lab_col, labels, where in prepared:
        fps, classes = [], []
        for i, lab in enumerate(labels):
            if lab is None or (label_kind == "classlabel" and not 0 <= int(lab) < len(class_names)):
                raise SourceError(f"{where}, row {i}: label {lab!r} is not a class "
                                   f"(column {lab_col!r}; unlabelled splits cannot be converted)")
            name = str(int(lab)) if label_kind == "classlabel" else str(lab)
            fps.append(f"{name}/{i}.npy")
            classes.append(name)
        identity = {"kind": kind, "source": str(Path(source).resolve()) if Path(source).exists() else source,
                    "hf_config": hf_config, "split": src, "image_column": img_col, "label_column": lab_col,
                    "count": len(fps), "items_sha256": _sha256(fps)}
        reader = TableReader(ds.select_columns([img_col]), img_col, where)
        splits.append(SplitSource(dst, src, reader, fps, classes, identity))
    return ImageSource(kind, splits, class_names)


def open_source(source, source_type, wanted, hf_config, image_column, label_column, cache_dir, limit) -> ImageSource:
    """Open ``source`` (kind ``source_type`` or auto-detected) for the splits ``wanted`` (output
    split -> source split; None: every split found, "test" named "validation" when there is none),
    at most ``limit`` items per split (None: all)."""
    source = str(source)
    kind = detect_kind(source) if source_type in (None, "auto") else source_type
    if kind == "imagefolder":
        if not Path(source).is_dir():
            raise SourceError(f"image folder {source!r} does not exist")
        return _imagefolder_source(source, wanted, limit)
    if kind in ("hub", "parquet"):
        return _hf_source(source, kind, wanted, hf_config, image_column, label_column, cache_dir, limit)
    raise SourceError(f"source_type must be auto, imagefolder, hub or parquet, got {source_type!r}")
