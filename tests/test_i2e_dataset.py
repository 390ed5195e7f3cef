"""I2EDataModule and the demo data: packed batches, labels by name, splits, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from i2e_train.codec import RecordError, decode_record, encode_record
from i2e_train.data import I2EDataModule
from i2e_train.data.base import DatasetUnavailableError
from i2e_train.data.digits import digits_split
from i2e_train.data.parquet import find_data_files
from i2e_train.data.splits import stratified_split
from i2e_train.data.writer import shard_name, write_card, write_shard

SHAPE = (8, 2, 32, 32)  # I2E-MNIST's shape: the fixtures below borrow its catalog entry


def make_parquet(root, name="I2E-MNIST", n=40, classes=10, shape=SHAPE, splits=("train", "validation"),
                 shards=2, names=None, seed=0, card=True):
    """A hub-style folder: <root>/<name>/<split>-0000i-of-0000n.parquet (+ README card)."""
    rng = np.random.default_rng(seed)
    names = names or [str(c) for c in range(classes)]
    rows = {}
    for split in splits:
        labels = np.arange(n) % classes
        evs = rng.random((n, *shape)) < 0.06
        fps = [f"{names[lab]}/{split}_{i:05d}.npy" for i, lab in enumerate(labels)]
        recs = [encode_record(e) for e in evs]
        per = -(-n // shards)
        for s in range(shards):
            sl = slice(s * per, (s + 1) * per)
            write_shard(root / name / shard_name(split, s, shards), fps[sl], labels[sl].tolist(), recs[sl], names)
        rows[split] = (fps, labels, evs)
    if card:
        write_card(root, {name: list(splits)})
    return rows


def batches(dm, key="train"):
    loader = dm.train_dataloader() if key == "train" else dm.val_dataloader()
    out = []
    for packed, labels in loader:
        events, labels = dm.on_after_batch_transfer((packed, labels))
        out.append((packed, events, labels))
    return out


def test_digits_build_is_deterministic_and_in_released_schema(digits_root, tmp_path):
    import datasets

    from i2e_train.data.digits import build_digits

    split = digits_split()
    assert len(split["train"]) == 1437 and len(split["validation"]) == 360
    ds = datasets.load_dataset(digits_root, "I2E-Digits", split="validation")
    assert ds.features["label"].names == [str(i) for i in range(10)]
    assert set(ds.column_names) == {"file_path", "label", "data"}
    row = ds[0]
    assert decode_record(row["data"]).shape == SHAPE
    assert row["file_path"].split("/")[0] == str(row["label"])
    again = build_digits(tmp_path, force=True)
    ds2 = datasets.load_dataset("parquet", data_files=str(again / "I2E-Digits" / "validation-*.parquet"), split="train")
    assert ds2["data"] == ds["data"]


def test_demo_datamodule_yields_events_on_device(digits_root):
    dm = I2EDataModule(name="I2E-Digits", path=digits_root, batch_size=64, num_workers=0, data_dir=digits_root)
    dm.setup()
    packed, labels = next(iter(dm.val_dataloader()))
    assert packed.dtype == torch.uint8 and packed.shape == (64, 2048)  # 8*2*32*32/8 bytes per sample
    events, labels2 = dm.on_after_batch_transfer((packed, labels))
    assert events.shape == (8, 64, 2, 32, 32) and events.dtype == torch.float32
    assert labels2.dtype == torch.int64
    rate = events.mean().item()
    assert 0.01 < rate < 0.3
    assert len(dm.datasets["train"]) == 1437 and len(dm.datasets["validation"]) == 360


def test_rows_decode_to_the_written_events(tmp_path):
    rows = make_parquet(tmp_path, n=12, shards=1)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), batch_size=5, num_workers=0, data_dir=str(tmp_path))
    dm.setup()
    fps, labels, evs = rows["validation"]
    got = torch.cat([e for _, e, _ in batches(dm, "validation")], dim=1)
    assert torch.equal(got.bool(), torch.from_numpy(evs).transpose(0, 1))
    got_labels = torch.cat([lab for *_, lab in batches(dm, "validation")])
    assert got_labels.tolist() == labels.tolist()


def test_labels_mapped_by_name_with_100_classes(tmp_path):
    # ClassLabel names ordered as strings: index 2 is "10", not "2".
    names = sorted(str(c) for c in range(100))
    assert names[2] == "10"
    n = 200
    rng = np.random.default_rng(0)
    shape = (8, 2, 32, 32)
    targets = np.arange(n) % 100
    label_idx = [names.index(str(t)) for t in targets]
    fps = [f"{t}/{i}.npy" for i, t in enumerate(targets)]
    recs = [encode_record(rng.random(shape) < 0.05) for _ in range(n)]
    for split in ("train", "validation"):
        write_shard(tmp_path / "Own100" / shard_name(split, 0, 1), fps, label_idx, recs, names)
    dm = I2EDataModule(name="Own100", path=str(tmp_path), num_classes=100, resolution=[32, 32],
                       batch_size=64, num_workers=0, data_dir=str(tmp_path))
    dm.setup()
    got = torch.cat([lab for *_, lab in batches(dm, "validation")])
    assert got.tolist() == targets.tolist(), "targets are the original class indices (folder names)"


def test_label_not_matching_file_path_is_named(tmp_path):
    names = [str(c) for c in range(10)]
    rec = encode_record(np.zeros(SHAPE, dtype=bool))
    write_shard(tmp_path / "I2E-MNIST" / shard_name("validation", 0, 1), ["3/a.npy", "4/b.npy"], [3, 5], [rec, rec], names)
    write_shard(tmp_path / "I2E-MNIST" / shard_name("train", 0, 1), ["3/a.npy"], [3], [rec], names)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), batch_size=2, num_workers=0, data_dir=str(tmp_path))
    dm.setup()
    with pytest.raises(RecordError, match=r"split 'validation', row 1, file_path '4/b.npy'.*class folder"):
        next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("bad,match", [
    (lambda r: r[:-10], "truncated"),
    (lambda r: b"garbage" * 10, "not a .npy"),
    (lambda r: encode_record(np.zeros((8, 2, 16, 16), dtype=bool)), r"header shape \(8, 2, 16, 16\)"),
])
def test_corrupt_records_raise_with_split_row_and_path(tmp_path, bad, match):
    names = [str(c) for c in range(10)]
    good = encode_record(np.zeros(SHAPE, dtype=bool))
    recs = [good, good, bad(good)]
    for split in ("train", "validation"):
        write_shard(tmp_path / "I2E-MNIST" / shard_name(split, 0, 1), ["0/a.npy", "1/b.npy", "2/c.npy"],
                    [0, 1, 2], recs, names)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), batch_size=3, num_workers=0, data_dir=str(tmp_path))
    dm.setup()
    with pytest.raises(RecordError, match=rf"split 'validation', row 2, file_path '2/c.npy'.*{match}|{match}"):
        next(iter(dm.val_dataloader()))
    skip = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), batch_size=3, num_workers=0,
                         data_dir=str(tmp_path), on_bad_record="skip")
    skip.setup()
    packed, labels, skipped = next(iter(skip.val_dataloader()))  # skip: the batch carries the skipped records
    assert labels.tolist() == [0, 1] and skip.bad_records.counts == {"validation": 1}
    assert [split for split, _ in skipped] == ["validation"]


def test_map_and_streaming_give_identical_samples(tmp_path):
    make_parquet(tmp_path, n=30, shards=3)
    kw = dict(name="I2E-MNIST", path=str(tmp_path), batch_size=7, num_workers=0, data_dir=str(tmp_path))
    m = I2EDataModule(**kw)
    s = I2EDataModule(streaming=True, **kw)
    m.setup()
    s.setup()
    mb = batches(m, "validation")
    sb = batches(s, "validation")
    assert torch.equal(torch.cat([p for p, *_ in mb]), torch.cat([p for p, *_ in sb]))
    assert torch.equal(torch.cat([lab for *_, lab in mb]), torch.cat([lab for *_, lab in sb]))


def test_two_ranks_get_disjoint_complete_shards(tmp_path):
    from datasets.distributed import split_dataset_by_node

    make_parquet(tmp_path, n=40, shards=4)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), streaming=True, data_dir=str(tmp_path))
    stream = dm._load("validation", True)
    seen = []
    for rank in range(2):
        seen.append([ex["file_path"] for ex in split_dataset_by_node(stream, rank=rank, world_size=2)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ex["file_path"] for ex in stream)
    assert len(seen[0]) == len(seen[1]) == 20


def test_made_up_validation_split_is_stratified_and_deterministic(tmp_path):
    make_parquet(tmp_path, n=100, splits=("train",), shards=2)
    kw = dict(name="I2E-MNIST", path=str(tmp_path), batch_size=100, num_workers=0,
              data_dir=str(tmp_path), val_fraction=0.2, seed=3)
    with pytest.raises(DatasetUnavailableError, match="catalog entry of I2E-MNIST has one"):
        I2EDataModule(**kw).setup()  # I2E-MNIST has a validation split: carved only when asked
    kw["val_split"] = None
    a, b = I2EDataModule(**kw), I2EDataModule(**kw)
    a.setup()
    b.setup()
    assert np.array_equal(a.datasets["validation"].rows, b.datasets["validation"].rows)
    labels = torch.cat([lab for *_, lab in batches(a, "validation")])
    assert torch.bincount(labels, minlength=10).tolist() == [2] * 10
    assert len(a.datasets["train"]) == 80
    assert not set(a.datasets["train"].rows) & set(a.datasets["validation"].rows)
    streaming = I2EDataModule(streaming=True, **kw)
    streaming.setup()
    sl = torch.cat([lab for *_, lab in batches(streaming, "validation")])
    assert sorted(sl.tolist()) == sorted(labels.tolist())


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.repeat(np.arange(5), [2, 3, 10, 1, 50])
    tr, va = stratified_split(labels, 0.1, 0)
    assert set(labels[tr]) == set(range(5)) and set(labels[va]) == {0, 1, 2, 4}


def test_hub_snapshot_found_by_config_name_without_card(tmp_path):
    make_parquet(tmp_path / "snapshot", n=8, shards=1, card=False)
    files = find_data_files(tmp_path / "snapshot", "I2E-MNIST")
    assert sorted(files) == ["train", "validation"]


def test_offline_without_local_copy_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = I2EDataModule(name="I2E-CIFAR10", data_dir=str(tmp_path), num_workers=0)
    with pytest.raises(DatasetUnavailableError, match=r"(?s)hf download UESTC-BICS/I2E.*data.path="):
        dm.setup()


def test_missing_path_and_unknown_name_are_named(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        I2EDataModule(name="I2E-MNIST", path=str(tmp_path / "nope"), num_workers=0).setup()
    with pytest.raises(KeyError, match="I2E-CIFAR10"):
        I2EDataModule(name="I2E-CIFAR1O")
    with pytest.raises(ValueError, match="catalog says"):
        I2EDataModule(name="I2E-CIFAR10", num_classes=100)


def test_event_augmentation_only_in_training(tmp_path):
    make_parquet(tmp_path, n=8, shards=1)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), batch_size=8, num_workers=0,
                       data_dir=str(tmp_path), augment={"crop_padding": 4, "hflip": 0.5})
    dm.setup()
    packed, labels = next(iter(dm.val_dataloader()))
    plain, _ = dm.on_after_batch_transfer((packed, labels))

    class _T:
        training = True

    dm.trainer = _T()  # what Lightning sets while fitting
    torch.manual_seed(0)
    aug, _ = dm.on_after_batch_transfer((packed, labels))
    assert aug.shape == plain.shape and not torch.equal(aug, plain)
    assert aug.sum() <= plain.sum()  # crops only drop events, flips keep them
