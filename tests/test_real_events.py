"""Real recordings through tonic: files in the real formats written here (ATIS .bin for N-MNIST and
N-Caltech101, AEDAT 2.0 for CIFAR10-DVS), frames equal to tonic's ToFrame, labels by name, the
frame cache (resume, half-built, changed recordings), offline messages, CIFAR10-DVS vs SpikingJelly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tonic
import tonic.datasets
import tonic.io
import torch
from tonic.transforms import ToFrame

from i2e_train.data.catalog import CALTECH101_CLASSES
from i2e_train.data.real_events import ClassMatchError, RealEventsDataModule, align_classes, area_resize, to_size
from i2e_train.data.recordings import (SOURCES, FrameCache, FrameCacheError, RecordingError,
                                       RecordingsUnavailableError, bin_events, frame_events, load_frames)

sys.path.insert(0, str(Path(__file__).parent))
from test_dvs import make_extract  # noqa: E402  (synthetic AEDAT 2.0 recordings)

T = 8


# --------------------------------------------------------------------------- files in the real formats
def write_atis(path: Path, x, y, p, t) -> None:
    """N-MNIST / N-Caltech101 .bin: 5 bytes per event, x (8 bits), y (8 bits), polarity (1 bit, 1 = ON),
    timestamp (23 bits, big-endian)."""
    t = np.asarray(t, dtype=np.int64)
    b = np.zeros((len(t), 5), dtype=np.uint8)
    b[:, 0], b[:, 1] = x, y
    b[:, 2] = (np.asarray(p, dtype=np.int64) << 7) | ((t >> 16) & 0x7F)
    b[:, 3], b[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b.tobytes())


def _events(rng, k, width, height, x0=0, y0=0):
    x, y = rng.integers(0, width, k) + x0, rng.integers(0, height, k) + y0
    x[: k // 8], y[: k // 8] = x0 + width // 2, y0 + height // 2  # repeated pixels: counts above 1
    return x, y, rng.integers(0, 2, k), np.sort(rng.integers(0, 2**23 - 1, k))


def make_nmnist(root: Path, train: int = 2, test: int = 1, seed: int = 0) -> dict:
    """root/NMNIST/{Train,Test}/<digit>/<i>.bin with 34x34 events; returns {rel: (x, y, p, t)}."""
    rng, out = np.random.default_rng(seed), {}
    for split, n in (("Train", train), ("Test", test)):
        for d in range(10):
            for i in range(n):
                rel = f"{split}/{d}/{i:05d}.bin"
                out[rel] = _events(rng, int(rng.integers(40, 300)), 34, 34)
                write_atis(root / "NMNIST" / rel, *out[rel])
    return out


def make_ncaltech(root: Path, classes, per_class: int = 2, seed: int = 0) -> dict:
    """root/NCALTECH101/Caltech101/<class>/image_000<i>.bin, each recording of its own size and offset."""
    rng, out = np.random.default_rng(seed), {}
    for c in classes:
        for i in range(per_class):
            rel = f"{c}/image_{i + 1:04d}.bin"
            w, h = int(rng.integers(12, 60)), int(rng.integers(10, 45))
            out[rel] = _events(rng, int(rng.integers(30, 200)), w, h, int(rng.integers(0, 30)), int(rng.integers(0, 20)))
            write_atis(root / "NCALTECH101" / "Caltech101" / rel, *out[rel])
    return out


NCALTECH_FOLDERS = [c for c in CALTECH101_CLASSES if c != "Faces"] + ["BACKGROUND_Google"]


def _dm(name, root, **kw):
    kw.setdefault("spatial", {"N-MNIST": "crop", "N-Caltech101": "area", "CIFAR10-DVS": "none"}[name])
    kw.setdefault("split", {"N-MNIST": "official", "N-Caltech101": "stratified", "CIFAR10-DVS": "per_class"}[name])
    if name == "N-Caltech101":
        kw.setdefault("exclude_classes", ["BACKGROUND_Google"])
        kw.setdefault("absent_classes", ["Faces"])
    return RealEventsDataModule(name=name, root=str(root), batch_size=4, num_workers=0, seed=2024, progress=False,
                                **kw)


def _served(dm, key):
    """{rel: (frames float32 [T, 2, H, W], label)} of one split, through the DataModule's dataset."""
    ds = dm.datasets[key]
    rels = {str(dm.cache.path(r)): r.rel for r in dm.recordings}
    return {rels[f]: ds[i] for i, f in enumerate(ds.files)}


