"""Experiment tracking: SpikeStats numbers against a hand computation, the wandb offline run of a
demo training (config, metrics, media, spike rates on disk) and the same wandb run id on resume."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, neuron
from torch import nn
from torch.nn import functional as F

from helpers import cli_env, run_cli
from i2e_train.callbacks import SpikeStats

FAST = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]


# --------------------------------------------------------------------------- SpikeStats
class _Tiny(nn.Module):
    """events [T, B, 2, 4, 4] -> conv 3x3 -> LIF -> linear 48->5 -> LIF -> linear 5->2 -> mean over T."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.sn1 = neuron.LIFNode(tau=2.0, v_threshold=1.0, v_reset=0.0, step_mode="m")
        self.fc = nn.Linear(48, 5, bias=False)
        self.sn2 = neuron.LIFNode(tau=2.0, v_threshold=1.0, v_reset=0.0, step_mode="m")
        self.head = nn.Linear(5, 2)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv1.weight.copy_(torch.rand(self.conv1.weight.shape, generator=g) * 0.6)
            self.fc.weight.copy_(torch.rand(self.fc.weight.shape, generator=g) * 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        t, b = x.shape[:2]
        s1 = self.sn1(self.conv1(x.flatten(0, 1)).reshape(t, b, 3, 4, 4))
        s2 = self.sn2(self.fc(s1.flatten(2)))
        out = self.head(s2).mean(0)
        functional.reset_net(self)
        return out


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Tiny()
        self.train_hooks_seen: list[int] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.train_hooks_seen.append(sum(len(m._forward_hooks) for m in self.model.modules()))
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]), batch_size=batch[1].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _lif(x: torch.Tensor, tau: float = 2.0, v_th: float = 1.0) -> torch.Tensor:
    """LIF by hand (decay_input, hard reset to 0): H = V + (X - V) / tau; S = H >= v_th; V = H (1 - S)."""
    v = torch.zeros_like(x[0])
    out = []
    for xt in x:
        h = v + (xt - v) / tau
        s = (h >= v_th).float()
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out)


def _batches(scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    return [((torch.rand(4, b, 2, 4, 4, generator=g) < 0.4).float() * scale, torch.randint(0, 2, (b,), generator=g))
            for b in (3, 2)]  # T = 4; batches of 3 and 2 samples


def _expected(model: _Tiny, batches) -> dict:
    spikes = {"x": 0.0, "sn1": 0.0, "sn2": 0.0}
    numel = {"x": 0, "sn1": 0, "sn2": 0}
    with torch.no_grad():
        for x, _ in batches:
            t, b = x.shape[:2]
            s1 = _lif(F.conv2d(x.flatten(0, 1), model.conv1.weight, padding=1).reshape(t, b, 3, 4, 4))
            s2 = _lif(s1.flatten(2) @ model.fc.weight.T)
            for k, v in (("x", x), ("sn1", s1), ("sn2", s2)):
                spikes[k] += float(v.sum())
                numel[k] += v.numel()
    rate = {k: spikes[k] / numel[k] for k in spikes}
    t = batches[0][0].shape[0]
    macs = {"conv1": 3 * 4 * 4 * 2 * 3 * 3, "fc": 48 * 5, "head": 5 * 2}  # per sample and time step
    sops = {"conv1": rate["x"] * macs["conv1"] * t, "fc": rate["sn1"] * macs["fc"] * t,
            "head": rate["sn2"] * macs["head"] * t}
    return {"rate": rate, "macs": macs, "sops": sops, "t": t,
            "mean": (spikes["sn1"] + spikes["sn2"]) / (numel["sn1"] + numel["sn2"])}


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)  # yields the ready-made batches


