"""i2e-convert: image folders / HF datasets -> released-schema parquet, resume, bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

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


# --------------------------------------------------------------------------- writes stay inside out=
KW = {"resolution": 8, "ratio": RATIO, "batch_size": 2, "num_workers": 0, "rows_per_shard": 5, "progress": False,
      "device": "cpu"}


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: relative path -> (kind, bytes or link target, mtime) (links not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", str(p.readlink()), st.st_mtime_ns)
        elif p.is_file():
            out[str(p.relative_to(root))] = ("file", p.read_bytes(), st.st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = ("dir", None, None)
    return out


def victim(folder: Path) -> Path:
    """A folder of someone's parquet files and notes (what a wrong path must never touch)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": [1, 2]}), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"x": [3]}), folder / "precious.parquet")
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("name", ["../X", "../../X", "a/b", "..", ".", "", "ok/../../X", "a\\b", ".hidden", "-x",
                                  "a..b", "x" * 101, "bad name", "tab\tname", "é", "ABSOLUTE"])
def test_config_name_that_is_a_path_is_refused_and_nothing_is_written(folder, tmp_path, name):
    home = tmp_path / "home"
    victim(home / "X")
    work = home / "work"
    work.mkdir()
    if name == "ABSOLUTE":
        name = str(home / "X")  # an unrelated folder of parquet files, with overwrite=true
    before = tree(tmp_path)
    with pytest.raises(ConvertError, match=r"config=.* is not a config name: use letters, digits"):
        convert(folder, work / "out", name, overwrite=True, **KW)
    assert tree(tmp_path) == before  # nothing written or deleted anywhere, out= not even made


def test_overwrite_deletes_only_the_shards_its_manifest_lists(folder, tmp_path):
    out = tmp_path / "out"
    convert(folder, out, "C", **KW)
    cfg = out / "C"
    (cfg / "notes.txt").write_text("mine")
    (cfg / "sub").mkdir()
    (cfg / "sub" / "train-00000-of-00003.parquet").write_bytes(b"mine too")
    outside = victim(tmp_path / "elsewhere")
    (cfg / "train-00001-of-00003.parquet").unlink()
    (cfg / "train-00001-of-00003.parquet").symlink_to(outside / "precious.parquet")  # listed name, a link
    kept = {k: v for k, v in tree(tmp_path).items() if "notes" in k or "sub" in k or k.startswith("elsewhere")}
    done = convert(folder, out, "C", overwrite=True, **{**KW, "ratio": 0.1})
    assert done.complete and done.shards_written == 3
    after = tree(tmp_path)
    assert {k: after[k] for k in kept} == kept  # unlisted files and the link's target untouched
    assert not (cfg / "train-00001-of-00003.parquet").is_symlink()  # the link itself was ours to replace

    for foreign in ("mine.parquet", "train-00000-of-00007.parquet", "test-00000-of-00001.parquet"):
        (cfg / foreign).write_bytes(b"not ours")
        before = tree(tmp_path)
        with pytest.raises(ConvertError, match=rf"overwrite=true: .*C holds parquet files its convert-manifest.json "
                                               rf"does not list \({foreign}\).*nothing was deleted"):
            convert(folder, out, "C", overwrite=True, **KW)
        assert tree(tmp_path) == before
        (cfg / foreign).unlink()

    (cfg / "convert-manifest.json").unlink()
    before = tree(tmp_path)
    with pytest.raises(ConvertError, match=r"overwrite=true: .*C holds parquet files \(train-00000-of-00003.parquet, "
                                           r".*but no convert-manifest.json.*nothing was deleted"):
        convert(folder, out, "C", overwrite=True, **KW)
    assert tree(tmp_path) == before


def _manifest(**changes) -> dict:
    good = {"format": 1, "tool": "i2e-convert", "config": "C", "params": {}, "runs": [],
            "splits": {"train": {"source": {}, "count": 12, "shards": 3,
                                 "done": {"train-00000-of-00003.parquet": {"rows": 5, "events": 9, "bad": []}}}}}
    for key, value in changes.items():
        good[key] = value
    return good


