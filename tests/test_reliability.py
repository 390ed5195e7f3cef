"""Reliability and security (issue 24): each test is named after what it would break.

- a crafted checkpoint (its payload writes a marker file) is refused by every entry point and API,
  and the payload never runs;
- run folders are never shared nor overwritten; temporaries are removed only by their owner;
- i2e-eval overrides land at their key; nested experiment names are listed; README pipeline forms parse;
- bad config values and files are one error line naming the key or path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli_env, run_cli, train_in_process
from i2e_train.models import create_model, load_checkpoint
from i2e_train.models.checkpoint import load_torch_file, read_checkpoint
from i2e_train.models.errors import CheckpointFormatError

FAST = ["debug=fast", "~logger"]


class _Payload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def _malicious(path: Path, marker: Path, lightning: bool = True) -> Path:
    """A checkpoint that looks like ours (real tensors, the keys Lightning writes) plus the payload."""
    sd = {"model." + k: v for k, v in create_model("ms_resnet_tiny", num_classes=10).state_dict().items()}
    obj = {"epoch": 1, "global_step": 2, "state_dict": sd, "hyper_parameters": {"x": _Payload(marker)}}
    if lightning:
        obj["pytorch-lightning_version"] = "2.6.0"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture()
def bad(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _malicious(tmp_path / "evil" / "last.ckpt", marker)
    yield path, marker
    assert not marker.exists(), "the checkpoint's payload ran"


def _refused(err) -> None:
    msg = str(err.value)
    assert "refused" in msg and "exec" in msg and "safetensors" in msg, msg


def test_malicious_checkpoint_never_runs_through_the_apis(bad, tmp_path):
    path, _ = bad
    for call in (lambda p: read_checkpoint(p), lambda p: load_torch_file(p),
                 lambda p: load_checkpoint(create_model("ms_resnet_tiny", num_classes=10), p),
                 lambda p: create_model("ms_resnet_tiny", num_classes=10, pretrained=p)):
        for name in ("last.ckpt", "w.pth.tar", "w.pth", "w.pt"):
            target = path.with_name(name)
            if not target.exists():
                target.write_bytes(path.read_bytes())
            with pytest.raises(CheckpointFormatError) as err:
                call(target)
            _refused(err)


def test_malicious_checkpoint_never_runs_as_a_released_weight(bad, tmp_path, monkeypatch):
    path, _ = bad
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "checkpoints"
    (cache / "deep").mkdir(parents=True)
    (cache / "deep" / "cifar10_baseline.pth.tar").write_bytes(path.read_bytes())  # not an expected place
    from i2e_train.models.errors import ReleasedWeightsUnavailable

    with pytest.raises(ReleasedWeightsUnavailable, match="not in"):
        create_model("ms_resnet18", pretrained="released:cifar10_baseline", cache_dir=cache)
    (cache / "cifar10_baseline.pth").write_bytes(path.read_bytes())  # the expected place: read, and refused
    with pytest.raises(CheckpointFormatError) as err:
        create_model("ms_resnet18", pretrained="released:cifar10_baseline", cache_dir=cache)
    _refused(err)


def test_malicious_checkpoint_never_runs_through_init_from_resume_eval_and_pipeline(bad, tmp_path, monkeypatch):
    path, _ = bad
    with pytest.raises(CheckpointFormatError) as err:
        train_in_process(tmp_path, monkeypatch, *FAST, f"init_from={path}")
    _refused(err)
    with pytest.raises(CheckpointFormatError) as err:
        train_in_process(tmp_path, monkeypatch, *FAST, f"ckpt_path={path}", run_dir="resume")
    _refused(err)
    assert not (tmp_path / "resume").exists()  # refused before anything was written

    from i2e_train.config import compose
    from i2e_train.tasks.evaluate import evaluate

    with pytest.raises(CheckpointFormatError) as err:
        evaluate(compose("eval", [f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'eval'}"]))
    _refused(err)

    from i2e_train.tasks.pipeline import run_pipeline

    cfg = compose("pipeline", ["pipeline=demo", f"run_dir={tmp_path / 'pipe'}", f"common_overrides=[debug=fast,'init_from={path}']"])
    with pytest.raises(CheckpointFormatError) as err:
        run_pipeline(cfg)
    _refused(err)


def test_malicious_checkpoint_is_one_error_line_at_the_cli(bad, tmp_path):
    path, _ = bad
    proc = run_cli("i2e_train.cli.train", *FAST, f"init_from={path}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("i2e-train: error: ") and "refused" in lines[-1] and str(path) in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


TINY = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "~logger", "eval_after_fit=false"]


@pytest.mark.slow
def test_finished_run_is_not_overwritten_and_resumes_from_checkpoints_read_weights_only(tmp_path, monkeypatch):
    """Our .ckpt files (hyper-parameters, callback states, optimiser, schedule, RNG) hold nothing
    weights_only=True refuses; a finished run folder is refused unless resumed or overwritten."""
    from i2e_train.tasks.runs import RunFolderError

    _, run = train_in_process(tmp_path, monkeypatch, "trainer.max_epochs=1", *TINY)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "i2e_config"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and read_checkpoint(last).format == "lightning"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds checkpoints.*ckpt_path=last.*overwrite=true"):
        train_in_process(tmp_path, monkeypatch, "trainer.max_epochs=1", *TINY)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # nothing touched
    train_in_process(tmp_path, monkeypatch, "trainer.max_epochs=2", *TINY, "ckpt_path=last")
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["epoch"] > ckpt["epoch"] and resumed["global_step"] == 2 * ckpt["global_step"]


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    """Two i2e-train processes started together: each gets its own folder with its own config.
    (debug=fast: one batch each; the digits are built once beforehand.)"""
    run_cli("i2e_train.cli.train", "debug=fast", "~logger", "hydra.run.dir=first", cwd=tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "i2e_train.cli.train", f"seed={s}", "debug=fast", "~logger"],
                              cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    seeds = sorted((r / ".hydra" / "config.yaml").read_text().split("\nseed: ")[1].split("\n")[0] for r in runs)
    assert seeds == ["1", "2"]
    assert all((r / "metrics.json").is_file() for r in runs)


_SLOW_WRITER = """
import sys, time
from i2e_train.files import atomic_write
def write(fh):
    fh.write(b"first " * 1000)
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
    fh.write(b"done")
