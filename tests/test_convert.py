"""i2e-convert: image folders / HF datasets -> released-schema parquet, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import json
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import run_cli
from i2e_train.codec import decode_record, encode_record, records_from_events
from i2e_train.convert import ConvertError, convert, parse_splits
from i2e_train.data.preprocess import preprocess_image
from i2e_train.data.sources import BadImageError, load_image
from i2e_train.i2e import I2E

SIZE, RATIO = 16, 0.07
CLASSES = ("cat", "dog", "frog")


def _make_image(rng: np.random.Generator, kind: int, h: int, w: int) -> Image.Image:
    """Smooth random pictures in the four modes: RGB, grayscale, RGBA, palette."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / rng.uniform(2, 6) + c) * np.cos(yy / rng.uniform(2, 6)) for c in range(3)], -1)
    rgb = np.clip((base + 1) * 127.5 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    if kind == 0:
        return Image.fromarray(rgb, "RGB")
    if kind == 1:
        return Image.fromarray(rgb[..., 0], "L")
    if kind == 2:
        return Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA")
    return Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)


def make_folder(root: Path, classes=CLASSES, per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _make_image(rng, i % 4, 12 + 3 * i, 20 - 2 * i).save(root / c / f"img{i:02d}.png")
    (root / classes[0] / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs") / "src")


def expected_events(files, size=(SIZE, SIZE), ratio=RATIO, order=4, interpolation="bicubic") -> torch.Tensor:
    """The converter (eval mode) on the standard preprocessing of ``files``: bool [T, N, 2, H, W]
    (configs outside I2E-CIFAR10/100 / I2E-ImageNet: the dataset card's v2 bicubic resize)."""
    x = torch.stack([preprocess_image(load_image(str(f)), size, interpolation=interpolation) for f in files])
    with torch.no_grad():
        return I2E(ratio=ratio, order=order, dtype=torch.bool).eval()(x)


def read_rows(out: Path, config: str, split: str = "train") -> list[dict]:
    files = sorted((out / config).glob(f"{split}-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def shard_bytes(out: Path, config: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / config).glob("*.parquet"))}


# --------------------------------------------------------------------------- records
def test_records_equal_encode_record():
    ev = torch.rand(8, 5, 2, 7, 9) < 0.3  # odd sizes: last byte padded
    assert records_from_events(ev) == [encode_record(ev[:, i]) for i in range(5)]


def test_parse_splits_forms():
    assert parse_splits("train,validation=test") == {"train": "train", "validation": "test"}
    assert parse_splits(["train"]) == {"train": "train"}
    assert parse_splits({"validation": "test"}) == {"validation": "test"}
    assert parse_splits(None) is None


# --------------------------------------------------------------------------- image folder
def test_imagefolder_rows_are_the_converters_output(folder, tmp_path):
    out = tmp_path / "out"
    summary = convert(folder, out, "MY-I2E", resolution=SIZE, ratio=RATIO, batch_size=3, num_workers=2,
                      rows_per_shard=5, progress=False)
    assert summary.complete and summary.samples == 12 and summary.shards_written == 3
    assert sorted(p.name for p in (out / "MY-I2E").glob("*.parquet")) == [
        f"train-0000{i}-of-00003.parquet" for i in range(3)]
    rows = read_rows(out, "MY-I2E")
    files = sorted(p for p in folder.rglob("*.png"))
    assert [r["file_path"] for r in rows] == [f"{p.parent.name}/{p.stem}.npy" for p in files]
    assert [r["label"] for r in rows] == [CLASSES.index(p.parent.name) for p in files]
    ev = expected_events(files)
    for i, r in enumerate(rows):
        assert r["data"] == encode_record(ev[:, i])
        np.testing.assert_array_equal(decode_record(r["data"]), ev[:, i].numpy())
    rate = ev.float().mean().item()
    assert summary.event_rate == pytest.approx(rate, rel=1e-6)

    import datasets

    ds = datasets.load_dataset(str(out), "MY-I2E", split="train")
    assert ds.features["label"].names == list(CLASSES) and len(ds) == 12
    assert ds[0]["data"] == rows[0]["data"]


def test_interrupted_conversion_resumes_without_redoing_shards(folder, tmp_path):
    kw = dict(resolution=SIZE, ratio=RATIO, batch_size=2, num_workers=0, rows_per_shard=5, progress=False)
    clean = tmp_path / "clean"
    convert(folder, clean, "C", **kw)
    want = shard_bytes(clean, "C")

    out = tmp_path / "resumed"
    first = convert(folder, out, "C", max_shards=1, **kw)  # "interrupted" after one shard
    assert not first.complete and first.shards_written == 1
    assert not (out / "README.md").exists()  # the card waits for a complete conversion
    shard0 = out / "C" / "train-00000-of-00003.parquet"
    stamp = shard0.stat().st_mtime_ns
    second = convert(folder, out, "C", **kw)
    assert second.complete and second.shards_written == 2 and second.shards_skipped == 1
    assert second.samples == 7 and second.splits == {"train": 12}
    assert shard0.stat().st_mtime_ns == stamp
    assert shard_bytes(out, "C") == want

    # a real interruption (an exception after the first shard) keeps what was written
    class Stop(Exception):
        pass

    def stop(path):
        raise Stop(path)

    out2 = tmp_path / "interrupted"
    with pytest.raises(Stop):
        convert(folder, out2, "C", on_shard=stop, **kw)
    assert [p.name for p in (out2 / "C").glob("*.parquet")] == ["train-00000-of-00003.parquet"]
    assert convert(folder, out2, "C", **kw).shards_written == 2 and shard_bytes(out2, "C") == want

    # a lost last shard is redone alone
    last = out / "C" / "train-00002-of-00003.parquet"
    last.unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "C").glob("*.parquet")}
    third = convert(folder, out, "C", **kw)
    assert third.shards_written == 1 and third.samples == 2
    assert {p: (out / "C" / p).stat().st_mtime_ns for p in stamps} == stamps
    assert shard_bytes(out, "C") == want

    with pytest.raises(ConvertError, match=r"(?s)refusing to resume.*ratio: 0\.07 -> 0\.1"):
        convert(folder, out, "C", **{**kw, "ratio": 0.1})
    with pytest.raises(ConvertError, match="rows_per_shard"):
        convert(folder, out, "C", **{**kw, "rows_per_shard": 4})
    assert shard_bytes(out, "C") == want  # nothing lost by the refusals


def test_train_mode_is_seeded_and_resumable(folder, tmp_path):
    kw = dict(resolution=SIZE, ratio=RATIO, batch_size=4, num_workers=0, rows_per_shard=6, progress=False,
              train_mode=True, seed=3)
    convert(folder, tmp_path / "a", "T", **kw)
    convert(folder, tmp_path / "b", "T", max_shards=1, **kw)
    convert(folder, tmp_path / "b", "T", **kw)
    assert shard_bytes(tmp_path / "a", "T") == shard_bytes(tmp_path / "b", "T")
    eval_rows = [r["data"] for r in read_rows(tmp_path / "a", "T")]
    convert(folder, tmp_path / "c", "T", **{**kw, "train_mode": False})
    assert eval_rows != [r["data"] for r in read_rows(tmp_path / "c", "T")]  # random directions differ


def test_bad_images_name_the_file(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    broken = src / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BadImageError, match=str(broken)):
        convert(src, tmp_path / "out", "B", resolution=SIZE, ratio=RATIO, num_workers=2, progress=False)
    assert not list((tmp_path / "out" / "B").glob("*.parquet"))

    summary = convert(src, tmp_path / "out", "B", resolution=SIZE, ratio=RATIO, num_workers=0, progress=False,
                      on_bad_image="skip")
    assert summary.bad_images == 1 and str(broken) in summary.bad_examples[0]
    assert summary.splits == {"train": 6}
    assert "dog/broken.npy" not in [r["file_path"] for r in read_rows(tmp_path / "out", "B")]

    nan = tmp_path / "nan" / "a" / "x.tif"
    nan.parent.mkdir(parents=True)
    Image.fromarray(np.array([[0.1, np.nan], [0.5, 1.0]], dtype=np.float32), mode="F").save(nan)
    with pytest.raises(BadImageError, match=f"{nan}.*NaN"):
        convert(tmp_path / "nan", tmp_path / "out2", "N", resolution=4, ratio=RATIO, num_workers=0, progress=False)


# --------------------------------------------------------------------------- datasets sources
def _hf_dataset(rng, n, names):
    import datasets

    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    imgs = [_make_image(rng, i % 4, 10 + i % 3, 12) for i in range(n)]
    return datasets.Dataset.from_dict({"img": imgs, "label": [i % len(names) for i in range(n)]}, features=feats), imgs


def test_local_copy_of_a_hub_dataset(tmp_path):
    rng = np.random.default_rng(1)
    repo = tmp_path / "cifar-like"
    (repo / "plain_text").mkdir(parents=True)
    train, train_imgs = _hf_dataset(rng, 7, ["airplane", "automobile", "bird"])
    test, _ = _hf_dataset(rng, 4, ["airplane", "automobile", "bird"])
    train.to_parquet(str(repo / "plain_text" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(repo / "plain_text" / "test-00000-of-00001.parquet"))

    out = tmp_path / "out"
    summary = convert(repo, out, "I2E-Tiny", resolution=SIZE, ratio=RATIO, num_workers=0, progress=False)
    assert summary.splits == {"train": 7, "validation": 4}  # test -> validation (no validation split)
    rows = read_rows(out, "I2E-Tiny")
    assert [r["file_path"] for r in rows] == [f"{i % 3}/{i}.npy" for i in range(7)]
    x = torch.stack([preprocess_image(im, (SIZE, SIZE), interpolation="bicubic") for im in train_imgs])
    ev = I2E(ratio=RATIO, dtype=torch.bool).eval()(x)
    assert [r["data"] for r in rows] == [encode_record(ev[:, i]) for i in range(7)]

    import datasets

    dd = datasets.load_dataset(str(out), "I2E-Tiny")
    assert set(dd) == {"train", "validation"} and dd["train"].features["label"].names == ["0", "1", "2"]
    lim = convert(repo, tmp_path / "lim", "Lim", splits="train", limit=5, resolution=SIZE, ratio=RATIO,
                  num_workers=0, progress=False)
    assert lim.splits == {"train": 5}
    assert [r["data"] for r in read_rows(tmp_path / "lim", "Lim")] == [r["data"] for r in rows[:5]]

    # the same rows from a bare parquet file (struct column, plain int labels, named columns)
    table = pa.table({"picture": pa.array([{"bytes": t["img"]["bytes"], "path": None}
                                            for t in train.cast_column("img", datasets.Image(decode=False))]),
                      "fine_label": pa.array([i % 3 for i in range(7)], pa.int64())})
    pq.write_table(table, tmp_path / "bare.parquet")
    convert(tmp_path / "bare.parquet", tmp_path / "out2", "Bare", splits="train", resolution=SIZE, ratio=RATIO,
            image_column="picture", num_workers=0, progress=False)
    assert [r["data"] for r in read_rows(tmp_path / "out2", "Bare")] == [r["data"] for r in rows]


# --------------------------------------------------------------------------- CLI + DataModule
@pytest.mark.slow
def test_cli_and_datamodule_read_the_output(tmp_path):
    """10 numeric class folders at 32x32 under config name I2E-MNIST (I2EDataModule needs a catalog
    name): the Hydra CLI converts train/ and validation/, the DataModule reads it back."""
    src = tmp_path / "mnist-like"
    digits = [str(d) for d in range(10)]
    make_folder(src / "train", classes=digits, per_class=1, seed=2)
    make_folder(src / "validation", classes=digits, per_class=1, seed=3)
    out = tmp_path / "out"
    proc = run_cli("i2e_train.cli.convert", f"source={src}", f"out={out}", "config=I2E-MNIST", "num_workers=0",
                   "batch_size=4", "progress=false", cwd=tmp_path, timeout=300)
    assert "mean event rate" in proc.stdout and "published for I2E-MNIST: 9.56%" in proc.stdout
    (summary,) = (tmp_path / "logs" / "convert").rglob("convert_summary.json")
    summary = json.loads(summary.read_text())
    assert summary["splits"] == {"train": 10, "validation": 10} and summary["complete"] and summary["bad_images"] == 0

    from i2e_train.data import I2EDataModule

    dm = I2EDataModule(name="I2E-MNIST", path=str(out), data_dir=str(tmp_path / "data"), batch_size=4,
                       num_workers=0)
    dm.setup()
    events, targets = [], []
    for batch in dm.val_dataloader():
        ev, tg = dm.on_after_batch_transfer(batch)
        assert ev.shape[0] == 8 and ev.shape[2:] == (2, 32, 32) and ev.dtype == torch.float32
        events.append(ev)
        targets.append(tg)
    files = sorted((src / "validation").rglob("*.png"))
    assert torch.cat(targets).tolist() == [int(p.parent.name) for p in files]
    want = expected_events(files, size=(32, 32), ratio=0.10)
    assert torch.equal(torch.cat(events, 1).bool(), want)