@pytest.fixture(scope="module")
def nmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("nmnist")
    events = make_nmnist(root)
    dm = _dm("N-MNIST", root)
    dm.prepare_data()
    dm.setup()
    return root, events, dm


@pytest.fixture(scope="module")
def ncaltech(tmp_path_factory):
    root = tmp_path_factory.mktemp("ncaltech")
    events = make_ncaltech(root, NCALTECH_FOLDERS)
    dm = _dm("N-Caltech101", root)
    dm.prepare_data()
    dm.setup()
    return root, events, dm


# --------------------------------------------------------------------------- binning = tonic's ToFrame
def test_atis_files_read_back_through_tonic(tmp_path):
    rng = np.random.default_rng(1)
    x, y, p, t = _events(rng, 50, 34, 34)
    write_atis(tmp_path / "a.bin", x, y, p, t)
    ev = tonic.io.read_mnist_file(str(tmp_path / "a.bin"), dtype=tonic.datasets.NMNIST.dtype)
    for key, want in zip("xypt", (x, y, p, t)):
        np.testing.assert_array_equal(ev[key], want)


@pytest.mark.parametrize("n", [0, 5, 8, 37, 1003])
def test_bin_events_equals_tonic_to_frame(n):
    rng = np.random.default_rng(n)
    h, w = 13, 21
    x, y, c = rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n)
    ours = bin_events(x, y, c, T, (h, w))
    assert ours.shape == (T, 2, h, w) and ours.dtype == np.uint16
    if n == 0:  # tonic returns zeros [T, P, W, H] for an empty recording: ours are zeros [T, P, H, W]
        assert not ours.any()
        return
    ref = ToFrame(sensor_size=(w, h, 2), n_event_bins=T)(frame_events(x, y, c, np.arange(n)))
    np.testing.assert_array_equal(ours, ref)
    assert ours.sum() == (n // T) * T  # the last n % T events are left out, as tonic's n_event_bins


def test_bin_events_refuses_events_outside_the_frame():
    with pytest.raises(RecordingError, match="x=34, y=0.*outside the 34x34 frame"):
        bin_events(np.array([34] * 8), np.zeros(8, int), np.zeros(8, int), T, (34, 34), "rec.bin")


def test_nmnist_frames_equal_tonic_to_frame_cropped(nmnist):
    """Our served frame = tonic.datasets.NMNIST + ToFrame(34x34, n_event_bins=8), channels in the order
    ON, OFF (tonic's are p = OFF 0, ON 1), centre 32x32; labels = the digit; Train/Test = train/val."""
    root, events, dm = nmnist
    with mock.patch.object(tonic.datasets.NMNIST, "_check_exists", return_value=True):
        for train, key in ((True, "train"), (False, "validation")):
            ref = tonic.datasets.NMNIST(str(root), train=train, transform=ToFrame(sensor_size=(34, 34, 2),
                                                                                  n_event_bins=T))
            served = _served(dm, key)
            assert len(served) == len(ref) == (20 if train else 10)
            for i, path in enumerate(ref.data):
                frames, label = served[Path(path).relative_to(root / "NMNIST").as_posix()]
                want, target = ref[i]
                assert np.array_equal(frames.numpy(), want[:, ::-1, 1:33, 1:33].astype(np.float32))
                assert label == target == int(Path(path).parent.name)


def test_on_events_land_in_channel_0(tmp_path):
    """ATIS p = 1 is ON -> channel 0; a DVS128's raw polarity bit 0 is ON (jAER) -> channel 0."""
    make_nmnist(tmp_path, train=1, test=1)
    write_atis(tmp_path / "NMNIST" / "Train" / "0" / "00000.bin", [5] * 8, [6] * 8, [1] * 8, np.arange(8))
    recs, reader = SOURCES["N-MNIST"].open(tmp_path)
    (rec,) = [r for r in recs if r.rel == "Train/0/00000.bin"]
    ev = reader(rec)
    frames = bin_events(ev["x"], ev["y"], ev["p"], T, (34, 34))
    assert frames[:, 0, 6, 5].tolist() == [1] * T and not frames[:, 1].any()
    make_extract(tmp_path / "dvs", files_per_class=(1,) * 10)
    from test_dvs import write_aedat

    write_aedat(tmp_path / "dvs" / "extract" / "cat" / "on.aedat", np.full(8, 3), np.full(8, 9), np.zeros(8, int),
                np.arange(8, dtype=np.uint32))
    recs, reader = SOURCES["CIFAR10-DVS"].open(tmp_path / "dvs")
    (rec,) = [r for r in recs if r.rel == "cat/on.aedat"]
    ev = reader(rec)
    assert (ev["p"] == 0).all() and (ev["y"] == 127 - 3).all() and (ev["x"] == 127 - 9).all()


def test_ncaltech101_frames_equal_tonic_to_frame_resized(ncaltech):
    """Our served frame = area_resize(tonic.datasets.NCALTECH101 + ToFrame(extent, n_event_bins=8), ON
    first, to 224x224); labels = I2E-Caltech101's indices by class name; BACKGROUND_Google left out."""
    root, events, dm = ncaltech
    folder = root / "NCALTECH101" / "Caltech101"
    labels = {r.rel: t for r, t in zip(dm.recordings, dm.targets)}
    assert len(labels) == len(events) - 2 and not any(r.startswith("BACKGROUND_Google/") for r in labels)
    for rel, label in labels.items():
        assert label == CALTECH101_CLASSES.index(rel.split("/")[0])
    with mock.patch.object(tonic.datasets.NCALTECH101, "_check_exists", return_value=True):
        ref = tonic.datasets.NCALTECH101(str(root))
    assert len(ref) == len(events)
    served = {**_served(dm, "train"), **_served(dm, "validation")}
    for i in range(0, len(ref), 5):  # a fifth of them (resizing to 224x224 is the slow part here)
        rel = Path(ref.data[i]).relative_to(folder).as_posix()
        ev, folder_name = ref[i]
        if folder_name == "BACKGROUND_Google":
            continue
        want = ToFrame(sensor_size=(ev["x"].max() + 1, ev["y"].max() + 1, 2), n_event_bins=T)(ev)
        x, y, *_ = events[rel]
        assert want.shape[-2:] == (y.max() - y.min() + 1, x.max() - x.min() + 1)  # the recording's extent
        frames, label = served[rel]
        assert frames.shape == (T, 2, 224, 224) and label == labels[rel]
        assert np.array_equal(frames.numpy(), area_resize(want[:, ::-1], (224, 224)))
    # stratified, seeded: every class on both sides (2 recordings each)
    val_labels = sorted(dm.datasets["validation"].targets)
    assert val_labels == sorted(CALTECH101_CLASSES.index(c) for c in CALTECH101_CLASSES if c != "Faces")


def test_area_resize_is_an_exact_box_filter():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, (2, 6, 8)).astype(np.uint16)
    assert np.array_equal(area_resize(x, (6, 8)), x.astype(np.float32))  # same size: unchanged
    down = area_resize(x, (3, 4))  # 2x2 blocks: their mean
    assert np.allclose(down, x.reshape(2, 3, 2, 4, 2).mean((2, 4)))
    up = area_resize(x, (12, 16))  # each input pixel becomes a 2x2 block of its value
    assert np.array_equal(up, np.repeat(np.repeat(x, 2, 1), 2, 2).astype(np.float32))
    odd = area_resize(np.ones((1, 7, 5), np.uint16), (224, 224))  # stretched: no empty rows or columns
    assert np.allclose(odd, 1.0)
    y = area_resize(x, (5, 11))
    assert np.isclose(y.sum() * (6 * 8) / (5 * 11), x.sum(dtype=np.float64), rtol=1e-5)  # mean kept