@pytest.mark.parametrize("bad, key", [
    ({"splits": {"train": {"count": 1, "shards": 1, "done": {"../../elsewhere/precious.parquet": {"rows": 1,
                                                                                                 "events": 0}}}}},
     "splits.train.done.'../../elsewhere/precious.parquet'"),
    ({"splits": {"train": {"count": 1, "shards": 1, "done": {"/abs/train-00000-of-00001.parquet": {"rows": 1,
                                                                                                  "events": 0}}}}},
     "splits.train.done.'/abs/train-00000-of-00001.parquet'"),
    ({"splits": {"../x": {"count": 1, "shards": 1, "done": {}}}}, "splits.../x"),
    ({"splits": {"train": {"count": 1, "shards": 1, "done": {"test-00000-of-00001.parquet": {"rows": 1,
                                                                                            "events": 0}}}}},
     "splits.train.done.'test-00000-of-00001.parquet'"),
    ({"splits": {"train": {"count": 1, "shards": "3", "done": {}}}}, "splits.train.shards"),
    ({"config": "D"}, "config: it was made for config 'D', not 'C'"),
    ({"config": "../C"}, "config='../C' is not a config name"),
    ({"tool": "other"}, "tool: 'other', expected 'i2e-convert'"),
    ({"format": 2}, "format: 2, expected 1"),
    ({"_target_": "builtins.open"}, "_target_: unknown key"),
    ({"params": ["x"]}, "params and splits must be objects"),
])
def test_a_crafted_manifest_is_refused_before_any_name_in_it_is_used(folder, tmp_path, bad, key):
    out = tmp_path / "out"
    convert(folder, out, "C", **KW)
    victim(tmp_path / "elsewhere")
    manifest = out / "C" / "convert-manifest.json"
    manifest.write_text(json.dumps(_manifest(**bad)))
    before = tree(tmp_path)
    for overwrite in (True, False):
        with pytest.raises(ConvertError, match=re.escape(f"{manifest}: not an i2e-convert manifest ({key}")):
            convert(folder, out, "C", overwrite=overwrite, **KW)
    assert tree(tmp_path) == before

    from i2e_train.data.base import DataFileError
    from i2e_train.data.parquet import check_complete, find_data_files

    if "config" not in bad:  # reading the folder refuses it too (a renamed config folder is read as it is)
        with pytest.raises(DataFileError, match=re.escape(f"{manifest}: not an i2e-convert manifest ({key}")):
            check_complete(find_data_files(out, "C"), out, "C")


def test_a_linked_config_folder_or_a_dangling_out_is_refused(folder, tmp_path):
    outside = victim(tmp_path / "elsewhere")
    (outside / "convert-manifest.json").write_text(json.dumps(_manifest()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "C").symlink_to(outside, target_is_directory=True)
    before = tree(tmp_path)
    with pytest.raises(ConvertError, match=rf"{out / 'C'} is a symbolic link \(to {outside}\): i2e-convert writes "
                                           r"only into a real folder inside out="):
        convert(folder, out, "C", overwrite=True, **KW)
    assert tree(tmp_path) == before

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "not-there")
    with pytest.raises(ConvertError, match=rf"out={dangling} is a symbolic link to {tmp_path / 'not-there'}, which "
                                           "does not exist; create that folder or give another out="):
        convert(folder, dangling, "C", **KW)
    assert not (tmp_path / "not-there").exists()
    linked = tmp_path / "linked"  # a link to a real folder is a fine out=
    linked.symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir()
    assert convert(folder, linked, "C", **KW).complete and (tmp_path / "real" / "C" / "convert-manifest.json").exists()


# --------------------------------------------------------------------------- one writer per folder
def _hold_lock(path: str, record: dict, ready, release) -> None:
    from i2e_train.files import exclusive_lock

    with exclusive_lock(path, record):
        ready.set()
        release.wait(60)


def test_a_second_conversion_is_refused_naming_the_running_one(folder, tmp_path, caplog):
    import multiprocessing as mp
    import signal
    import socket

    from i2e_train.convert import LOCK

    out = tmp_path / "out"
    convert(folder, out, "C", max_shards=1, **KW)  # started earlier, to be resumed
    params = json.loads((out / "C" / "convert-manifest.json").read_text())["params"]
    ctx = mp.get_context("fork")
    for theirs, said in ((params, "with the same parameters"), ({**params, "ratio": 0.1}, "ratio: 0.1 -> 0.07")):
        ready, release = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_hold_lock, args=(str(out / "C" / LOCK), {"tool": "i2e-convert", "params": theirs},
                                                      ready, release))
        holder.start()
        try:
            assert ready.wait(30)
            before = tree(tmp_path)
            with pytest.raises(ConvertError, match=rf"{out / 'C'} is being written by another i2e-convert \(pid "
                                                   rf"{holder.pid} on host {re.escape(socket.gethostname())}, started "
                                                   rf"\d{{4}}-.*{re.escape(said)}.*one conversion per folder"):
                convert(folder, out, "C", **KW)
            assert tree(tmp_path) == before
        finally:
            release.set()
            holder.join(30)
    # a holder killed while converting leaves its lock file: the next run takes it over, says so, resumes
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out / "C" / LOCK), {"params": params}, ready, release))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert (out / "C" / LOCK).exists()
    with caplog.at_level("WARNING", logger="i2e_train.files"):
        done = convert(folder, out, "C", **KW)
    assert done.complete and done.shards_skipped == 1
    assert f"taking over the lock left by pid {holder.pid} on host" in caplog.text
    assert not (out / "C" / LOCK).exists() and not (out / ".i2e-convert-card.lock").exists()


