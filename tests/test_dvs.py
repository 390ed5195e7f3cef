"""CIFAR10DVSDataModule: offline build from synthetic AEDAT 2.0 files, the 9:1 split, frames, errors."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from i2e_train.data.dvs import CLASS_NAMES, CIFAR10DVSDataModule, DVSDatasetError
from i2e_train.data.splits import per_class_split

FILES_PER_CLASS = (3, 4, 5, 6, 7, 8, 9, 10, 3, 11)


def write_aedat(path, x, y, p, t) -> None:
    """AEDAT 2.0 as the CIFAR10-DVS recordings: '#' header lines, then big-endian uint32 pairs
    (address, timestamp) with address = (y << 8) | (x << 1) | polarity (DVS128 layout)."""
    addr = (y.astype(np.uint32) << 8) | (x.astype(np.uint32) << 1) | p.astype(np.uint32)
    body = np.empty(2 * len(addr), dtype=">u4")
    body[0::2], body[1::2] = addr, t
    path.write_bytes(b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# synthetic\r\n" + body.tobytes())


def make_extract(root, files_per_class=FILES_PER_CLASS, seed=0) -> dict:
    """root/extract/<class>/cifar10_<class>_<i>.aedat; returns {(class, stem): (x, y, p)} (raw sensor values)."""
    rng = np.random.default_rng(seed)
    events = {}
    for c, n in zip(CLASS_NAMES, files_per_class):
        d = root / "extract" / c
        d.mkdir(parents=True)
        for i in range(n):
            k = int(rng.integers(200, 400))
            x, y, p = rng.integers(0, 128, k), rng.integers(0, 128, k), rng.integers(0, 2, k)
            x[:20], y[:20] = 5, 7  # repeated pixels: counts above 1
            t = np.sort(rng.integers(0, 10**6, k)).astype(np.uint32)
            write_aedat(d / f"cifar10_{c}_{i}.aedat", x, y, p, t)
            events[(c, f"cifar10_{c}_{i}")] = (x, y, p)
    return events


def hand_frames(x, y, p, frames=8, size=128) -> np.ndarray:
    """Split by number into `frames` slices, count per (polarity, row, column). SpikingJelly stores
    CIFAR10-DVS as x' = 127 - y, y' = 127 - x, p' = 1 - p; frames are [T, p', y', x']."""
    out = np.zeros((frames, 2, size, size), dtype=np.float32)
    n = len(x)
    step = n // frames
    for t in range(frames):
        hi = n if t == frames - 1 else (t + 1) * step
        for j in range(t * step, hi):
            out[t, 1 - p[j], 127 - x[j], 127 - y[j]] += 1
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10dvs")
    events = make_extract(root)
    dm = CIFAR10DVSDataModule(root=str(root), batch_size=8, num_workers=0)
    dm.prepare_data()
    dm.setup()
    return root, events, dm


def test_offline_build_split_and_batches(built):
    root, events, dm = built
    assert (root / "events_np").is_dir() and not (root / "events_np.building").exists()
    assert (root / "frames_number_8_split_by_number").is_dir()
    n = sum(FILES_PER_CLASS)
    assert len(dm.dataset) == n
    # per class, the first ceil(0.9 n) in dataset order train
    expect_train = sum(int(np.ceil(k * 0.9)) for k in FILES_PER_CLASS)
    assert len(dm.datasets["train"]) == expect_train and len(dm.datasets["validation"]) == n - expect_train
    frames, labels = next(iter(dm.train_dataloader()))
    assert frames.shape == (8, 8, 2, 128, 128) and frames.dtype == torch.float32
    events_t, labels2 = dm.on_after_batch_transfer((frames, labels))
    assert events_t.shape == (8, 8, 2, 128, 128) and events_t.dtype == torch.float32
    assert torch.equal(events_t[:, 3], frames[3]) and labels2.dtype == torch.int64
    # counts equal a hand integration of the written events
    i = dm.datasets["validation"].indices[0]
    path, target = dm.dataset.samples[i]
    cls = CLASS_NAMES[target]
    stem = path.replace("\\", "/").rsplit("/", 1)[1].rsplit(".", 1)[0]
    sample, lab = dm.dataset[i]
    assert lab == target and cls in path
    np.testing.assert_array_equal(sample, hand_frames(*events[(cls, stem)]))
    assert sample.max() > 1  # counts, not binarised


def test_split_equals_spikingjelly_split_to_train_test_set(built):
    from spikingjelly.datasets.utils import split_to_train_test_set

    _, _, dm = built
    train, test = split_to_train_test_set(0.9, dm.dataset, 10)
    assert dm.datasets["train"].indices == list(train.indices)
    assert dm.datasets["validation"].indices == list(test.indices)
    # and on a shuffled label order, other ratios
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 37).tolist()
    for ratio in (0.9, 0.5, 0.75):
        ours = per_class_split(targets, ratio, 4)
        ds = [(None, t) for t in targets]
        tr, te = split_to_train_test_set(ratio, ds, 4)
        assert ours == (list(tr.indices), list(te.indices))


def test_frame_builder_reads_recordings_one_at_a_time(built):
    """SpikingJelly integrates in threads; its reads go through one lock (np.load's header parse
    races in CPython 3.11's AST constructor), and the dataset still pickles (spawned workers, DDP)."""
    import pickle
    import threading

    from i2e_train.data import dvs

    root, _, dm = built
    ds = pickle.loads(pickle.dumps(dm.dataset))
    assert type(ds).__name__ == "SerialisedReadCIFAR10DVS" and ds.samples == dm.dataset.samples
    builder = dm.dataset.get_dataset_builder()
    assert builder._event_loader is dvs.load_events_serialised
    rec = next((root / "events_np" / "airplane").iterdir())
    events = dvs.load_events_serialised(rec)
    assert sorted(events) == ["p", "t", "x", "y"]
    done = threading.Event()
    with dvs._EVENTS_READ_LOCK:  # while one read holds the lock, another waits
        worker = threading.Thread(target=lambda: (dvs.load_events_serialised(rec), done.set()))
        worker.start()
        assert not done.wait(0.3)
    worker.join(10)
    assert done.is_set()


def test_threaded_reads_with_finalizers_in_collections(tmp_path):
    """The race itself: 16 threads read .npz files while the garbage collector runs finalizers and
    the interpreter switches threads as often as it can. On CPython 3.11.7 unlocked reads fail here
    with 'SystemError: AST constructor recursion depth mismatch' (about 1 in 100 reads)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from i2e_train.data.dvs import load_events_serialised

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            sum(range(50))

    files = []
    for i in range(20):
        files.append(tmp_path / f"e{i}.npz")
        np.savez(files[-1], t=np.arange(100), x=np.arange(100), y=np.arange(100), p=np.arange(100) % 2)

    def read(f):
        for _ in range(20):
            Cycle()  # garbage with a finalizer, collected during later allocations
        return load_events_serialised(f)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(read, [files[i % len(files)] for i in range(1000)]))
    finally:
        sys.setswitchinterval(interval)
    assert all(np.array_equal(r["t"], np.arange(100)) for r in results)


def test_zip_route(tmp_path):
    src = tmp_path / "src"
    make_extract(src, files_per_class=(1,) * 10, seed=1)
    root = tmp_path / "zipped"
    (root / "download").mkdir(parents=True)
    for c in CLASS_NAMES:
        with zipfile.ZipFile(root / "download" / f"{c}.zip", "w") as zf:
            for f in (src / "extract" / c).iterdir():
                zf.write(f, f"{c}/{f.name}")
    with pytest.raises(DVSDatasetError, match="MD5 mismatch"):  # our zips are not the published ones
        CIFAR10DVSDataModule(root=str(root), num_workers=0).prepare_data()
    assert not (root / "extract").exists() and not (root / "events_np").exists()
    dm = CIFAR10DVSDataModule(root=str(root), num_workers=0, verify_md5=False)
    dm.setup()
    assert len(dm.dataset) == 10 and (root / "extract" / "truck").is_dir()
    # a missing zip is named, nothing is downloaded
    part = tmp_path / "partial"
    (part / "download").mkdir(parents=True)
    (part / "download" / "airplane.zip").write_bytes((root / "download" / "airplane.zip").read_bytes())
    with pytest.raises(DVSDatasetError, match="truck.zip"):
        CIFAR10DVSDataModule(root=str(part), verify_md5=False).setup()


def test_errors_missing_half_built_and_stale_markers(tmp_path, built):
    with pytest.raises(DVSDatasetError, match=r"extract/<class>/\*\.aedat"):
        CIFAR10DVSDataModule(root=str(tmp_path / "empty")).setup()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "events_np.building").touch()
    with pytest.raises(DVSDatasetError, match="safe to delete"):
        CIFAR10DVSDataModule(root=str(stale)).setup()
    half = tmp_path / "half"
    (half / "events_np" / "airplane").mkdir(parents=True)
    (half / "events_np" / "airplane" / "a.npz").write_bytes(b"")
    with pytest.raises(DVSDatasetError, match="incomplete"):
        CIFAR10DVSDataModule(root=str(half)).setup()
    # a stale frame-integration marker next to a built events_np
    root, _, _ = built
    marker = root / "frames_number_4_split_by_number.building"
    marker.touch()
    try:
        with pytest.raises(DVSDatasetError, match="frames_number_4_split_by_number.building"):
            CIFAR10DVSDataModule(root=str(root), frames_number=4, timesteps=4).setup()
    finally:
        marker.unlink()
    with pytest.raises(ValueError, match="timesteps=8 but frames_number=4"):
        CIFAR10DVSDataModule(root=str(root), frames_number=4)
    with pytest.raises(ValueError, match="num_classes"):
        CIFAR10DVSDataModule(root=str(root), num_classes=11)


def test_data_config_composes():
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from i2e_train.config import compose

    GlobalHydra.instance().clear()
    try:
        cfg = compose("train", ["data=cifar10dvs", "paths.output_dir=unused"])
    finally:
        GlobalHydra.instance().clear()
    dm = instantiate(cfg.data)
    assert isinstance(dm, CIFAR10DVSDataModule) and dm.num_classes == cfg.model.num_classes == 10
    assert dm.shape == (8, 2, 128, 128) and dm.batch_size == 32 and dm.root.name == "cifar10dvs"
