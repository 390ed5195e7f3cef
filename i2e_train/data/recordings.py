"""Real event recordings through tonic: finding and reading the files, binning events into frames,
and the on-disk frame cache.

Sources (``SOURCES``; ``root`` is the folder given as ``data.root``, never downloaded into):

- ``N-MNIST``: ``<root>/NMNIST/{Train,Test}/<digit>/*.bin``, tonic's layout for
  ``tonic.datasets.NMNIST(save_to=root)`` (34x34 ATIS pixels); each file read by tonic's reader
  ``tonic.io.read_mnist_file``, as that class reads it. Listed here, by class folder name: tonic's
  listing takes the last character of every folder as the digit (``int(path[-1])``), so one
  foreign folder (``ten``) would stop it before ``data.exclude_classes`` could leave it out.
- ``N-Caltech101``: ``<root>/NCALTECH101/Caltech101/<class>/*.bin``, tonic's layout for
  ``tonic.datasets.NCALTECH101(save_to=root)``; listed and read by that class, which shifts
  each recording so that its smallest x and y are 0.
- ``CIFAR10-DVS``: ``<root>/extract/<class>/*.aedat`` (AEDAT 2.0 from a DVS128, the files
  ``data=cifar10dvs`` reads too); read with tonic's AEDAT 2.0 functions
  (``tonic.io.read_aedat_header_from_file`` / ``get_aer_events_from_file``) and tonic's DVS128
  address layout (``read_dvs_128``: x = bits 8-14, y = bits 1-7, p = bit 0). ``read_dvs_128``
  itself fails in tonic 1.7.0 (github.com/neuromorphs/tonic/issues/302). tonic's own
  ``CIFAR10DVS`` class reads a re-encoded AEDAT4 copy of the dataset and is not used.

tonic's N-Caltech101 class is subclassed only to switch off its download (and its check for the
complete archive); a missing file is a ``RecordingsUnavailableError`` saying what to place where.

Frames: each recording's events, in file order, become events on a frame grid of
``(H, W)`` = the sensor (N-MNIST 34x34, CIFAR10-DVS 128x128) or, for N-Caltech101, the
recording's own extent (largest x + 1, largest y + 1): ``frame_events`` gives them as a tonic
event array (x = column, y = row, p = channel) and ``bin_events`` cuts them into T slices of
``n // T`` consecutive events (the last ``n % T`` events are left out) and counts events per
(slice, channel, row, column): exactly ``tonic.transforms.ToFrame(sensor_size=(W, H, 2),
n_event_bins=T)`` of those events. Channel 0 is ON (brightness up), as in I2E data:
ATIS files store p = 1 for ON, so channel = 1 - p; a DVS128's raw polarity bit is 0 for ON
(jAER's DVS128 extractor), so channel = p. CIFAR10-DVS frames are turned by 180 degrees
(row = 127 - y, column = 127 - x of tonic's decoding), the orientation SpikingJelly gives them.

Cache: ``FrameCache`` keeps one ``<rel path, suffix .npz>`` (uint16 counts [T, 2, H, W]) per recording
under its folder, each written atomically, so a killed build leaves finished files and no
half-written one, and the next build resumes; ``frames.json`` records the parameters and the
file listing ("complete": false while building). Opening a cache whose build did not finish is
a ``FrameCacheError`` that says how many files are missing.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tonic
import tonic.datasets
import tonic.io

from i2e_train.data.base import DatasetUnavailableError
from i2e_train.files import LockHeld, atomic_write, atomic_write_json, describe_owner, exclusive_lock

__all__ = ["Recording", "RecordingSource", "SOURCES", "FrameCache", "bin_events", "frame_events", "load_frames",
           "RecordingsUnavailableError", "FrameCacheError", "RecordingError", "CACHE_FORMAT"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
FRAME_EVENTS = np.dtype([("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])


class RecordingsUnavailableError(DatasetUnavailableError):
    """Recordings missing or incomplete (the message says which files to place where)."""


class FrameCacheError(DatasetUnavailableError):
    """A frame cache that is half-built, or was built from other recordings or parameters."""


class RecordingError(ValueError):
    """A recording that cannot become frames (events outside the sensor, unreadable file, ...)."""


@dataclass(frozen=True)
class Recording:
    rel: str  # path under the source folder, "/"-separated (names the cache file)
    label: str  # class folder name
    split: str  # "train" / "test" (official split) or "all"
    index: int  # position in the reader's listing of that split


# --------------------------------------------------------------------------- binning
def bin_events(x: np.ndarray, y: np.ndarray, channel: np.ndarray, timesteps: int, size: tuple[int, int],
               where: str = "recording") -> np.ndarray:
    """Events -> uint16 counts [T, 2, H, W]: T slices of ``n // T`` consecutive events each (the last
    ``n % T`` events dropped; fewer than T events give empty frames), counted per (slice, channel,
    row y, column x). Coordinates outside ``size`` or a count above 65535 raise RecordingError."""
    h, w = size
    n = len(x)
    per = n // timesteps
    used = per * timesteps
    x, y, c = (np.asarray(a[:used], dtype=np.int64) for a in (x, y, channel))
    bad = (x < 0) | (x >= w) | (y < 0) | (y >= h) | (c < 0) | (c > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RecordingError(f"{where}: event {i} at x={x[i]}, y={y[i]}, channel={c[i]} lies outside the "
                             f"{w}x{h} frame ({int(bad.sum())} such events)")
    slot = np.arange(used, dtype=np.int64) // max(per, 1)
    flat = ((slot * 2 + c) * h + y) * w + x
    counts = np.bincount(flat, minlength=timesteps * 2 * h * w)
    if counts.size and counts.max() > np.iinfo(np.uint16).max:
        raise RecordingError(f"{where}: {int(counts.max())} events in one pixel of one frame, more than uint16 holds")
    return counts.astype(np.uint16).reshape(timesteps, 2, h, w)


def frame_events(x, y, channel, t=None) -> np.ndarray:
    """A tonic event array (x = column, y = row, t, p = channel) of frame coordinates."""
    out = np.zeros(len(x), dtype=FRAME_EVENTS)
    out["x"], out["y"], out["p"] = x, y, channel
    if t is not None:
        out["t"] = t
    return out


def load_frames(path: str | os.PathLike) -> np.ndarray:
    """uint16 [T, 2, H, W] counts of one cached recording."""
    try:
        with np.load(path) as z:
            return z["frames"]
    except Exception as exc:  # noqa: BLE001 - zip / pickle / key errors all mean "unreadable"
        raise FrameCacheError(f"{path}: unreadable frame file ({type(exc).__name__}: {exc}); delete it and run "
                              "again to rebuild it") from None


# --------------------------------------------------------------------------- sources
class _NoDownload:
    """Mixin for tonic datasets: never download, and skip tonic's check for the complete archive
    (the layout was checked before the dataset is made)."""

    def _check_exists(self) -> bool:
        return True

    def download(self) -> None:
        raise RecordingsUnavailableError(f"{type(self).__name__}: the recordings are missing; they are never "
                                         "downloaded here (see the data config for where to place them)")


# Named as tonic's class: tonic finds the files under <save_to>/<class name>/.
class NCALTECH101(_NoDownload, tonic.datasets.NCALTECH101):
    """tonic's N-Caltech101 dataset that never downloads."""