def test_without_flock_the_owner_record_keeps_a_second_writer_out(tmp_path, monkeypatch, caplog):
    """Some network filesystems have no flock: a record of a live process is honoured, one of a
    dead process on this host is taken over."""
    import errno
    import fcntl
    import socket
    import subprocess
    import sys

    from i2e_train.files import LockHeld, exclusive_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / "x.lock"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    for pid, held in ((os.getpid(), True), (int(gone.stdout), False)):
        lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
        if held:
            with pytest.raises(LockHeld, match=f"held by pid {pid} on host"), exclusive_lock(lock):
                pass
            assert json.loads(lock.read_text())["pid"] == pid  # left as it was
        else:
            with caplog.at_level("WARNING", logger="i2e_train.files"), exclusive_lock(lock) as previous:
                assert previous["pid"] == pid and json.loads(lock.read_text())["pid"] == os.getpid()
            assert "does not support file locks" in caplog.text and f"left by pid {pid}" in caplog.text
            assert not lock.exists()


def _race_worker(ratio: float, tasks, barrier, results) -> None:
    """One converting process: for each (source, out) task, meet the other at ``barrier``, then convert."""
    torch.set_num_threads(1)
    for folder, out in iter(tasks.get, None):
        barrier.wait(60)
        try:
            s = convert(folder, out, "R", **{**KW, "rows_per_shard": 2, "ratio": ratio})
            results.put((ratio, "complete" if s.complete else "incomplete", ""))
        except ConvertError as exc:
            results.put((ratio, "refused", str(exc)))
        except BaseException as exc:  # noqa: BLE001 - any other end is a failure the test reports
            results.put((ratio, "error", repr(exc)))


@pytest.mark.slow
def test_two_conversions_into_one_folder_never_both_complete_with_other_parameters(folder, tmp_path):
    """Two processes start a conversion at the same moment (20 times), other ratios, one output
    folder: one completes, the other is refused (by the lock, or by the manifest of the finished
    one), and the folder holds exactly the winner's shards. (Spawned processes: a fork after
    OpenMP ran is unsafe.)"""
    import multiprocessing as mp

    ratios = (0.07, 0.1)
    want = {}
    for r in ratios:
        convert(folder, tmp_path / f"ref{r}", "R", **{**KW, "rows_per_shard": 2, "ratio": r})
        want[r] = shard_bytes(tmp_path / f"ref{r}", "R")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    tasks = {r: ctx.Queue() for r in ratios}
    procs = [ctx.Process(target=_race_worker, args=(r, tasks[r], barrier, results), daemon=True) for r in ratios]
    for p in procs:
        p.start()
    ends = []
    try:
        for i in range(20):
            out = tmp_path / f"race{i}"
            for r in ratios:
                tasks[r].put((str(folder), str(out)))
            got = sorted((results.get(timeout=300) for _ in ratios), key=lambda e: e[1])
            assert [e[1] for e in got] == ["complete", "refused"], got
            (winner, _, _), (_, _, message) = got
            assert "is being written by another i2e-convert" in message or "refusing to resume" in message, message
            assert json.loads((out / "R" / "convert-manifest.json").read_text())["params"]["ratio"] == winner
            assert shard_bytes(out, "R") == want[winner]
            ends.append("lock" if "being written" in message else "manifest")
    finally:
        for r in ratios:
            tasks[r].put(None)
        for p in procs:
            p.join(60)
    assert "lock" in ends, ends  # the two did overlap


