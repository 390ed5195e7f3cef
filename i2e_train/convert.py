"""Static images -> I2E parquet in the released schema (the library side of ``i2e-convert``).

Sources: an image folder, a Hugging Face dataset (id or local copy) or parquet files, read by
`i2e_train.data.sources`.

Output (the layout of the hub repo UESTC-BICS/I2E, so ``datasets.load_dataset(out, config)``
and ``I2EDataModule(path=out)`` read it)::

    <out>/README.md                                        dataset card with a configs: block
    <out>/<config>/<split>-00000-of-00004.parquet          rows: file_path, label, data
    <out>/<config>/convert-manifest.json                   parameters + finished shards
    <out>/<config>/.i2e-convert.lock                       while a conversion runs: its owner

Rows: ``file_path`` = "<class folder>/<source file stem, or row index>.npy", ``label`` = the
ClassLabel index of the class folder name, ``data`` = the record bytes (``i2e_train.codec``).

Steps of [`convert`][i2e_train.convert.convert]: resolve the settings (catalog defaults for a known config), open the
source, load or start the manifest, plan the shards of every split (which exist already), then
per split: DataLoader workers decode and preprocess (RGB, uint8, torchvision v2 resize to (H, W), see
``interpolation``), the
main process converts batches on the device (cuda when available) with ``I2E`` in eval mode
(canonical directions, bit-identical to the official converter) or, when asked, in train mode
(random directions from a seed per shard), packs the bits on the device and hands each finished
shard to a writer thread; last, the summary, the dataset card and the manifest.

Resume: items are sorted (image folders) or kept in the dataset's row order, and shard k
holds items [k * rows_per_shard, (k + 1) * rows_per_shard), so a re-run produces identical
shards; a shard whose final file exists is kept and skipped. The manifest records the
parameters: a run with different parameters over existing shards is refused (``overwrite``
starts the config again).

Confinement: ``config`` is a name, never a path (``check_config_name``), and every file this
writes or deletes is inside ``<out>/<config>/`` (a real folder, not a link), or the card
``<out>/README.md``. ``overwrite`` deletes only the shards that the folder's manifest, checked
against its schema first, lists as its own, then the manifest; any other file is left alone (an
unlisted parquet file stops the overwrite before anything is deleted). One writer per config
folder: a conversion holds an exclusive lock (``i2e_train.files.exclusive_lock``) on
``<out>/<config>/.i2e-convert.lock`` from the manifest check to its last write, so a second
conversion into the same folder is refused naming the running one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from i2e_train.codec import count_events, pack_events, record_size, records_from_packed
from i2e_train.data.catalog import CATALOG, DatasetInfo
from i2e_train.data.preprocess import check_interpolation, preprocess_image
from i2e_train.data.sources import (
    BadImageError,
    ImageSource,
    Reader,
    SplitSource,
    load_image,
    open_source,
)
from i2e_train.data.writer import (
    MANIFEST,
    MANIFEST_FORMAT,
    ManifestError,
    check_config_name,
    manifest_lists,
    read_manifest,
    shard_name,
    update_card,
    write_shard,
)
from i2e_train.files import LockHeld, atomic_write_json, describe_owner, exclusive_lock, remove_stale_temporaries
from i2e_train.i2e import I2E, resolve_order

__all__ = ["ConvertError", "ConvertSummary", "convert", "parse_splits", "resolve_device", "MANIFEST", "LOCK"]

log = logging.getLogger(__name__)

LOCK = ".i2e-convert.lock"  # <out>/<config>/ while a conversion writes there (its owner inside)
CARD_LOCK = ".i2e-convert-card.lock"  # <out>/ while a conversion updates the card README.md
TARGET_SHARD_BYTES = 500_000_000  # rows_per_shard=None aims at shards of about this size
TIMESTEPS, CHANNELS = 8, 2


class ConvertError(ValueError):
    """Bad conversion parameters, or existing output that does not fit them (the message says what)."""


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



class _Images(Dataset):
    """Decode + preprocess a batch of items: (uint8 [B, 3, H, W], positions [B], [(k, error)])."""

    def __init__(self, reader: Reader, count: int, size: tuple[int, int], interpolation: str = "bilinear",
                 resize_shorter: int | None = None) -> None:
        self.reader, self.count, self.size = reader, count, tuple(size)
        self.interpolation, self.resize_shorter = interpolation, resize_shorter

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
                out[k] = preprocess_image(img, (h, w), where, self.interpolation, self.resize_shorter)
            except BadImageError as exc:
                errors.append((k, str(exc)))
            except Exception as exc:  # noqa: BLE001 - conversion/resize failures name the file too
                errors.append((k, f"{where}: cannot preprocess image ({type(exc).__name__}: {exc})"))
        return out, torch.as_tensor(list(positions), dtype=torch.int64), errors

    def __getitem__(self, position: int):
        return self.__getitems__([position])


def _passthrough(batch):
    return batch


def _convert_packed(conv: I2E, images: torch.Tensor, generator) -> torch.Tensor:
    """images [B, 3, H, W] -> packed payloads uint8 [B, N] on the device (no dense event tensor
    when the converter has ``forward_packed``; else events [T, B, 2, H, W] + ``pack_events``)."""
    fwd = getattr(conv, "forward_packed", None)
    if fwd is not None:
        return fwd(images, generator=generator)
    return pack_events(conv(images, generator=generator))



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


def _shown(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new), key=str)
    return [f"{k}: {_shown(old.get(k))} -> {_shown(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def _checked_manifest(path: Path, cfg_dir: Path, config: str, doing: str) -> dict:
    """The manifest at ``path`` checked against its schema (for this config); ConvertError says what to do."""
    try:
        return read_manifest(path, config)
    except ManifestError as exc:
        raise ConvertError(f"{exc}; {doing}: delete {cfg_dir} yourself if its files are yours, or convert into "
                           "another config name or out=") from None


def _clear_for_overwrite(cfg_dir: Path, config: str) -> None:
    """overwrite=true: delete the shards that the folder's manifest lists, then the manifest. An
    unlisted parquet file, or no valid manifest of this config, stops it before any delete."""
    manifest_path = cfg_dir / MANIFEST
    parquet = sorted(p.name for p in cfg_dir.glob("*.parquet"))
    if not manifest_path.exists():
        if parquet:
            raise ConvertError(
                f"overwrite=true: {cfg_dir} holds parquet files ({_listing(parquet)}) but no {MANIFEST}, so none "
                "is known to be i2e-convert output and nothing was deleted; move or delete them yourself, or "
                "convert into another config name or out=")
        return
    manifest = _checked_manifest(manifest_path, cfg_dir, config, "overwrite=true deleted nothing")
    foreign = [n for n in parquet if not manifest_lists(manifest, n)]
    if foreign:
        raise ConvertError(
            f"overwrite=true: {cfg_dir} holds parquet files its {MANIFEST} does not list ({_listing(foreign)}); "
            "overwrite deletes only listed shards, so nothing was deleted: move or delete those yourself, or "
            "convert into another config name or out=")
    for name in parquet:
        if not (cfg_dir / name).is_dir():
            (cfg_dir / name).unlink(missing_ok=True)  # a link is removed, never what it points to
    manifest_path.unlink()  # last: a delete cut short is finished by the next overwrite
    log.info("overwrite=true: deleted %d shard(s) and the manifest of %s", len(parquet), cfg_dir)


def _load_manifest(path: Path, cfg_dir: Path, config: str, params: dict, src: ImageSource) -> dict:
    fresh = {"format": MANIFEST_FORMAT, "tool": "i2e-convert", "config": config, "params": params, "splits": {}}
    shards = sorted(p.name for p in cfg_dir.glob("*.parquet")) if cfg_dir.is_dir() else []
    if not path.exists():
        if shards:
            raise ConvertError(
                f"{cfg_dir} already holds parquet files ({_listing(shards)}) but no {MANIFEST}: refusing to mix "
                "them with a new conversion (overwrite=true deletes only what a manifest lists); move or delete "
                "them, or use another config name or output folder")
        return fresh
    manifest = _checked_manifest(path, cfg_dir, config, "refusing to resume")
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
        events += count_events(parse_record(data, f"{path} row {i}").payload)
    return {"rows": n, "events": events, "bad": []}


# =========================================================================== the conversion
@dataclass
class _Settings:
    """The resolved parameters of one conversion."""

    config: str
    info: DatasetInfo | None  # the catalog entry of ``config``, if it is one
    size: tuple[int, int]
    ratio: float
    groups: list[int]
    rows: int  # rows per shard
    device: torch.device
    interpolation: str = "bilinear"  # the resize before conversion (i2e_train.data.preprocess)
    val_resize: int | None = None  # validation split: shorter side -> this, centre crop (ImageNet: 256)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (TIMESTEPS, CHANNELS, *self.size)


def _settings(config: str, resolution, ratio, order, rows_per_shard, device, batch_size: int,
              on_bad_image: str, interpolation: str = "auto") -> _Settings:
    """Check the parameters; a catalog config supplies the defaults of resolution, ratio and order."""
    if on_bad_image not in ("raise", "skip"):
        raise ConvertError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
    if batch_size < 1:
        raise ConvertError(f"batch_size must be >= 1, got {batch_size}")
    try:
        check_config_name(config)
    except ValueError as exc:
        raise ConvertError(str(exc)) from None
    info = CATALOG.get(config)
    if resolution is None:
        if info is None:
            raise ConvertError(f"resolution is required for config {config!r} (not a catalog config)")
        resolution = info.resolution
    size = (int(resolution),) * 2 if isinstance(resolution, (int, np.integer)) else tuple(int(x) for x in resolution)
    if len(size) != 2 or min(size) < 1:
        raise ConvertError(f"resolution must be H or (H, W) with positive sizes, got {resolution!r}")
    if ratio is None:
        if info is None or info.ratio is None:
            raise ConvertError(f"ratio is required for config {config!r} (not a catalog config)")
        ratio = info.ratio
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ConvertError(f"ratio={ratio!r}: expected a number (CIFAR 0.07, ImageNet 0.12, MNIST 0.10)") from None
    if not math.isfinite(ratio) or ratio < 0:
        raise ConvertError(f"ratio={ratio}: the threshold ratio must be a finite number >= 0 (e.g. 0.07)")
    if ratio > 1:  # thr = ratio * (max - min) of the image, and no pixel difference exceeds max - min
        raise ConvertError(f"ratio={ratio}: the threshold is ratio x each image's intensity range, which no pixel "
                           "difference exceeds, so a ratio above 1 gives no events at all; use one in [0, 1] "
                           "(CIFAR 0.07, ImageNet 0.12, MNIST 0.10)")
    if order is None:
        order = info.order if info is not None and info.order is not None else 4
    groups = list(resolve_order(order if isinstance(order, int) else list(order)))
    rows = int(rows_per_shard) if rows_per_shard else max(1, TARGET_SHARD_BYTES // record_size((TIMESTEPS, CHANNELS,
                                                                                                   *size)))
    if rows < 1:
        raise ConvertError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if interpolation == "auto":  # as the released data of a catalog config was made, else the card's protocol
        interpolation = info.interpolation if info is not None else "bicubic"
    try:
        interpolation = check_interpolation(interpolation, "interpolation")
    except ValueError as exc:
        raise ConvertError(f"{exc} (or auto)") from None
    val_resize = info.val_resize if info is not None and size == tuple(info.resolution) else None
    return _Settings(config, info, size, float(ratio), groups, rows, resolve_device(device), interpolation, val_resize)


def _shard_seed(seed: int, split: str, shard: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}/{shard}".encode()).digest()[:8], "little") >> 1


@dataclass
class _SplitPlan:
    """The shards of one split: their file names and the indices still to write."""

    split: SplitSource
    names: list[str]
    pending: list[int]

    def rows_of(self, shard: int, rows: int) -> int:
        return min(rows, self.split.count - shard * rows)


def _plan(src: ImageSource, cfg_dir: Path, rows: int, manifest: dict) -> list[_SplitPlan]:
    """Shards per split; existing ones are checked and recorded in the manifest, the rest pending."""
    plans = []
    for sp in src.splits:
        n_shards = math.ceil(sp.count / rows)
        names = [shard_name(sp.name, k, n_shards) for k in range(n_shards)]
        stale = sorted(p.name for p in cfg_dir.glob(f"{sp.name}-*.parquet") if p.name not in names)
        if stale:
            raise ConvertError(f"{cfg_dir}: shard files {stale} do not belong to this conversion of split "
                               f"{sp.name!r} ({n_shards} shards); move or delete them (overwrite=true deletes "
                               "only the shards the manifest lists)")
        entry = manifest["splits"].setdefault(sp.name, {"source": sp.identity, "count": sp.count,
                                                        "shards": n_shards, "done": {}})
        plan = _SplitPlan(sp, names, [])
        for k, name in enumerate(names):
            if (cfg_dir / name).exists():
                entry["done"][name] = _check_existing_shard(cfg_dir / name, entry["done"].get(name),
                                                            plan.rows_of(k, rows))
            else:
                entry["done"].pop(name, None)
                plan.pending.append(k)
        plans.append(plan)
    return plans


@dataclass
class _Shard:
    """The rows of one shard while its batches are converted."""

    file_paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)
    events: int = 0
    bad: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"rows": len(self.records), "events": self.events, "bad": self.bad}


class _ShardWriter:
    """Writes finished shards on one background thread (conversion of the next shard goes on
    meanwhile) and records each in the manifest once its file is complete. At most one shard is
    in flight; one handed over is always finished, even when the conversion fails later."""

    def __init__(self, cfg_dir: Path, class_names: list[str], manifest: dict, manifest_path: Path,
                 on_shard: Callable[[Path], None] | None) -> None:
        self.cfg_dir, self.class_names, self.on_shard = cfg_dir, class_names, on_shard
        self.manifest, self.manifest_path = manifest, manifest_path
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="i2e-shard-writer")
        self.inflight: list[tuple[Future, str, str, dict]] = []
        self.written = 0

    def submit(self, split: str, name: str, shard: _Shard) -> None:
        self.finish()
        fut = self.pool.submit(write_shard, self.cfg_dir / name, shard.file_paths, shard.labels, shard.records,
                               self.class_names)
        self.inflight.append((fut, split, name, shard.stats()))

    def finish(self) -> None:
        while self.inflight:
            fut, split, name, stats = self.inflight.pop(0)
            path = fut.result()
            self.manifest["splits"][split]["done"][name] = stats
            _save_manifest(self.manifest_path, self.manifest)
            self.written += 1
            if self.on_shard is not None:
                self.on_shard(path)

    def close(self) -> None:
        try:
            self.finish()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        self.pool.shutdown(wait=True)


@dataclass
class _Job:
    """What the loop over batches needs, and what it counts."""

    conv: I2E
    settings: _Settings
    writer: _ShardWriter
    class_index: dict[str, int]
    batch_size: int
    num_workers: int
    train_mode: bool
    seed: int
    on_bad_image: str
    max_shards: int | None
    bar: Any
    converted: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    stopped: bool = False


def _keep_mask(job: _Job, plan: _SplitPlan, positions: torch.Tensor, errors, shard: _Shard) -> torch.Tensor:
    """Which images of a batch to keep; bad ones raise, or are dropped and counted (on_bad_image=skip)."""
    keep = torch.ones(len(positions), dtype=torch.bool)
    for k, msg in errors:
        if job.on_bad_image == "raise":
            raise BadImageError(msg + " (on_bad_image=skip drops such images)")
        keep[k] = False
        job.bad += 1
        shard.bad.append(plan.split.file_paths[int(positions[k])])
        if len(job.bad_examples) < 20:
            job.bad_examples.append(msg)
        log.warning("skipping bad image: %s", msg)
    return keep


def _add_batch(job: _Job, plan: _SplitPlan, images, positions, keep, shard: _Shard, gen) -> None:
    """Convert one batch on the device and append its records to the shard."""
    dev = job.settings.device
    with torch.no_grad():
        packed_dev = _convert_packed(job.conv, images.to(dev, non_blocking=True), gen)  # uint8 [B, N]
        if not bool(keep.all()):
            packed_dev = packed_dev[keep.to(dev)]
        packed = packed_dev.cpu().numpy()
    sp = plan.split
    kept = positions[keep].tolist()
    shard.events += count_events(packed)
    shard.records.extend(records_from_packed(packed, job.settings.shape))
    shard.file_paths.extend(sp.file_paths[p] for p in kept)
    shard.labels.extend(job.class_index[sp.classes[p]] for p in kept)
    job.converted += len(kept)
    job.bar.update(len(positions))


def _convert_split(job: _Job, plan: _SplitPlan) -> None:
    """Convert the pending shards of one split, shard by shard, in item order."""
    rows, dev, sp = job.settings.rows, job.settings.device, plan.split
    batches = [list(range(start, min(start + job.batch_size, (k + 1) * rows, sp.count)))
               for k in plan.pending for start in range(k * rows, min((k + 1) * rows, sp.count), job.batch_size)]
    loader = DataLoader(_Images(sp.reader, sp.count, job.settings.size, job.settings.interpolation,
                                job.settings.val_resize if sp.name == "validation" else None), batch_sampler=batches,
                        num_workers=job.num_workers, collate_fn=_passthrough, pin_memory=dev.type == "cuda")
    shard, gen = _Shard(), None
    for images, positions, errors in loader:
        k, offset = divmod(int(positions[0]), rows)
        if offset == 0 and job.train_mode:  # random directions drawn per shard: a resumed run gives the same bytes
            gen = torch.Generator(device=dev).manual_seed(_shard_seed(job.seed, sp.name, k))
        keep = _keep_mask(job, plan, positions, errors, shard)
        _add_batch(job, plan, images, positions, keep, shard, gen)
        if int(positions[-1]) + 1 == min((k + 1) * rows, sp.count):  # shard complete
            job.writer.submit(sp.name, plan.names[k], shard)
            shard = _Shard()
            if job.max_shards is not None and job.writer.written + len(job.writer.inflight) >= job.max_shards:
                job.stopped = True
                break


def _summary(job: _Job, plans: list[_SplitPlan], manifest: dict, out: Path, source, train_mode: bool, seed: int,
             seconds: float) -> ConvertSummary:
    """The summary over every shard of the converted splits; the dataset card once complete."""
    s, cfg_dir = job.settings, out / job.settings.config
    complete = all((cfg_dir / name).exists() for p in plans for name in p.names)
    total_rows, total_events = {}, 0
    for p in plans:
        done = manifest["splits"][p.split.name]["done"]
        total_rows[p.split.name] = sum(done[n]["rows"] for n in p.names if n in done)
        total_events += sum(done[n]["events"] for n in p.names if n in done)
    known_rows = sum(total_rows.values())
    if complete:
        mode = f"train-mode random directions, seed {seed}" if train_mode else "eval mode"
        with exclusive_lock(out / CARD_LOCK, {"tool": "i2e-convert", "config": s.config}, blocking=True):
            update_card(out, s.config, [p.split.name for p in plans],
                        f"{s.config}: source {source}, {s.size[0]}x{s.size[1]}, ratio {s.ratio}, order {s.groups}, "
                        f"{mode}.")
    return ConvertSummary(
        out=str(out), config=s.config, splits=total_rows, samples=job.converted, shards_written=job.writer.written,
        shards_skipped=sum(len(p.names) - len(p.pending) for p in plans), shards_total=sum(len(p.names) for p in plans),
        seconds=seconds, images_per_s=job.converted / seconds if seconds > 0 else 0.0,
        event_rate=total_events / (known_rows * int(np.prod(s.shape))) if known_rows else None,
        published_event_rate=s.info.event_rate if s.info is not None and s.info.ratio == s.ratio else None,
        bad_images=job.bad, bad_examples=job.bad_examples, complete=complete, device=str(s.device),
    )


def _params(s: _Settings, src: ImageSource, padding_mode: str, train_mode: bool, seed: int, batch_size: int) -> dict:
    """What the output depends on (recorded in the manifest; a resume with other params is refused)."""
    params = {"resolution": list(s.size), "ratio": s.ratio, "order": s.groups, "timesteps": TIMESTEPS,
              "padding_mode": padding_mode, "train_mode": train_mode, "rows_per_shard": s.rows,
              "class_names": src.class_names}
    if s.interpolation != "pil_bicubic":  # manifests written before the option existed hold none (= pil_bicubic)
        params["interpolation"] = s.interpolation
    if s.val_resize is not None:
        params["val_resize"] = s.val_resize
    if train_mode:  # the random draws depend on these too
        params.update(seed=seed, batch_size=batch_size, device_type=s.device.type)
    return params


def _converter(s: _Settings, padding_mode: str, train_mode: bool) -> I2E:
    """The converter on the device: eval mode (canonical directions) unless ``train_mode``."""
    conv = I2E(ratio=s.ratio, order=s.groups, padding_mode=padding_mode, dtype=torch.bool,
              direction_draw="sample").to(s.device)
    return conv.train(train_mode)


def _progress_bar(s: _Settings, plans: list[_SplitPlan], progress: bool):
    from tqdm.auto import tqdm

    pending = sum(p.rows_of(k, s.rows) for p in plans for k in p.pending)
    return tqdm(total=pending, unit="img", desc=f"i2e-convert {s.config}", disable=not progress, dynamic_ncols=True)


def _start_manifest(cfg_dir: Path, s: _Settings, src: ImageSource, params: dict, overwrite: bool
                    ) -> tuple[dict, list[_SplitPlan]]:
    """The manifest to continue (or a fresh one) and the shard plans; unfinished shard files of a
    killed writer are removed."""
    manifest_path = cfg_dir / MANIFEST
    if overwrite:
        _clear_for_overwrite(cfg_dir, s.config)
    manifest = _load_manifest(manifest_path, cfg_dir, s.config, params, src)
    plans = _plan(src, cfg_dir, s.rows, manifest)
    for tmp in cfg_dir.glob(".*.parquet.tmp-*"):  # a shard whose writer was killed: never complete
        for gone in remove_stale_temporaries(cfg_dir / tmp.name[1:].split(".tmp-")[0]):
            log.info("removed the unfinished shard %s (its writer is gone)", gone)
    manifest["params"] = params
    _save_manifest(manifest_path, manifest)
    return manifest, plans


def _output_folders(out: str | os.PathLike, config: str) -> tuple[Path, Path]:
    """``out`` and ``<out>/<config>``, made when missing: real folders (a link to a folder is
    accepted as ``out`` itself, never as the config folder, so every write stays inside ``out``)."""
    out = Path(out)
    cfg_dir = out / config
    if out.is_symlink() and not out.exists():
        raise ConvertError(f"out={out} is a symbolic link to {os.readlink(out)}, which does not exist; create that "
                           "folder or give another out=")
    for folder in (out, cfg_dir):
        if folder.exists() and not folder.is_dir():
            raise ConvertError(f"out={out}: {folder} is a file, not a folder; pass the folder to write the dataset into")
    if cfg_dir.is_symlink():
        raise ConvertError(f"{cfg_dir} is a symbolic link (to {os.readlink(cfg_dir)}): i2e-convert writes only into "
                           f"a real folder inside out={out}; remove the link or use another config name")
    try:
        cfg_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"out={out}: cannot create {cfg_dir} ({exc.strerror or exc}); give a folder you can "
                           "write to") from None
    return out, cfg_dir


def _take_lock(stack: ExitStack, cfg_dir: Path, config: str, params: dict) -> None:
    """Hold ``<cfg_dir>/.i2e-convert.lock`` until ``stack`` closes; a live holder is refused by name."""
    path = cfg_dir / LOCK
    try:
        stack.enter_context(exclusive_lock(path, {"tool": "i2e-convert", "config": config, "params": params}))
    except LockHeld as held:
        theirs = held.owner.get("params")
        same = ("with the same parameters" if theirs == params else
                f"with other parameters ({'; '.join(_diff(theirs, params))})" if isinstance(theirs, dict) else "")
        gone = "" if held.enforced else f"; if that process is gone, delete {path}"
        raise ConvertError(
            f"{cfg_dir} is being written by another i2e-convert ({describe_owner(held.owner)}"
            f"{', ' + same if same else ''}): one conversion per folder at a time; wait for it to end (the same "
            f"command then resumes), or convert into another config name or out={gone}") from None
    except OSError as exc:
        raise ConvertError(f"{path}: cannot create the lock file ({exc.strerror or exc}); i2e-convert needs a "
                           f"regular file there (remove what is at {path})") from None


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
    interpolation: str = "auto",
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
        config: output config name, e.g. "I2E-CIFAR10": a name, not a path (letters, digits,
            '-', '_', '.'; see ``check_config_name``). A catalog name supplies the defaults for
            resolution, ratio and order.
        splits: output split -> source split (None: every split found; a source "test" split
            becomes "validation" when there is no validation split). See ``parse_splits``.
        resolution: H (square) or (H, W).
        ratio: the converter's threshold ratio, in [0, 1].
        order: the converter's order preset 0..5 or a list of 8 direction groups.
        source_type: how to read the source (`open_source`): "auto", "hub", "parquet" or
            "imagefolder".
        hf_config: the hub dataset's config name, if it has several.
        image_column: the image column's name (auto-detected when None).
        label_column: the label column's name (auto-detected when None).
        cache_dir: cache folder for hub downloads.
        batch_size: images per converter call.
        num_workers: DataLoader workers (decode/resize).
        rows_per_shard: rows per parquet shard (None: about 500 MB per shard).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda:1", ...
        train_mode: random direction vectors (I2E augmentation) drawn from ``seed``; the draw
            is seeded per shard, so a resumed run gives the same bytes as a clean one.
        padding_mode: the converter's padding ("replicate", as the released data).
        interpolation: the resize before conversion: "auto" (as the released data of a catalog
            config was made: "bilinear" for I2E-CIFAR10/100 and I2E-ImageNet, the official
            notebooks; "bicubic", the dataset card's protocol, otherwise), "bilinear", "bicubic"
            (torchvision v2 on the uint8 tensor) or "pil_bicubic" (i2e-train before the recipe audit).
        on_bad_image: "raise" (stop with an error naming the file) or "skip" (drop the image,
            count it in the summary and the manifest).
        overwrite: delete the config's existing shards and manifest first: only the shards
            that manifest lists (an unlisted parquet file, or no valid manifest, is refused).
        limit: convert only the first ``limit`` items of each split (quick tries).
        max_shards: stop after writing this many shards (the rest is done by a later run).
        progress: show a progress bar. on_shard: called with the path of every shard written.
    """
    t0 = time.perf_counter()
    s = _settings(config, resolution, ratio, order, rows_per_shard, device, batch_size, on_bad_image,
                  interpolation)
    src = open_source(source, source_type, parse_splits(splits), hf_config, image_column, label_column, cache_dir,
                      limit)
    params = _params(s, src, padding_mode, bool(train_mode), int(seed), int(batch_size))
    out, cfg_dir = _output_folders(out, s.config)
    with ExitStack() as stack:
        _take_lock(stack, cfg_dir, s.config, params)  # held until the manifest's last write
        manifest, plans = _start_manifest(cfg_dir, s, src, params, overwrite)
        writer = _ShardWriter(cfg_dir, src.class_names, manifest, cfg_dir / MANIFEST, on_shard)
        job = _Job(_converter(s, padding_mode, bool(train_mode)), s, writer,
                   {n: i for i, n in enumerate(src.class_names)}, batch_size, num_workers, bool(train_mode), int(seed),
                   on_bad_image, max_shards, _progress_bar(s, plans, progress))
        try:
            for plan in plans:
                if plan.pending and not job.stopped:
                    _convert_split(job, plan)
            writer.finish()
        finally:
            job.bar.close()
            writer.close()  # a shard already handed to the writer is finished, never lost
        seconds = time.perf_counter() - t0
        summary = _summary(job, plans, manifest, out, source, bool(train_mode), int(seed), seconds)
        manifest.setdefault("runs", []).append({
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3), "converted": job.converted,
            "shards_written": writer.written, "bad_images": job.bad, "device": str(s.device),
            "batch_size": batch_size, "num_workers": num_workers, "complete": summary.complete,
        })
        _save_manifest(cfg_dir / MANIFEST, manifest)
    return summary