def _class_folder_files(folder: Path, suffix: str) -> list[str]:
    """``<class>/<file>`` of every ``suffix`` file in the class folders of ``folder`` (hidden
    entries left out), sorted."""
    return sorted(f"{d.name}/{f.name}" for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                  for f in d.iterdir() if f.is_file() and f.name.endswith(suffix) and not f.name.startswith("."))


def _class_files(folder: Path, suffix: str) -> dict[str, int]:
    """Class folder -> number of ``suffix`` files in it (hidden entries left out)."""
    return {d.name: sum(1 for f in d.iterdir() if f.is_file() and f.name.endswith(suffix))
            for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


class RecordingSource(abc.ABC):
    """One real dataset: where its files lie under ``root``, how to list and read them."""

    name: str
    sensor: tuple[int, int] | None  # (H, W) of the frame grid; None = each recording's extent
    suffix: str

    @abc.abstractmethod
    def folder(self, root: Path) -> Path:
        """The folder the recordings' relative paths start from."""

    @abc.abstractmethod
    def layout(self, root: Path) -> str:
        """Which files to place where (for error messages)."""

    @abc.abstractmethod
    def _class_roots(self, root: Path) -> dict[str, Path]:
        """Split -> folder of class folders."""

    @abc.abstractmethod
    def open(self, root: Path) -> tuple[list[Recording], Callable[[Recording], np.ndarray]]:
        """The recordings (sorted by path) and a picklable reader: recording -> frame events."""

    def check_layout(self, root: Path) -> None:
        """Every split folder exists and holds non-empty class folders, else RecordingsUnavailableError."""
        root = Path(root)
        for split, folder in self._class_roots(root).items():
            if not folder.is_dir():
                raise RecordingsUnavailableError(f"{self.name} recordings not found: {folder} is missing (nothing is "
                                                 f"downloaded).\n{self.layout(root)}")
            counts = _class_files(folder, self.suffix)
            empty = [c for c, k in counts.items() if k == 0]
            what = f"class folder(s) {empty} hold no *{self.suffix} file" if empty else "no class folders"
            if not counts or empty:
                raise RecordingsUnavailableError(f"{folder}: {what} ({split} split of {self.name}).\n"
                                                 f"{self.layout(root)}")

    def frame_size(self, events: np.ndarray) -> tuple[int, int]:
        """(H, W) of the frame grid of one recording's frame events."""
        if self.sensor is not None:
            return self.sensor
        if len(events) == 0:
            return (1, 1)
        return int(events["y"].max()) + 1, int(events["x"].max()) + 1


class _TonicReader:
    """Frame events of a recording through tonic dataset objects (one per split): tonic's own
    ``__getitem__`` reads the file; ATIS polarity p (1 = ON) becomes channel 1 - p."""

    def __init__(self, datasets: dict[str, object]) -> None:
        self.datasets = datasets

    def __call__(self, rec: Recording) -> np.ndarray:
        events, _ = self.datasets[rec.split][rec.index]
        return frame_events(events["x"], events["y"], 1 - events["p"], events["t"])


class _ATISReader:
    """Frame events of an N-MNIST ``.bin`` file through tonic's reader (``tonic.io.read_mnist_file``
    with ``tonic.datasets.NMNIST.dtype``, what that dataset's ``__getitem__`` returns); ATIS
    polarity p (1 = ON) becomes channel 1 - p."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __call__(self, rec: Recording) -> np.ndarray:
        events = tonic.io.read_mnist_file(str(self.folder / rec.rel), dtype=tonic.datasets.NMNIST.dtype)
        return frame_events(events["x"], events["y"], 1 - events["p"], events["t"])


def _listing(datasets: dict[str, object], folder: Path) -> list[Recording]:
    recs = []
    for split, ds in datasets.items():
        for i, path in enumerate(ds.data):
            rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()
            recs.append(Recording(rel=rel, label=Path(path).parent.name, split=split, index=i))
    return sorted(recs, key=lambda r: r.rel)


class NMNISTSource(RecordingSource):
    name, sensor, suffix = "N-MNIST", (34, 34), ".bin"

    def folder(self, root: Path) -> Path:
        return Path(root) / "NMNIST"

    def _class_roots(self, root: Path) -> dict[str, Path]:
        return {"train": self.folder(root) / "Train", "test": self.folder(root) / "Test"}

    def layout(self, root: Path) -> str:
        f = self.folder(root)
        return (f"N-MNIST needs the official recordings (www.garrickorchard.com/datasets/n-mnist: Train.zip and "
                f"Test.zip, unzipped) in tonic's layout for tonic.datasets.NMNIST(save_to={root}):\n"
                f"  {f}/Train/<digit>/*.bin   60,000 files in the digit folders 0..9\n"
                f"  {f}/Test/<digit>/*.bin    10,000 files\nor set data.root to the folder that holds NMNIST/.")

    def open(self, root: Path):
        self.check_layout(root)
        folder, recs = self.folder(root), []
        for split, sub in (("train", "Train"), ("test", "Test")):
            files = _class_folder_files(folder / sub, self.suffix)
            recs += [Recording(rel=f"{sub}/{f}", label=f.split("/")[0], split=split, index=i)
                     for i, f in enumerate(files)]
        return sorted(recs, key=lambda r: r.rel), _ATISReader(folder)


class NCaltech101Source(RecordingSource):
    name, sensor, suffix = "N-Caltech101", None, ".bin"

    def folder(self, root: Path) -> Path:
        return Path(root) / "NCALTECH101" / "Caltech101"

    def _class_roots(self, root: Path) -> dict[str, Path]:
        return {"all": self.folder(root)}

    def layout(self, root: Path) -> str:
        f = self.folder(root)
        return (f"N-Caltech101 needs the official recordings (www.garrickorchard.com/datasets/n-caltech101: "
                f"N-Caltech101-archive.zip holds Caltech101.zip; unzip that) in tonic's layout for "
                f"tonic.datasets.NCALTECH101(save_to={root}):\n"
                f"  {f}/<class>/*.bin   8,709 files in 101 class folders (100 objects + BACKGROUND_Google)\n"
                f"or set data.root to the folder that holds NCALTECH101/.")

    def open(self, root: Path):
        self.check_layout(root)
        datasets = {"all": NCALTECH101(str(root))}
        return _listing(datasets, self.folder(root)), _TonicReader(datasets)


class _DVS128Reader:
    """Frame events of an AEDAT 2.0 DVS128 file through tonic's AEDAT 2.0 functions."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __call__(self, rec: Recording) -> np.ndarray:
        path = str(self.folder / rec.rel)
        version, start, _ = tonic.io.read_aedat_header_from_file(path)
        if not 2 <= version < 3:
            raise RecordingError(f"{path}: AEDAT version {version}, expected 2.x (CIFAR10-DVS's DVS128 files)")
        raw = tonic.io.get_aer_events_from_file(path, version, start)
        addr = raw["address"].astype(np.int64)
        x, y, p = (addr >> 8) & 0x7F, (addr >> 1) & 0x7F, addr & 1  # tonic's read_dvs_128 layout
        return frame_events(127 - x, 127 - y, p, raw["timeStamp"])


class CIFAR10DVSSource(RecordingSource):
    name, sensor, suffix = "CIFAR10-DVS", (128, 128), ".aedat"

    def folder(self, root: Path) -> Path:
        return Path(root) / "extract"

    def _class_roots(self, root: Path) -> dict[str, Path]:
        return {"all": self.folder(root)}

    def layout(self, root: Path) -> str:
        f = self.folder(root)
        return (f"CIFAR10-DVS (through tonic) needs the extracted AEDAT 2.0 recordings, the same files as "
                f"data=cifar10dvs:\n  {f}/<class>/*.aedat   10,000 files in the class folders airplane ... truck\n"
                f"(unzip the 10 zips of figshare.com/articles/dataset/CIFAR10-DVS_New/4724671 there, or run "
                f"data=cifar10dvs once, which extracts {Path(root) / 'download'}/*.zip there), or set data.root.")

    def open(self, root: Path):
        self.check_layout(root)
        folder = self.folder(root)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob(f"*/*{self.suffix}") if p.is_file())
        recs = [Recording(rel=r, label=r.split("/")[0], split="all", index=i) for i, r in enumerate(files)]
        return recs, _DVS128Reader(folder)