atomic_write(sys.argv[1], write)
"""


def test_atomic_write_never_removes_another_live_writers_temporary(tmp_path):
    from i2e_train import files

    target = tmp_path / "metrics.json"
    slow = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target), "3"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert slow.stdout.readline().strip() == "writing"
    files.atomic_write_text(target, "second")  # another writer of the same file, meanwhile
    assert slow.wait(timeout=60) == 0  # its temporary survived: it finished its write
    assert target.read_bytes().endswith(b"done")
    # a temporary of a writer that is gone (same host, dead pid) is removed by the next write
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".metrics.json.tmp-{files._host()}-{int(dead.stdout)}"
    other_host = tmp_path / f".metrics.json.tmp-elsewhere-{int(dead.stdout)}"
    stale.write_text("half")
    other_host.write_text("half")
    files.atomic_write_text(target, "third")
    assert not stale.exists() and other_host.exists()


# --------------------------------------------------------------------------- values and files named
def test_int_tau_becomes_a_float_instead_of_a_spikingjelly_assert():
    from hydra.utils import instantiate

    from i2e_train.config import compose
    from i2e_train.tasks.checks import check_train_config

    cfg = check_train_config(compose("train", ["model.tau=3"]))
    assert cfg.model.tau == 3.0 and isinstance(cfg.model.tau, float)
    model = instantiate(compose("train", ["model.tau=3"]).model)  # the library itself coerces too
    taus = {m.tau for m in model.modules() if hasattr(m, "tau")}
    assert taus == {3.0}


@pytest.mark.parametrize("content, reason", [
    (b"not a checkpoint\n", "not a readable torch checkpoint"),
    (None, "not a readable torch checkpoint"),  # a real checkpoint cut in half
])
def test_text_file_or_truncated_checkpoint_as_ckpt_path_names_the_file(tmp_path, content, reason):
    path = tmp_path / "run.ckpt"
    if content is None:
        torch.save({"state_dict": create_model("ms_resnet_tiny", num_classes=10).state_dict(), "epoch": 1}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    from i2e_train.config import compose
    from i2e_train.tasks.train import train

    with pytest.raises(CheckpointFormatError) as err:
        train(compose("train", [f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'run'}"]))
    assert str(path) in str(err.value) and reason in str(err.value) and "weights_only=False" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_ckpt_path_last_without_the_run_folder_is_an_error(tmp_path):
    from i2e_train.cli._hydra import check_command_line
    from i2e_train.tasks.runs import RunFolderError

    with pytest.raises(RunFolderError, match="does not exist"):
        check_command_line("train", [f"hydra.run.dir={tmp_path / 'typo'}", "ckpt_path=last"])
    with pytest.raises(ValueError, match="hydra.run.dir"):
        check_command_line("train", ["ckpt_path=last"])
    (tmp_path / "started").mkdir()
    with pytest.raises(RunFolderError, match="nothing to resume"):
        check_command_line("train", [f"hydra.run.dir={tmp_path / 'started'}", "ckpt_path=last"])


def test_running_run_folder_is_refused_even_with_overwrite(tmp_path):
    from i2e_train.tasks.runs import RunFolderError, check_run_folder

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / "RUNNING").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        for overwrite in (False, True):
            with pytest.raises(RunFolderError, match=f"pid {sleeper.pid}"):
                check_run_folder(tmp_path, None, overwrite)
    finally:
        sleeper.kill()
        sleeper.wait()
    check_run_folder(tmp_path, None, False)  # its process is gone and it left nothing: usable


def test_convert_bad_ratio_or_out_file_is_refused_before_anything_is_written(tmp_path):
    from i2e_train.convert import ConvertError, convert

    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 200, 30)).save(folder / "a.png")
    with pytest.raises(ConvertError, match="ratio=-1.0: the threshold ratio must be"):
        convert(tmp_path / "images", tmp_path / "out", "MY-I2E", resolution=8, ratio=-1, progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConvertError, match="is a file, not a folder"):
        convert(tmp_path / "images", tmp_path / "afile", "MY-I2E", resolution=8, ratio=0.1, progress=False)
    summary = convert(tmp_path / "images", tmp_path / "out", "MY-I2E", resolution=8, ratio=0.1, progress=False,
                      num_workers=0)
    assert summary.complete  # the corrected command is accepted


# --------------------------------------------------------------------------- eval overrides, names, README forms
def test_eval_overrides_of_the_stored_config_land_at_their_key(tmp_path):
    from omegaconf import OmegaConf

    from i2e_train.config import compose
    from i2e_train.tasks.evaluate import _merge_stored

    stored = OmegaConf.to_container(compose("train", ["paths.output_dir=x"]).copy(), resolve=False)
    stored = {"model": dict(stored["model"], tau=2.0), "data": dict(stored["data"], path="/old/data")}
    overrides = [f"data.path={tmp_path}", "model.tau=3.0", f"ckpt_path={tmp_path / 'a.ckpt'}"]
    cfg = _merge_stored(compose("eval", overrides), stored, overrides)
    assert cfg.data.path == str(tmp_path) and "data" not in cfg.data
    assert cfg.model.tau == 3.0 and "model" not in cfg.model


def test_unknown_experiment_lists_the_nested_ones():
    from i2e_train.cli._hydra import check_command_line

    with pytest.raises(ValueError) as err:
        check_command_line("train", ["experiment=cifar10/baseline"])
    msg = str(err.value)
    assert "'cifar10/baseline1'" in msg and "imagenet/baseline1_r18" in msg and "demo" in msg


def test_readme_pipeline_examples_parse():
    import re
    import shlex

    from i2e_train.config import compose

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [c.split("#")[0] for c in re.findall(r"^(i2e-pipeline [^\n]+)$", readme, re.M)]
    assert commands, "the README shows no i2e-pipeline command"
    for command in commands:
        cfg = compose("pipeline", shlex.split(command)[1:])
        for item in cfg.common_overrides:
            assert "=" in item  # each element is an override of its own
    # the forms the README shows (common_overrides=[trainer=gpu,...]), also with a nested list
    cfg = compose("pipeline", ["common_overrides=[trainer=gpu,paths.i2e=/data/I2E,trainer.devices=[0,1]]"])
    assert list(cfg.common_overrides) == ["trainer=gpu", "paths.i2e=/data/I2E", "trainer.devices=[0,1]"]


# --------------------------------------------------------------------------- data completeness, hub layouts
def _data(root, **kw):
    from test_i2e_dataset import make_parquet

    return make_parquet(root, n=30, shards=3, **kw)


def _setup(root, **kw):
    from i2e_train.data import I2EDataModule

    dm = I2EDataModule(name="I2E-MNIST", path=str(root), data_dir=str(root / "cache"), batch_size=8, num_workers=0,
                       **kw)
    dm.setup()
    return dm


def test_missing_shard_is_named_not_trained_without(tmp_path):
    from i2e_train.data.base import DataFileError

    _data(tmp_path)
    gone = tmp_path / "I2E-MNIST" / "train-00001-of-00003.parquet"
    gone.unlink()
    with pytest.raises(DataFileError, match=f"{gone} is missing"):
        _setup(tmp_path)


def test_missing_validation_split_listed_by_the_card_is_an_error_not_carved(tmp_path):
    from i2e_train.data.base import DatasetUnavailableError

    _data(tmp_path)
    for f in (tmp_path / "I2E-MNIST").glob("validation-*"):
        f.unlink()
    with pytest.raises(DatasetUnavailableError, match=r"'validation'.*missing.*README.md lists it"):
        _setup(tmp_path)
    dm = _setup(tmp_path, val_split=None)  # carving one on purpose
    assert len(dm.datasets["train"]) + len(dm.datasets["validation"]) == 30


def test_missing_split_listed_by_the_convert_manifest_is_an_error(tmp_path):
    from i2e_train.data.base import DatasetUnavailableError

    _data(tmp_path, name="MY-I2E", card=False, splits=("train",))
    (tmp_path / "MY-I2E" / "convert-manifest.json").write_text(json.dumps(
        {"format": 1, "tool": "i2e-convert", "config": "MY-I2E", "params": {},
         "splits": {"train": {"count": 30, "shards": 3, "done": {}}, "validation": {"count": 5, "shards": 1, "done": {}}}}))
    from i2e_train.data import I2EDataModule

    dm = I2EDataModule(name="MY-I2E", path=str(tmp_path), data_dir=str(tmp_path / "c"), num_workers=0,
                       num_classes=10, resolution=[32, 32])
    with pytest.raises(DatasetUnavailableError, match="convert-manifest.json lists it"):
        dm.setup()


def test_changed_file_with_the_same_mtime_is_read_again(tmp_path):
    from test_i2e_dataset import make_parquet

    first = make_parquet(tmp_path / "a", n=8, shards=1, seed=0)
    second = make_parquet(tmp_path / "b", n=8, shards=1, seed=1)
    target = tmp_path / "a" / "I2E-MNIST" / "train-00000-of-00001.parquet"
    dm = _setup(tmp_path / "a")
    before = dm.datasets["train"].table.column("data").to_pylist()
    st = target.stat()
    target.write_bytes((tmp_path / "b" / "I2E-MNIST" / "train-00000-of-00001.parquet").read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime as before
    after = _setup(tmp_path / "a").datasets["train"].table.column("data").to_pylist()
    assert before != after and len(first["train"][0]) == len(second["train"][0])


def test_bit_rotted_parquet_page_names_the_file(tmp_path):
    from i2e_train.data.base import DataFileError

    _data(tmp_path)
    f = tmp_path / "I2E-MNIST" / "train-00002-of-00003.parquet"
    raw = bytearray(f.read_bytes())
    for i in range(100, 400):  # inside the first data page, footer intact
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match=str(f)):
        _setup(tmp_path)


def test_hub_parquet_branch_layout_keeps_train_and_validation_apart(tmp_path):
    """``<config>/<split>/0000.parquet`` (the hub's auto-converted branch): splits from folders."""
    from i2e_train.data.parquet import find_data_files

    _data(tmp_path / "src")
    for split in ("train", "validation"):
        d = tmp_path / "hub" / "I2E-MNIST" / split
        d.mkdir(parents=True)
        for i, f in enumerate(sorted((tmp_path / "src" / "I2E-MNIST").glob(f"{split}-*.parquet"))):
            (d / f"{i:04d}.parquet").write_bytes(f.read_bytes())
    found = find_data_files(tmp_path / "hub", "I2E-MNIST")
    assert sorted(found) == ["train", "validation"] and all(len(v) == 3 for v in found.values())
    dm = _setup(tmp_path / "hub")
    assert len(dm.datasets["train"]) == len(dm.datasets["validation"]) == 30


def test_card_listing_no_files_falls_back_to_the_config_folder(tmp_path):
    from i2e_train.data.parquet import find_data_files

    _data(tmp_path)
    card = tmp_path / "README.md"
    card.write_text(card.read_text().replace("I2E-MNIST/train-", "elsewhere/train-").replace(
        "I2E-MNIST/validation-", "elsewhere/validation-"))
    found = find_data_files(tmp_path, "I2E-MNIST")
    assert sorted(found) == ["train", "validation"] and all(len(v) == 3 for v in found.values())


def test_a_card_pattern_that_climbs_out_of_its_folder_is_refused_naming_it(tmp_path):
    """The dataset card is data: its data_files patterns list files inside its own folder only."""
    from i2e_train.data.base import DataFileError
    from i2e_train.data.parquet import find_data_files

    inside = tmp_path / "data"
    inside.mkdir()
    _data(inside)
    (tmp_path / "elsewhere").mkdir()
    card = inside / "README.md"
    text = card.read_text()
    for bad in ("../elsewhere/train-", str(tmp_path / "elsewhere") + "/train-"):
        card.write_text(text.replace("I2E-MNIST/train-", bad))
        with pytest.raises(DataFileError, match=r"README.md: data_files pattern .* points outside"):
            find_data_files(inside, "I2E-MNIST")


# --------------------------------------------------------------------------- streaming
class _Tiny(__import__("lightning").LightningModule):
    """A linear classifier over the unpacked events [T, B, C, H, W]; records each epoch's labels."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8 * 2 * 32 * 32, 10)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, _):
        events, labels = batch
        self.seen.setdefault(self.current_epoch, []).extend(labels.tolist())
        return torch.nn.functional.cross_entropy(self.fc(events.permute(1, 0, 2, 3, 4).flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_streaming_training_set_is_reshuffled_every_epoch(tmp_path):
    import lightning as L

    from i2e_train.callbacks import StreamEpoch
    from i2e_train.data import I2EDataModule
    from test_i2e_dataset import make_parquet

    make_parquet(tmp_path, n=40, shards=4)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), data_dir=str(tmp_path / "c"), batch_size=8,
                       num_workers=0, streaming=True, shuffle_buffer=16)
    module = _Tiny()
    L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[StreamEpoch()], limit_val_batches=0,
              accelerator="cpu").fit(module, datamodule=dm)
    orders = [module.seen[e] for e in range(3)]
    assert all(sorted(o) == sorted(orders[0]) and len(o) == 40 for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_streaming_under_ddp_is_refused_with_a_clear_message(tmp_path):
    import lightning as L

    from i2e_train.data import I2EDataModule
    from test_i2e_dataset import make_parquet

    make_parquet(tmp_path, n=8, shards=1)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), data_dir=str(tmp_path / "c"), num_workers=0,
                       streaming=True)
    dm.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="data.streaming=true with 2 processes.*data.streaming=false"):
        dm.setup()


@pytest.mark.parametrize("layout", ["names", "indices", "wnids"])
@pytest.mark.parametrize("streaming", [False, True])
def test_label_check_accepts_name_index_and_wnid_folders_and_says_which(tmp_path, caplog, layout, streaming):
    """ClassLabel names are words; file_path folders are the words, the class indices or wnids."""
    import logging

    import numpy as np

    from i2e_train.codec import encode_record
    from i2e_train.data import I2EDataModule
    from i2e_train.data.writer import shard_name, write_card, write_shard

    words = [f"word{c}" for c in range(10)]
    folder = {"names": words, "indices": [str(c) for c in range(10)], "wnids": [f"n0{c:07d}" for c in range(10)]}
    labels = [i % 10 for i in range(20)]
    recs = [encode_record(np.zeros((8, 2, 32, 32), dtype=bool))] * 20
    for split in ("train", "validation"):
        paths = [f"{folder[layout][lab]}/{split}{i}.npy" for i, lab in enumerate(labels)]
        write_shard(tmp_path / "MY" / shard_name(split, 0, 1), paths, labels, recs, words)
    write_card(tmp_path, {"MY": ["train", "validation"]})
    caplog.set_level(logging.INFO)
    dm = I2EDataModule(name="MY", path=str(tmp_path), data_dir=str(tmp_path / "c"), num_workers=0, batch_size=20,
                       num_classes=10, resolution=[32, 32], streaming=streaming)
    dm.setup()
    loader = dm.train_dataloader()
    assert sorted(torch.cat([b[1] for b in loader]).tolist()) == sorted(labels)
    said = {"names": "the label's class name", "indices": "the class index", "wnids": "neither"}[layout]
    assert f"file_path holds {said}" in caplog.text


def test_cifar10dvs_tonic_with_too_few_recordings_for_validation_is_an_error(tmp_path):
    from test_dvs import make_extract
    from test_real_events import _dm

    make_extract(tmp_path, files_per_class=(1,) * 10)  # per class: ceil(0.9 * 1) = 1 train, 0 validation
    dm = _dm("CIFAR10-DVS", tmp_path)
    dm.prepare_data()
    with pytest.raises(ValueError, match="no validation recordings.*train_ratio=0.9.*no metrics"):
        dm.setup()


def test_entry_points_hide_only_the_named_third_party_noise(tmp_path, caplog):
    import logging
    import warnings

    import lightning as L
    from timm.scheduler import CosineLRScheduler

    from i2e_train.cli._hydra import _NOISE_LOGS, _DropKnown, filter_known_noise
    from i2e_train.data import I2EDataModule
    from test_i2e_dataset import make_parquet

    make_parquet(tmp_path, n=8, shards=1)
    dm = I2EDataModule(name="I2E-MNIST", path=str(tmp_path), data_dir=str(tmp_path / "c"), batch_size=8, num_workers=0)
    caplog.set_level(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filter_known_noise()
            L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      accelerator="cpu").fit(_Tiny(), datamodule=dm)
            CosineLRScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), t_initial=1)  # max_epochs=1
            logging.getLogger("timm.scheduler.cosine_lr").warning("another timm warning")
    finally:
        for name in _NOISE_LOGS:
            for f in [f for f in logging.getLogger(name).filters if isinstance(f, _DropKnown)]:
                logging.getLogger(name).removeFilter(f)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "LeafSpec" in m], messages
    assert [m for m in messages if "validation_step" in m], messages  # other warnings still show
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text  # other INFO lines still show
    assert "Cosine annealing scheduler will have no effect" not in caplog.text and "another timm warning" in caplog.text


@pytest.mark.slow
def test_eval_convert_and_pipeline_failures_are_one_error_line(bad, tmp_path):
    """Three entry points at once (in parallel: each start costs the imports)."""
    path, _ = bad
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    (tmp_path / "images" / "cat").mkdir(parents=True)
    runs = {
        "i2e-eval": ["i2e_train.cli.eval", f"ckpt_path={text}"],
        "i2e-convert": ["i2e_train.cli.convert", f"source={tmp_path / 'images'}", f"out={tmp_path / 'out'}",
                        "config=MY", "resolution=8", "ratio=-1"],
        "i2e-pipeline": ["i2e_train.cli.pipeline", "pipeline=demo", f"run_dir={tmp_path / 'pipe'}",
                         f"common_overrides=[debug=fast,init_from={path}]"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=cli_env(tmp_path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    want = {"i2e-eval": [str(text), "not a readable torch checkpoint"],
            "i2e-convert": ["ratio=-1.0: the threshold ratio must be"],
            "i2e-pipeline": [str(path), "refused"]}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"{name}: error: ") and all(w in last for w in want[name]), (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
    assert not (tmp_path / "out").exists()


def test_overwrite_true_replaces_a_finished_run_and_nothing_else_does(tmp_path):
    from omegaconf import OmegaConf

    from i2e_train.tasks.runs import MARKER, RunFolderError, check_run_folder
    from i2e_train.tasks.train import _claim_folder

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch003.ckpt").write_bytes(b"old")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="already holds checkpoints"):
        check_run_folder(tmp_path, None, False)
    check_run_folder(tmp_path, None, True)
    _claim_folder(OmegaConf.create({"overwrite": True, "ckpt_path": None}), tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [MARKER, "notes.txt"]


def test_released_weight_is_found_by_stem_and_checked_against_its_download(tmp_path, monkeypatch):
    from i2e_train.models import hub
    from i2e_train.models.errors import ReleasedWeightsUnavailable

    downloads = []

    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **kw):
        downloads.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights")
        return str(target)

    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "list_repo_files", lambda repo_id, **kw: ["README.md", "w/cifar10_baseline.pth",
                                                                       "w/cifar10_baseline_old.pth.tar"])
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    path = hub.resolve_released("cifar10_baseline", cache_dir=tmp_path)  # the card's .pth, not another stem
    assert path == tmp_path / "w" / "cifar10_baseline.pth" and downloads == ["w/cifar10_baseline.pth"]
    index = json.loads((tmp_path / "released.json").read_text())["cifar10_baseline"]
    assert index["size"] == 7 and len(index["sha256"]) == 64
    assert hub.resolve_released("cifar10_baseline", cache_dir=tmp_path) == path and len(downloads) == 1
    path.write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(ReleasedWeightsUnavailable, match="changed since it was downloaded"):
        hub.resolve_released("cifar10_baseline", cache_dir=tmp_path)


def test_disk_full_names_the_file_and_keeps_what_was_there(tmp_path):
    """A write that fails without a file name (ENOSPC from write()) is re-raised naming the path;
    the earlier file stays and no temporary is left behind."""
    import errno

    from i2e_train.files import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "metrics.json", "{}\n")

    def full(fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device while writing .*metrics\.json.*free space") as info:
        atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
