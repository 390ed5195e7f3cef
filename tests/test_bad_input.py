"""The bad-input catalogue: every kind of bad input stops with a message that names the file / split /
row / key and says what was expected (or, with on_bad_record=skip, is counted and reported).

Where each entry is tested (this file holds the ones not tested elsewhere, end to end through the
DataModule and the CLIs):
- truncated record, record that is not a .npy, header shape not matching the config:
  test_i2e_dataset.py::test_corrupt_records_raise_with_split_row_and_path (+ test_codec.py)
- label not matching its file_path: test_i2e_dataset.py::test_label_not_matching_file_path_is_named
- wrong dtype, label out of range, missing split, corrupt / truncated / foreign parquet file,
  empty dataset: here
- unknown config name: test_i2e_dataset.py::test_missing_path_and_unknown_name_are_named (data
  name), test_cli.py::test_unknown_config_name_is_named (config group option)
- unreadable image in i2e-convert: test_convert.py::test_bad_images_name_the_file; non-RGB: here
- NaN/Inf in images: test_convert.py::test_bad_images_name_the_file (converter input files);
  the I2E converter itself: here
- checkpoint of another architecture / class count: test_pretrained.py (load_checkpoint); through
  i2e-train init_from: here
- bad Hydra override: here
- on_bad_record=skip (count logged and written to the run folder, DataLoader workers included): here
- offline without a local copy: test_i2e_dataset.py::test_offline_without_local_copy_says_how_to_get_it;
  CIFAR10-DVS missing / stale build marker: test_dvs.py
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import run_cli, train_in_process
from i2e_train.codec import RecordError, encode_record
from i2e_train.data import I2EDataModule
from i2e_train.data.base import DataFileError, DatasetUnavailableError
from i2e_train.data.writer import shard_name, write_shard

SHAPE = (8, 2, 32, 32)  # I2E-MNIST's
NAMES = [str(c) for c in range(10)]
GOOD = encode_record(np.zeros(SHAPE, dtype=bool))


def _shard(root, split, records, labels=None, paths=None):
    n = len(records)
    labels = list(range(n)) if labels is None else labels
    paths = paths or [f"{lab}/{split}{i}.npy" for i, lab in enumerate(labels)]
    return write_shard(root / "I2E-MNIST" / shard_name(split, 0, 1), paths, labels, records, NAMES)


def _dm(root, **kw):
    kw = {"batch_size": 4, "num_workers": 0, **kw}
    dm = I2EDataModule(name="I2E-MNIST", path=str(root), data_dir=str(root / "cache"), **kw)
    dm.setup()
    return dm


def _first_val_batch(dm):
    return next(iter(dm.val_dataloader()))


# --------------------------------------------------------------------------- records
def test_record_of_the_wrong_dtype_is_named(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros(100, dtype=np.uint16))
    _shard(tmp_path, "train", [GOOD])
    _shard(tmp_path, "validation", [GOOD, buf.getvalue()])
    with pytest.raises(RecordError, match=r"split 'validation', row 1, file_path '1/validation1.npy': "
                                          r"expected a 1-D uint8 array, got dtype uint16"):
        _first_val_batch(_dm(tmp_path))


def test_label_out_of_range_is_named(tmp_path):
    _shard(tmp_path, "train", [GOOD])
    # plain integer labels (no ClassLabel): 0..9 expected for the 10 classes of I2E-MNIST
    pq.write_table(pa.table({"file_path": ["3/a.npy", "12/b.npy"], "label": pa.array([3, 12], pa.int64()),
                             "data": pa.array([GOOD, GOOD], pa.binary())}),
                   tmp_path / "I2E-MNIST" / shard_name("validation", 0, 1))
    with pytest.raises(RecordError, match=r"split 'validation', row 1, file_path '12/b.npy': label 12 outside 0..9"):
        _first_val_batch(_dm(tmp_path))


# --------------------------------------------------------------------------- files and splits
def test_missing_split_lists_the_splits_found(tmp_path):
    _shard(tmp_path, "validation", [GOOD])
    with pytest.raises(DatasetUnavailableError, match=r"split 'train' of I2E-MNIST not found under "
                                                      rf"'{tmp_path}'; found splits: \['validation'\]"):
        _dm(tmp_path)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[: len(b) // 2], "not a readable parquet file.*truncated or corrupt"),  # interrupted download
    (lambda b: b"PAR1" + os.urandom(300), "not a readable parquet file"),
])
def test_corrupt_parquet_file_is_named(tmp_path, damage, match):
    _shard(tmp_path, "train", [GOOD] * 3)
    bad = _shard(tmp_path, "validation", [GOOD] * 3)
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataFileError, match=rf"{bad}: {match}.*split 'validation' of I2E-MNIST"):
        _dm(tmp_path)
    with pytest.raises(DataFileError, match=str(bad)):
        _dm(tmp_path, streaming=True)


def test_parquet_of_images_instead_of_events_says_what_to_do(tmp_path):
    (tmp_path / "I2E-MNIST").mkdir()
    for split in ("train", "validation"):
        pq.write_table(pa.table({"img": pa.array([b"\x89PNG..."]), "label": [0]}),
                       tmp_path / "I2E-MNIST" / shard_name(split, 0, 1))
    with pytest.raises(DataFileError, match=r"columns \['img', 'label'\].*missing \['file_path', 'data'\]"
                                            r".*image dataset: convert it with i2e-convert"):
        _dm(tmp_path)


def test_empty_dataset_is_named(tmp_path, caplog):
    _shard(tmp_path, "train", [])
    _shard(tmp_path, "validation", [GOOD])
    with pytest.raises(DatasetUnavailableError, match=r"split 'train' of I2E-MNIST under .* is empty: "
                                                      r"1 parquet file\(s\), 0 rows \(.*train-00000-of-00001"):
        _dm(tmp_path)
    # an empty shard next to good ones is left out, with a warning naming it
    write_shard(tmp_path / "I2E-MNIST" / shard_name("train", 1, 2), ["0/x.npy"], [0], [GOOD], NAMES)
    with caplog.at_level("WARNING"):
        dm = _dm(tmp_path)
    assert len(dm.datasets["train"]) == 1
    assert "leaving out 1 parquet file(s) with 0 rows" in caplog.text and "train-00000-of-00001" in caplog.text


# --------------------------------------------------------------------------- images
def test_non_rgb_images_in_convert(tmp_path):
    """Other colour modes are converted to RGB (the released preprocessing); an image that is not
    one (2 channels) stops the conversion, naming the file and row."""
    from PIL import Image

    from i2e_train.convert import convert
    from i2e_train.data.sources import BadImageError

    src = tmp_path / "folder"
    (src / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)).save(src / "a" / "g.png")  # 16-bit grey
    Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert("CMYK").save(src / "a" / "c.jpg")
    done = convert(src, tmp_path / "out", "M", resolution=8, ratio=0.07, num_workers=0, progress=False)
    assert done.complete and done.splits == {"train": 2}

    pq.write_table(pa.table({"image": [np.zeros((6, 6, 3), np.uint8).tolist(), np.zeros((6, 6, 2), np.uint8).tolist()],
                             "label": [0, 1]}), tmp_path / "arrays.parquet")
    with pytest.raises(BadImageError, match=rf"{tmp_path / 'arrays.parquet'} split 'train', row 1: image array of "
                                            r"shape \(6, 6, 2\), expected \(H, W\), \(H, W, 3\|4\) or \(3, H, W\)"):
        convert(tmp_path / "arrays.parquet", tmp_path / "out2", "A", splits="train", resolution=8, ratio=0.07,
                num_workers=0, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_converter_refuses_non_finite_images(bad):
    from i2e_train.i2e import I2E

    x = torch.rand(2, 3, 8, 8)
    x[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf.*shape \(2, 3, 8, 8\).*\[0, 1\]"):
        I2E()(x)


# --------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_bad_hydra_override_is_named(tmp_path):
    proc = run_cli("i2e_train.cli.train", "trainer.max_epoch=1", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not override 'trainer.max_epoch'" in proc.stderr and "max_epoch" in proc.stderr


def test_checkpoint_for_another_class_count_is_named(tmp_path, monkeypatch):
    from i2e_train.models import CheckpointMismatchError, create_model

    ckpt = tmp_path / "five.pth.tar"
    torch.save({"epoch": 1, "state_dict": create_model("ms_resnet_tiny", num_classes=5).state_dict()}, ckpt)
    with pytest.raises(CheckpointMismatchError) as err:
        train_in_process(tmp_path, monkeypatch, f"init_from={ckpt}", "debug=fast", "~logger")
    msg = str(err.value)
    assert str(ckpt) in msg and "fc.weight: checkpoint [5, 128] vs model [10, 128]" in msg, msg
    assert "fc.bias: checkpoint [5] vs model [10]" in msg and "replace_head=True" in msg


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_skipped_records_from_loader_workers_reach_the_counter(tmp_path, streaming):
    """Each worker holds a copy of the counter: the skipped records travel with the batches
    (streaming: with the next item, or alone at the end of a worker's stream)."""
    recs = [encode_record(np.zeros(SHAPE, dtype=bool))] * 12
    bad = list(recs)
    bad[4], bad[11] = recs[4][:-3], b"junk"  # the last row of the stream is bad too
    for s, split in enumerate(("train", "validation")):
        for k in range(2):  # 2 shards: one per worker when streaming
            rows = range(6 * k, 6 * k + 6)
            write_shard(tmp_path / "I2E-MNIST" / shard_name(split, k, 2), [f"{i % 10}/{split}{i}.npy" for i in rows],
                        [i % 10 for i in rows], [bad[i] for i in rows], NAMES)
    dm = _dm(tmp_path, num_workers=2, on_bad_record="skip", streaming=streaming)
    for _ in range(2):  # every epoch reads the bad rows again: counted once
        n = sum(len(dm.on_after_batch_transfer(batch)[1]) for batch in dm.val_dataloader())
        assert n == 10
    assert dm.bad_records.counts == {"validation": 2}
    assert sorted("truncated" in m for m in dm.bad_records.examples) == [False, True]  # junk: "not a .npy"


@pytest.mark.slow
def test_skipped_records_are_counted_logged_and_written_to_the_run_folder(tmp_path, monkeypatch, caplog):
    """on_bad_record=skip with DataLoader workers (each holds a copy of the counter) and 2 epochs (bad
    rows are read twice): every bad record is counted once, logged and listed in bad_records.json."""
    data = tmp_path / "own"
    recs = [encode_record(np.random.default_rng(i).random(SHAPE) < 0.05) for i in range(16)]
    train = list(recs)
    train[3] = recs[3][:-7]  # truncated
    train[10] = b"not a numpy file"
    val = recs[:8]
    val[5] = encode_record(np.zeros((8, 2, 16, 16), dtype=bool))  # another resolution
    _shard(data, "train", train, labels=[i % 10 for i in range(16)])
    _shard(data, "validation", val, labels=[i % 10 for i in range(8)])
    _, run = train_in_process(tmp_path, monkeypatch, "data.name=I2E-MNIST", f"data.path={data}",
                              "data.on_bad_record=skip", "data.num_workers=2", "data.batch_size=4",
                              "trainer.max_epochs=2", "eval_after_fit=false")
    report = json.loads((run / "bad_records.json").read_text())
    assert report["total"] == 3 and report["counts"] == {"train": 2, "validation": 1}
    assert any("row 3, file_path '3/train3.npy'" in m and "truncated" in m for m in report["examples"])
    assert any("row 10" in m and "not a .npy" in m for m in report["examples"])
    assert any("split 'validation', row 5" in m and "(8, 2, 16, 16)" in m for m in report["examples"])
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert [float(r["data/bad_records"]) for r in rows if r.get("data/bad_records")] == [3.0, 3.0]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad record: ")]
    assert len(logged) == 3 and {m.removeprefix("skipping bad record: ") for m in logged} == set(report["examples"])