SOURCES: dict[str, RecordingSource] = {s.name: s for s in (NMNISTSource(), NCaltech101Source(), CIFAR10DVSSource())}


# --------------------------------------------------------------------------- the frame cache
def _write_frames(path: Path, frames: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.savez_compressed(fh, frames=frames))


def _build_one(rec: Recording, reader: Callable[[Recording], np.ndarray], source: RecordingSource,
               timesteps: int, path: Path) -> None:
    """Read one recording, bin it, write its frame file (atomically)."""
    where = f"{source.name} recording {rec.rel}"
    try:
        events = reader(rec)
    except (RecordingError, DatasetUnavailableError):
        raise
    except Exception as exc:  # noqa: BLE001 - tonic's readers raise many types; all mean "unreadable"
        raise RecordingError(f"{where}: cannot read it through tonic ({type(exc).__name__}: {exc})") from exc
    if len(events) < timesteps:
        log.warning("%s has %d events, fewer than %d frames: its frames are empty", where, len(events), timesteps)
    frames = bin_events(events["x"], events["y"], events["p"], timesteps, source.frame_size(events), where)
    _write_frames(path, frames)


def _build_chunk(task) -> int:
    recs, reader, source, timesteps, folder = task
    cache = FrameCache(folder, source.name, timesteps)
    for rec in recs:
        _build_one(rec, reader, source, timesteps, cache.path(rec))
    return len(recs)