def test_to_size_crops_centre_and_names_size_mismatches():
    x = np.arange(2 * 34 * 34, dtype=np.uint16).reshape(1, 2, 34, 34)
    assert np.array_equal(to_size(x, (32, 32), "crop"), x[..., 1:33, 1:33].astype(np.float32))
    with pytest.raises(ValueError, match="cannot crop 34x34 frames to 40x40"):
        to_size(x, (40, 40), "crop")
    with pytest.raises(ValueError, match="f.npz: frames of 34x34, expected 32x32 .spatial=none."):
        to_size(x, (32, 32), "none", "f.npz")


def test_class_order_of_the_twin_decides_the_labels(nmnist, tmp_path):
    """The twin lists the digits in reverse: folder "d" gets label 9 - d (matched by name, not order)."""
    root, _, _ = nmnist
    dm = _dm("N-MNIST", root, twin_classes=[str(d) for d in range(9, -1, -1)])
    dm.setup()
    for rel, (_, label) in _served(dm, "train").items():
        assert label == 9 - int(rel.split("/")[1])
    assert dm.class_names[0] == "9"


def test_align_classes_names_every_mismatch():
    assert align_classes(["b", "a", "c"], ["c", "a", "b"]) == {"a": 1, "b": 2, "c": 0}
    with pytest.raises(ClassMatchError, match=r"not among the twin's: \['bg'\]; twin classes without recordings: "
                                              r"\['d'\]"):
        align_classes(["a", "bg"], ["a", "d"])
    assert align_classes(["a", "bg"], ["a", "d"], exclude=["bg"], absent=["d"]) == {"a": 0}
    with pytest.raises(ClassMatchError, match="present on the other side"):
        align_classes(["a", "d"], ["a", "d"], absent=["d"])
    with pytest.raises(ClassMatchError, match="repeat"):
        align_classes(["a"], ["a", "a"])


