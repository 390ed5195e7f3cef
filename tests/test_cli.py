"""Config composition, the demo end to end (train -> checkpoint -> eval) and the wheel's configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from helpers import run_cli, train_in_process
from i2e_train import config_dir
from i2e_train.config import compose

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_default_train_config_is_the_demo():
    cfg = compose("train")
    assert cfg.data.name == "I2E-Digits" and cfg.model.name == "ms_resnet_tiny"
    assert cfg.model.num_classes == cfg.data.num_classes == cfg.module.num_classes == 10
    assert cfg.scheduler.t_initial == cfg.trainer.max_epochs
    assert cfg.optim._partial_ and cfg.scheduler._partial_


@pytest.mark.parametrize("name", ["train", "eval"])
def test_every_model_config_composes(name):
    for model in sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")):
        cfg = compose(name, [f"model={model}"])
        assert cfg.model.name == model


def test_unknown_config_name_is_named():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="no_such_model"):
        compose("train", ["model=no_such_model"])


def test_demo_fast_dev_run(tmp_path, monkeypatch):
    """The default config in-process: the digits are built on first use, one batch trains."""
    result, run = train_in_process(tmp_path, monkeypatch, "debug=fast", "~logger")
    built = tmp_path / "data" / "i2e-digits" / "I2E-Digits"
    assert sorted(p.name for p in built.glob("*.parquet")) == ["train-00000-of-00001.parquet",
                                                                "validation-00000-of-00001.parquet"]
    fit = result["fit"]
    assert 0 < fit["train/loss_step"] < 10 and 0 <= fit["val/top1"] <= 1, fit
    assert len(result["init_digest"]) == 64 and result["best_checkpoint"] == ""  # fast_dev_run: no checkpoint
    assert json.loads((run / "metrics.json").read_text())["fit"] == fit


@pytest.mark.slow
def test_train_checkpoint_then_eval_reproduces_validation_top1(tmp_path):
    run_cli("i2e_train.cli.train", "trainer.max_epochs=1", "+trainer.limit_train_batches=15", cwd=tmp_path)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    trained = json.loads((run / "metrics.json").read_text())
    ckpt = Path(trained["best_checkpoint"])
    assert ckpt.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # shareable export of the best weights: safetensors + model card
    import torch

    from i2e_train.models import create_model, load_checkpoint

    card = json.loads((run / "model_card.json").read_text())
    assert card["architecture"] == "ms_resnet_tiny" and card["num_classes"] == 10 and card["timesteps"] == 8
    assert card["converter_ratio"] == 0.10 and card["converter_order"] == 4 and card["data"] == "I2E-Digits"
    assert card["metrics"]["val/top1"] == trained["best"]["val/top1"] and (run / "MODEL_CARD.md").is_file()
    a, b = create_model("ms_resnet_tiny", num_classes=10), create_model("ms_resnet_tiny", num_classes=10)
    load_checkpoint(a, str(run / "model.safetensors"))
    load_checkpoint(b, str(ckpt))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    run_cli("i2e_train.cli.eval", "ckpt_path=latest", cwd=tmp_path)
    (erun,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    evaluated = json.loads((erun / "metrics.json").read_text())
    assert evaluated["val/top1"] == pytest.approx(trained["best"]["val/top1"], abs=1e-6)
    assert evaluated["checkpoint"] == str(ckpt) or Path(evaluated["checkpoint"]).resolve() == ckpt.resolve()
    cm = json.loads((erun / "confusion_matrix.json").read_text())
    assert sum(map(sum, cm)) == 360
    assert (erun / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.slow
def test_wheel_ships_configs_and_composes_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "i2e_train/configs/train.yaml" in names and "i2e_train/configs/model/ms_resnet18.yaml" in names
    # A fresh venv that sees the dependencies (not the repo) and gets only the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")  # a .pth line adds a path, not its .pth files
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=300)
    code = (
        "import i2e_train, pathlib; from i2e_train.config import compose; "
        "d = i2e_train.config_dir(); assert 'site-packages' in str(d), d; "
        "assert str(d).startswith(%r), d; "
        "cfg = compose('train', ['model=ms_resnet18']); print(cfg.model.name, cfg.data.name)" % str(venv)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the wheel may provide i2e_train
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ms_resnet18", "I2E-Digits"]


def test_every_data_config_matches_the_catalog():
    from hydra.utils import instantiate

    from i2e_train.data.catalog import CATALOG

    names = set()
    for data in sorted(p.stem for p in (config_dir() / "data").glob("*.yaml")):
        cfg = compose("train", [f"data={data}", "paths.output_dir=unused"])
        if not cfg.data._target_.endswith("I2EDataModule"):
            continue
        dm = instantiate(cfg.data)  # the constructor checks classes / resolution / T against the catalog
        assert dm.info.ratio is not None and dm.num_classes == cfg.model.num_classes
        names.add(dm.info.name)
    assert {n for n, i in CATALOG.items() if i.kind != "dvs"} <= names