def _trainer(tmp_path, cb, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[cb], enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def test_spike_stats_match_rates_and_sops_computed_by_hand(tmp_path):
    module, batches = _Module(), _batches()
    exp = _expected(module.model, batches)
    assert 0.05 < exp["rate"]["sn1"] < 0.95 and 0.05 < exp["rate"]["sn2"] < 0.95  # a meaningful case
    cb = SpikeStats(output_dir=tmp_path / "run")
    trainer = _trainer(tmp_path, cb, max_epochs=1, num_sanity_val_steps=2)
    trainer.fit(module, train_dataloaders=_loader(batches[:1]), val_dataloaders=_loader(batches))

    assert module.train_hooks_seen == [0]  # no hook during training steps
    assert all(not m._forward_hooks for m in module.modules())  # removed after validation
    stats = json.loads((tmp_path / "run" / "spike_stats.json").read_text())
    assert stats["samples"] == 5 and stats["timesteps"] == 4  # the sanity check is not counted
    layers = {layer["name"]: layer for layer in stats["layers"]}
    assert list(layers) == ["sn1", "sn2"]
    for name in ("sn1", "sn2"):
        assert layers[name]["rate"] == pytest.approx(exp["rate"][name], rel=1e-9)
        assert float(trainer.callback_metrics[f"spikes/{name}"]) == pytest.approx(exp["rate"][name], rel=1e-6)
    assert stats["mean_rate"] == pytest.approx(exp["mean"], rel=1e-9)
    syn = {s["name"]: s for s in stats["synapses"]}
    assert syn["conv1"]["input_from"] == ["input"] and syn["fc"]["input_from"] == ["sn1"]
    assert syn["head"]["input_from"] == ["sn2"]
    for name in ("conv1", "fc", "head"):
        assert syn[name]["spiking_input"] is True
        assert syn[name]["macs_per_sample_step"] == pytest.approx(exp["macs"][name])
        assert syn[name]["sops_per_sample"] == pytest.approx(exp["sops"][name], rel=1e-9)
    assert stats["sops_per_sample"] == pytest.approx(sum(exp["sops"].values()), rel=1e-9)
    assert stats["dense_macs_per_sample"] == 0.0
    assert float(trainer.callback_metrics["spikes/mean_rate"]) == pytest.approx(exp["mean"], rel=1e-6)
    assert float(trainer.callback_metrics["spikes/sops_per_sample"]) == pytest.approx(stats["sops_per_sample"],
                                                                                      rel=1e-6)
    assert (tmp_path / "run" / "spike_rates.png").stat().st_size > 1000


def test_spike_stats_count_non_binary_input_as_dense_macs(tmp_path):
    module, batches = _Module(), _batches(scale=0.5)  # graded input: the first layer does MACs
    exp = _expected(module.model, batches)
    cb = SpikeStats(output_dir=tmp_path, plot=False)
    _trainer(tmp_path, cb).validate(module, dataloaders=_loader(batches), verbose=False)
    syn = {s["name"]: s for s in cb.last["synapses"]}
    assert syn["conv1"]["spiking_input"] is False and syn["conv1"]["sops_per_sample"] == 0.0
    assert cb.last["dense_macs_per_sample"] == pytest.approx(exp["macs"]["conv1"] * exp["t"])
    assert cb.last["sops_per_sample"] == pytest.approx(exp["sops"]["fc"] + exp["sops"]["head"], rel=1e-9)
    assert not any(m._forward_hooks for m in module.modules())


# --------------------------------------------------------------------------- logger configs
@pytest.mark.parametrize("choice,expected", [
    ("csv", ["CSVLogger"]), ("tensorboard", ["TensorBoardLogger"]), ("[csv,tensorboard]", ["CSVLogger", "TensorBoardLogger"]),
    ("wandb", ["WandbLogger"]), ("many", ["CSVLogger", "TensorBoardLogger", "WandbLogger"]),
])
def test_logger_choices_compose_and_instantiate(tmp_path, monkeypatch, choice, expected):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from i2e_train.config import compose

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    GlobalHydra.instance().clear()
    cfg = compose("train", [f"logger={choice}", f"paths.output_dir={tmp_path}", "++wandb_group=g"])
    GlobalHydra.instance().clear()
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert [type(lg).__name__ for lg in loggers] == expected
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            run_id = (tmp_path / "wandb_id.txt").read_text().strip()
            init = lg._wandb_init
            assert init["id"] == run_id and init["resume"] == "allow" and init["project"] == "i2e-train"
            assert init["name"] == f"train-{run_id}" and init["group"] == "g" and init["tags"] == ["demo"]
            assert lg._offline and not lg._log_model and init["dir"] == str(tmp_path)


def test_wandb_run_id_is_saved_reused_and_yields_to_a_sweep_agent(tmp_path, monkeypatch):
    from i2e_train.tracking import wandb_run_id

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run_id(tmp_path)
    assert len(first) == 8 and (tmp_path / "wandb_id.txt").read_text().strip() == first
    assert wandb_run_id(tmp_path) == first  # a resumed run in the same folder
    monkeypatch.setenv("WANDB_RUN_ID", "agent123")  # set by `wandb agent`
    assert wandb_run_id(tmp_path) == "agent123" and (tmp_path / "wandb_id.txt").read_text().strip() == "agent123"
    assert wandb_run_id(tmp_path, id="forced") == "forced"


def test_a_new_wandb_logger_closes_the_run_left_open_by_an_earlier_job(tmp_path, monkeypatch):
    """Pipeline stages / multirun jobs share a process: each must get its own wandb run."""
    from i2e_train.tracking import finish_wandb, wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    try:
        first = wandb_logger(tmp_path / "a", name="stage").experiment
        second = wandb_logger(tmp_path / "b", name="stage").experiment
        assert first.id != second.id
        assert second.id == (tmp_path / "b" / "wandb_id.txt").read_text().strip()
    finally:
        finish_wandb()
    assert list((tmp_path / "a" / "wandb").glob(f"offline-run-*-{first.id}"))
    assert list((tmp_path / "b" / "wandb").glob(f"offline-run-*-{second.id}"))


def test_csv_logger_keeps_the_rows_of_an_earlier_run_in_the_same_folder(tmp_path):
    from i2e_train.tracking import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"epoch": 0, "val/top1": 0.5}, step=0)
    first.save()
    second = CSVLogger(tmp_path, name="csv", version="")  # a resumed run
    second.log_metrics({"epoch": 1, "val/top1": 0.75, "val/loss": 1.0}, step=1)
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["val/top1"], r["val/loss"]) for r in rows] == [("0", "0.5", ""), ("1", "0.75", "1.0")]