def test_unmatched_recorded_class_fails_with_the_names(tmp_path):
    make_ncaltech(tmp_path, NCALTECH_FOLDERS + ["zebra"], per_class=1)
    dm = _dm("N-Caltech101", tmp_path)
    dm.prepare_data()
    with pytest.raises(ClassMatchError, match=r"not among the twin's: \['zebra'\]"):
        dm.setup()
    with pytest.raises(ClassMatchError, match=r"without recordings: \['Faces'\]"):
        _dm("N-Caltech101", tmp_path, absent_classes=[], exclude_classes=["BACKGROUND_Google", "zebra"]).setup()


# --------------------------------------------------------------------------- CIFAR10-DVS: tonic vs SpikingJelly
@pytest.fixture(scope="module")
def cifar10dvs(tmp_path_factory):
    from i2e_train.data.dvs import CIFAR10DVSDataModule

    root = tmp_path_factory.mktemp("cifar10dvs")
    make_extract(root, files_per_class=(3, 4, 3, 3, 5, 3, 3, 4, 3, 11))  # 11: one validation recording
    sj = CIFAR10DVSDataModule(root=str(root), batch_size=4, num_workers=0)
    sj.prepare_data()
    sj.setup()
    ours = _dm("CIFAR10-DVS", root)
    ours.prepare_data()
    ours.setup()
    return root, sj, ours


def test_cifar10dvs_frames_equal_tonic_to_frame_turned(cifar10dvs):
    """Ours = ToFrame(128x128, n_event_bins=8) of tonic's DVS128 decoding (read_dvs_128's bit layout),
    turned by 180 degrees; channels as decoded (raw bit 0 = ON first)."""
    root, _, ours = cifar10dvs
    served = {**_served(ours, "train"), **_served(ours, "validation")}
    for rel, (frames, _) in served.items():
        path = str(root / "extract" / rel)
        version, start, _ = tonic.io.read_aedat_header_from_file(path)
        addr = tonic.io.get_aer_events_from_file(path, version, start)["address"].astype(np.int64)
        ev = frame_events((addr >> 8) & 0x7F, (addr >> 1) & 0x7F, addr & 1)
        want = ToFrame(sensor_size=(128, 128, 2), n_event_bins=T)(ev)
        assert np.array_equal(frames.numpy(), want[:, :, ::-1, ::-1].astype(np.float32))


def test_cifar10dvs_tonic_vs_spikingjelly(cifar10dvs):
    """Same files, same split, same orientation; two documented differences: SpikingJelly's channel 0 is
    OFF (it stores 1 - raw bit; raw 1 is OFF), and its last frame also holds the last n % 8 events."""
    root, sj, ours = cifar10dvs
    stems = lambda paths: [Path(p).stem for p in paths]  # noqa: E731
    for key in ("train", "validation"):
        sj_files = stems(sj.dataset.samples[i][0] for i in sj.datasets[key].indices)
        assert stems(ours.datasets[key].files) == sj_files
        assert ours.datasets[key].targets == [sj.dataset.targets[i] for i in sj.datasets[key].indices]
    served = {Path(rel).stem: v for k in ("train", "validation") for rel, v in _served(ours, k).items()}
    differ = 0
    for i, (path, target) in enumerate(sj.dataset.samples):
        theirs, _ = sj.dataset[i]
        frames, label = served[Path(path).stem]
        frames = frames.numpy()
        assert label == target
        assert np.array_equal(frames[:7], theirs[:7, ::-1])  # frames 1..7: equal, channels swapped
        rel = f"{CLASSES[target]}/{Path(path).stem}.aedat"
        version, start, _ = tonic.io.read_aedat_header_from_file(str(root / "extract" / rel))
        addr = tonic.io.get_aer_events_from_file(str(root / "extract" / rel), version, start)["address"]
        addr = addr.astype(np.int64)
        n = len(addr)
        tail = addr[n - n % T:]  # frame 8: SpikingJelly also counts these
        extra = np.zeros((2, 128, 128), np.float32)
        np.add.at(extra, (tail & 1, 127 - ((tail >> 1) & 0x7F), 127 - ((tail >> 8) & 0x7F)), 1)
        assert np.array_equal(frames[7] + extra, theirs[7, ::-1])
        differ += bool(n % T)
    assert differ > 0


CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --------------------------------------------------------------------------- the frame cache
def test_cache_is_built_once_and_served_as_model_ready_batches(nmnist):
    root, _, dm = nmnist
    manifest = json.loads((dm.cache.folder / "frames.json").read_text())
    assert manifest["complete"] and manifest["recordings"] == 30 and manifest["timesteps"] == T
    assert dm.cache.folder == root / "tonic_frames" / "N-MNIST_T8"
    assert dm.cache.build(*SOURCES["N-MNIST"].open(root), SOURCES["N-MNIST"]) == 0  # nothing left to do
    frames, labels = next(iter(dm.train_dataloader()))
    assert frames.shape == (4, T, 2, 32, 32) and frames.dtype == torch.uint16  # counts cross to the device as they are
    events, labels2 = dm.on_after_batch_transfer((frames, labels))
    assert events.shape == (T, 4, 2, 32, 32) and events.dtype == torch.float32 and labels2.dtype == torch.int64
    assert torch.equal(events[:, 1], frames[1].float())
    assert load_frames(dm.datasets["train"].files[0]).dtype == np.uint16


def test_half_built_cache_is_named_and_resumed(tmp_path):
    make_nmnist(tmp_path, train=1, test=1)
    dm = _dm("N-MNIST", tmp_path)
    dm.prepare_data()
    manifest = dm.cache.folder / "frames.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "complete": False}))  # as a build killed mid-way leaves it
    victim = dm.cache.folder / "Test" / "7" / "00000.npz"
    victim.unlink()
    with pytest.raises(FrameCacheError, match=r"half-built: 19 of 20 frame files.*complete: false.*resumes"):
        _dm("N-MNIST", tmp_path).setup()
    stamp = (dm.cache.folder / "Train" / "3" / "00000.npz").stat().st_mtime_ns
    assert dm.cache.build(*SOURCES["N-MNIST"].open(tmp_path), SOURCES["N-MNIST"]) == 1  # only the missing one
    assert (dm.cache.folder / "Train" / "3" / "00000.npz").stat().st_mtime_ns == stamp and victim.is_file()
    _dm("N-MNIST", tmp_path).setup()
    # recordings added after the build: refused, with the way out
    write_atis(tmp_path / "NMNIST" / "Test" / "7" / "00001.bin", [1] * 9, [2] * 9, [0] * 9, np.arange(9))
    with pytest.raises(FrameCacheError, match=r"another set of recordings \(20 files then, 21 now\).*delete"):
        _dm("N-MNIST", tmp_path).setup()


KILLED_BUILD = """
import sys, time
from i2e_train.data import recordings
root, cache = sys.argv[1], sys.argv[2]
src = recordings.SOURCES["N-MNIST"]
recs, reader = src.open(root)
def slow(rec):
    time.sleep(0.05)
    return reader(rec)
recordings.FrameCache(cache, "N-MNIST", 8).build(recs, slow, src)
"""


def test_a_second_cache_builder_waits_for_the_first_naming_it(tmp_path, caplog):
    import threading

    from i2e_train.files import exclusive_lock

    make_nmnist(tmp_path, train=1, test=1)
    src = SOURCES["N-MNIST"]
    recs, reader = src.open(tmp_path)
    cache = FrameCache(tmp_path / "frames", "N-MNIST", T)
    cache.folder.mkdir()
    built = []
    with exclusive_lock(cache.folder / FrameCache.LOCK, {"tool": "frame cache"}):  # the first builder
        with caplog.at_level("INFO", logger="i2e_train.data.recordings"):
            second = threading.Thread(target=lambda: built.append(cache.build(recs, reader, src)))
            second.start()
            second.join(timeout=1.0)
            assert second.is_alive() and not built and not list(cache.folder.rglob("*.npz"))  # waiting
    second.join(timeout=60)
    assert built == [len(recs)] and not (cache.folder / FrameCache.LOCK).exists()
    assert f"waiting for pid {os.getpid()} on host" in caplog.text and str(cache.folder) in caplog.text