def _digest(recordings: Sequence[Recording]) -> str:
    h = hashlib.sha256()
    for r in recordings:
        h.update(f"{r.rel}\t{r.label}\t{r.split}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class FrameCache:
    """The frames of one dataset's recordings on disk (layout and guarantees: module docstring).

    Args:
        folder: the cache folder (one per dataset and T).
        dataset: the source's name; timesteps: frames per recording.
    """

    MANIFEST = "frames.json"
    LOCK = ".lock"  # while a build runs: its owner inside

    def __init__(self, folder: str | os.PathLike, dataset: str, timesteps: int) -> None:
        self.folder, self.dataset, self.timesteps = Path(folder), dataset, int(timesteps)

    def path(self, rec: Recording) -> Path:
        return self.folder / Path(rec.rel).with_suffix(".npz")

    def params(self) -> dict:
        return {"format": CACHE_FORMAT, "dataset": self.dataset, "timesteps": self.timesteps,
                "binning": "tonic ToFrame(n_event_bins=T): T slices of n // T events, the last n % T dropped",
                "channels": "0 = ON, 1 = OFF", "dtype": "uint16 counts [T, 2, H, W]"}

    def manifest(self) -> dict | None:
        path = self.folder / self.MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FrameCacheError(f"{path}: unreadable ({exc}); delete {self.folder} to rebuild the frames") from None

    def _check_same(self, manifest: dict, recordings: Sequence[Recording]) -> None:
        path = self.folder / self.MANIFEST
        changed = [f"{k}: {manifest.get(k)!r} -> {v!r}" for k, v in self.params().items() if manifest.get(k) != v]
        if changed:
            raise FrameCacheError(f"{path}: the frames were built with other parameters ({'; '.join(changed)}); "
                                  f"delete {self.folder} to rebuild them")
        if manifest.get("listing_sha256") != _digest(recordings):
            raise FrameCacheError(
                f"{path}: the frames were built from another set of recordings ({manifest.get('recordings')} files "
                f"then, {len(recordings)} now): delete {self.folder} to rebuild them")

    def _write_manifest(self, recordings: Sequence[Recording], complete: bool) -> None:
        atomic_write_json(self.folder / self.MANIFEST, {**self.params(), "reader": f"tonic {tonic.__version__}",
                                                        "recordings": len(recordings),
                                                        "listing_sha256": _digest(recordings), "complete": complete})

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One builder at a time (`i2e_train.files.exclusive_lock`: an OS lock, released when its
        holder dies, even by SIGKILL); a second builder waits, naming the first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path, record = self.folder / self.LOCK, {"tool": "frame cache", "dataset": self.dataset}
        with ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(path, record))
            except LockHeld as held:
                log.info("waiting for %s, which is building %s", describe_owner(held.owner), self.folder)
                stack.enter_context(exclusive_lock(path, record, blocking=True))
            yield

    def build(self, recordings: Sequence[Recording], reader: Callable[[Recording], np.ndarray],
              source: RecordingSource, workers: int = 0, progress: bool = False) -> int:
        """Make the missing frame files (resuming a killed build), then mark the cache complete.
        Returns the number of recordings binned in this call (0 when the cache was complete)."""
        with self._lock():
            manifest = self.manifest()
            if manifest is not None:
                self._check_same(manifest, recordings)
            todo = [r for r in recordings if not self.path(r).is_file()]
            if manifest is not None and manifest.get("complete") and not todo:
                return 0
            if todo and len(todo) < len(recordings):
                log.info("%s: resuming an interrupted build, %d of %d frame files are there", self.folder,
                         len(recordings) - len(todo), len(recordings))
            self._write_manifest(recordings, complete=False)
            self._run(todo, reader, source, workers, progress)
            self._write_manifest(recordings, complete=True)
        return len(todo)

    def _run(self, todo: Sequence[Recording], reader, source: RecordingSource, workers: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        size = 64
        tasks = [(list(todo[i:i + size]), reader, source, self.timesteps, self.folder)
                 for i in range(0, len(todo), size)]
        bar = tqdm(total=len(todo), unit="rec", desc=f"{self.dataset} frames", disable=not progress)
        try:
            if workers > 0 and len(tasks) > 1:
                from concurrent.futures import ProcessPoolExecutor

                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for done in pool.map(_build_chunk, tasks):
                        bar.update(done)
            else:
                for task in tasks:
                    bar.update(_build_chunk(task))
        finally:
            bar.close()

    def check(self, recordings: Sequence[Recording]) -> None:
        """The cache is complete and was built from ``recordings`` with these parameters, else FrameCacheError."""
        manifest = self.manifest()
        if manifest is None or not manifest.get("complete"):
            have = sum(1 for r in recordings if self.path(r).is_file())
            state = "no " + self.MANIFEST if manifest is None else self.MANIFEST + " says complete: false"
            raise FrameCacheError(
                f"{self.folder} is half-built: {have} of {len(recordings)} frame files, {state}. Its build was "
                f"interrupted (or is still running in another process). Run again: prepare_data() resumes the build "
                f"and keeps the finished files (or delete {self.folder} to start over).")
        self._check_same(manifest, recordings)
        missing = [r.rel for r in recordings if not self.path(r).is_file()]
        if missing:
            raise FrameCacheError(f"{self.folder}: {len(missing)} frame file(s) missing although the build finished "
                                  f"(e.g. the one of {missing[0]}); delete {self.folder} to rebuild the frames")