# --------------------------------------------------------------------------- wandb offline
def read_wandb_records(path: Path) -> list:
    """Records of a ``run-<id>.wandb`` file (wandb's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    block, pos, chunks, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + n], pos + n
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            chunks.append(buf + chunk)
        elif kind == 0 and n == 0:
            break
    return [pb.Record.FromString(c) for c in chunks]


def _wandb_content(run_file: Path) -> dict:
    recs = read_wandb_records(run_file)
    out: dict = {"config": {}, "history": [], "run": None}
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {}
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from i2e_train.data.digits import build_digits

    root = tmp_path_factory.mktemp("data")
    build_digits(root / "i2e-digits")
    return root


def _train(args, cwd: Path, data_dir: Path):
    env = cli_env(cwd, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(cwd / ".wandb-config"),
                  WANDB_CACHE_DIR=str(cwd / ".wandb-cache"), WANDB_DATA_DIR=str(cwd / ".wandb-data"))
    env.pop("WANDB_RUN_ID", None)
    return run_cli("i2e_train.cli.train", f"paths.data_dir={data_dir}", *args, cwd=cwd, env=env)


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_media_and_resume_keeps_the_run_id(tmp_path, data_dir):
    run = tmp_path / "run"
    _train(["experiment=demo", "logger=many", f"hydra.run.dir={run}", *FAST], tmp_path, data_dir)

    run_id = (run / "wandb_id.txt").read_text().strip()
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert offline.name.endswith(f"-{run_id}")
    content = _wandb_content(offline / f"run-{run_id}.wandb")
    assert content["run"].run_id == run_id and content["run"].display_name == f"train-{run_id}"
    assert content["run"].project == "i2e-train" and list(content["run"].tags) == ["demo", "digits"]
    assert content["run"].run_group == "demo"  # the experiment name
    cfg = content["config"]
    assert cfg["data"]["name"] == "I2E-Digits" and cfg["model"]["name"] == "ms_resnet_tiny"
    assert cfg["params"]["total"] > 0 and cfg["params"]["trainable"] == cfg["params"]["total"]
    assert {"cpu", "gpus", "torch", "cuda"} <= set(cfg["hardware"])
    keys = set().union(*content["history"])
    assert {"val/top1", "val/loss", "train/loss_epoch", "spikes/mean_rate", "spikes/sops_per_sample",
            "spikes/layer1.0.sn1", "media/val_events/_type", "media/confusion_matrix/_type"} <= keys
    rates = [row["spikes/mean_rate"] for row in content["history"] if "spikes/mean_rate" in row]
    stats = json.loads((run / "spike_stats.json").read_text())
    assert 0 < rates[-1] < 1 and rates[-1] == pytest.approx(stats["mean_rate"], rel=1e-5)
    media = offline / "files" / "media"
    gifs = list((media / "videos").rglob("val_events_*.gif"))
    assert len(gifs) >= 4 and all(g.read_bytes()[:6] in (b"GIF89a", b"GIF87a") for g in gifs)
    assert list((media / "images").rglob("confusion_matrix_*.png"))
    for name in ("spike_rates.png", "learning_curves.png", "spike_stats.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert (run / "csv" / "metrics.csv").is_file() and list((run / "tensorboard").glob("events.out.tfevents.*"))

    # resume in the same folder: same wandb run id, a second offline segment of that run
    _train(["experiment=demo", "logger=many", f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_epochs=2",
            *FAST[1:]], tmp_path, data_dir)
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{run_id}") for s in segments)
    resumed = _wandb_content(segments[1] / f"run-{run_id}.wandb")
    assert resumed["run"].run_id == run_id
    assert any(row.get("epoch") == 1 and "val/top1" in row for row in resumed["history"])
    with open(run / "csv" / "metrics.csv", newline="") as f:
        epochs = {int(float(row["epoch"])) for row in csv.DictReader(f) if row.get("epoch")}
    assert {0, 1} <= epochs  # the CSV log keeps the epochs before the checkpoint