@pytest.mark.slow
def test_cache_build_resumes_after_sigkill(tmp_path):
    make_nmnist(tmp_path, train=3, test=1)
    cache = tmp_path / "frames"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path), str(cache)],
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    deadline = time.time() + 120
    while len(list(cache.rglob("*.npz"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = sorted(cache.rglob("*.npz"))
    assert 5 <= len(done) < 40, "killed in the middle of the build"
    for f in done:  # every visible frame file is complete
        assert load_frames(f).shape == (T, 2, 34, 34)
    src = SOURCES["N-MNIST"]
    recs, reader = src.open(tmp_path)
    with pytest.raises(FrameCacheError, match=rf"half-built: {len(done)} of 40"):
        FrameCache(cache, "N-MNIST", T).check(recs)
    assert FrameCache(cache, "N-MNIST", T).build(recs, reader, src) == 40 - len(done)
    FrameCache(cache, "N-MNIST", T).check(recs)
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
    clean = tmp_path / "clean"
    FrameCache(clean, "N-MNIST", T).build(recs, reader, src)
    for r in recs:  # identical to an uninterrupted build
        rel = Path(r.rel).with_suffix(".npz")
        assert np.array_equal(load_frames(cache / rel), load_frames(clean / rel))


def test_build_with_worker_processes_equals_in_process(ncaltech, tmp_path):
    root, _, dm = ncaltech
    src = SOURCES["N-Caltech101"]
    recs, reader = src.open(root)
    FrameCache(tmp_path / "pool", "N-Caltech101", T).build(recs, reader, src, workers=2)
    for r in recs[::7]:
        assert np.array_equal(load_frames(tmp_path / "pool" / Path(r.rel).with_suffix(".npz")),
                              load_frames(dm.cache.path(r)))


# --------------------------------------------------------------------------- offline: what to place where
def test_missing_recordings_say_what_to_place_where(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tonic.download_utils, "download_url", no_download)
    monkeypatch.setattr(tonic.download_utils, "download_and_extract_archive", no_download)
    for name, layout in (("N-MNIST", r"NMNIST/Train/<digit>/\*\.bin"),
                         ("N-Caltech101", r"NCALTECH101/Caltech101/<class>/\*\.bin"),
                         ("CIFAR10-DVS", r"extract/<class>/\*\.aedat")):
        with pytest.raises(RecordingsUnavailableError, match=rf"(?s)nothing is downloaded.*{layout}"):
            _dm(name, tmp_path / "empty").prepare_data()
    make_nmnist(tmp_path / "partial", train=1, test=1)
    for f in (tmp_path / "partial" / "NMNIST" / "Test" / "4").iterdir():
        f.unlink()
    with pytest.raises(RecordingsUnavailableError, match=r"Test: class folder\(s\) \['4'\] hold no \*\.bin file"):
        _dm("N-MNIST", tmp_path / "partial").prepare_data()
    with pytest.raises(FrameCacheError, match="half-built: 0 of"):  # setup before any build
        make_nmnist(tmp_path / "fresh", train=1, test=1)
        _dm("N-MNIST", tmp_path / "fresh").setup()


def test_data_configs_compose_and_match_the_catalog():
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from i2e_train.config import compose

    for data, name, res, classes, spatial, split in (("nmnist", "N-MNIST", 32, 10, "crop", "official"),
                                                     ("ncaltech101", "N-Caltech101", 224, 101, "area", "stratified"),
                                                     ("cifar10dvs_tonic", "CIFAR10-DVS", 128, 10, "none", "per_class")):
        GlobalHydra.instance().clear()
        try:
            cfg = compose("train", [f"data={data}", "paths.output_dir=unused"])
        finally:
            GlobalHydra.instance().clear()
        dm = instantiate(cfg.data)
        assert isinstance(dm, RealEventsDataModule) and dm.info.name == name and dm.info.twin is not None
        assert dm.shape == (T, 2, res, res) and dm.num_classes == cfg.model.num_classes == classes
        assert (dm.spatial, dm.split, dm.batch_size) == (spatial, split, 32)
        assert dm.twin_classes == list(dm.info.class_names) and len(dm.twin_classes) == classes