# --------------------------------------------------------------------------- bad parameters: one line naming them
def test_a_source_that_is_no_folder_and_no_hub_id_is_named_without_a_network_call(folder, tmp_path, monkeypatch):
    import datasets

    from i2e_train.data.sources import SourceError

    def no_network(*args, **kw):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(datasets, "get_dataset_split_names", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.chdir(tmp_path)
    for source in ("no_such_dir", "data/no/such", "./no_such_dir", str(tmp_path / "gone"), "no_such_dir/",
                   "a..b/c", "~/x"):
        with pytest.raises(SourceError, match=rf"source {re.escape(repr(source))} does not exist: no local folder or "
                                              "file of that name, and not a Hugging Face Hub dataset"):
            convert(source, tmp_path / "out", "C", **KW)
    (tmp_path / "data").mkdir()
    with pytest.raises(SourceError, match=r"source 'data/images' does not exist: data is a local folder without "
                                          r"'images' in it \(so this is a path, not a Hugging Face Hub id\)"):
        convert("data/images", tmp_path / "out", "C", **KW)
    assert not (tmp_path / "out").exists()


def test_a_hub_lookup_that_cannot_reach_the_hub_says_so(tmp_path, monkeypatch):
    """owner/name with no such local path is looked up on the Hub: offline mode (the tests' own
    setting) and an unreachable network are named, with the source."""
    import datasets

    from i2e_train.data.sources import SourceError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"source 'someone/no_such_set': no local folder or file of that name, "
                                          r"and offline mode is on \(HF_HUB_OFFLINE"):
        convert("someone/no_such_set", tmp_path / "out", "C", **KW)

    def unreachable(*args, **kw):  # what datasets raises when the Hub's address does not resolve
        try:
            raise FileNotFoundError("Dataset someone/no_such_set is not cached in None")
        except FileNotFoundError:
            raise ConnectionError("Couldn't reach 'someone/no_such_set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "get_dataset_split_names", unreachable)
    with pytest.raises(SourceError, match=r"source 'someone/no_such_set': no local folder or file of that name, "
                                          r"and the Hugging Face Hub cannot be reached .*\(network unreachable\)"):
        convert("someone/no_such_set", tmp_path / "out", "C", **KW)

    def missing(*args, **kw):
        from datasets.exceptions import DatasetNotFoundError

        raise DatasetNotFoundError("Dataset 'someone/no_such_set' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "get_dataset_split_names", missing)
    with pytest.raises(SourceError, match=r"source 'someone/no_such_set': no local folder or file of that name, "
                                          r"and not a Hugging Face Hub dataset"):
        convert("someone/no_such_set", tmp_path / "out", "C", **KW)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", [1.5, 1.0001, 7])
def test_a_ratio_above_one_is_refused_before_anything_is_written(folder, tmp_path, ratio):
    with pytest.raises(ConvertError, match=rf"ratio={float(ratio)}: the threshold is ratio x each image's intensity "
                                           r"range.*no events at all; use one in \[0, 1\]"):
        convert(folder, tmp_path / "out", "C", **{**KW, "ratio": ratio})
    assert not (tmp_path / "out").exists()


def test_ratio_one_still_makes_events_where_neighbours_span_the_range(tmp_path):
    """The valid range ends at 1: a black/white edge reaches thr = 1 x range exactly (>=)."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 4:] = 255
    Image.fromarray(img).save(src / "edge.png")
    done = convert(tmp_path / "src", tmp_path / "out", "C", **{**KW, "ratio": 1.0})
    assert done.event_rate > 0


def test_a_truncated_shard_is_named_with_how_to_fix_it(folder, tmp_path):
    from i2e_train.data.base import DataFileError
    from i2e_train.data.local import own_data

    out = tmp_path / "out"
    convert(folder, out, "C", **KW)
    shard = out / "C" / "train-00001-of-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:200])  # a copy cut short
    dm = own_data(str(out), data_dir=str(tmp_path / "cache"), num_workers=0, batch_size=4, val_fraction=0.25)
    with pytest.raises(DataFileError, match=rf"{shard}: not a readable parquet file \(.*\); it is truncated or "
                                            r"corrupt\. Delete it and run the same i2e-convert command again .*"
                                            r"or convert again with overwrite=true"):
        dm.setup()
    with pytest.raises(ConvertError, match=rf"{shard}: existing shard is unreadable .*delete it"):
        convert(folder, out, "C", **KW)
    shard.unlink()  # the fix the message gives
    assert convert(folder, out, "C", **KW).shards_written == 1
    own_data(str(out), data_dir=str(tmp_path / "cache"), num_workers=0, batch_size=4, val_fraction=0.25).setup()
