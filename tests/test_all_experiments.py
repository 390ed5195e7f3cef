"""`i2e-train -m 'experiment=glob(*)'` runs every experiment on tiny data made here (the N-MNIST /
N-Caltech101 recipes as the two stages of their pipelines).

One multirun, the same overrides for every job: dataset locations (paths.*), a batch of 2, one
training and one validation batch (debug=fast), CPU. The transfer rows start from released
weights, which are stood in for by official-format files built from our own models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from i2e_train.config import group_options
from i2e_train.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from test_dvs import make_extract  # noqa: E402  (synthetic AEDAT recordings)

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _img(rng, size):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def hub_copy(root: Path, names: list[str], rng, label_column="label"):
    import datasets

    feats = datasets.Features({"img": datasets.Image(), label_column: datasets.ClassLabel(names=names)})
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict(
            {"img": [_img(rng, 32) for _ in range(4)], label_column: [0, 1, 2, 3]}, features=feats)
        root.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))


def image_folder(root: Path, classes: int, rng):
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            _img(rng, 40).save(d / "0.png")


def released(ckpt_dir: Path, name: str, model: str, classes: int):
    net = create_model(model, num_classes=classes)
    state = {"module." + k: v for k, v in net.state_dict().items()}
    state["module.i2e.weight"] = torch.zeros(8, 1, 3, 3)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "state_dict": state, "best_acc1": 0.0}, ckpt_dir / f"{name}.pth.tar")


@pytest.mark.slow
def test_every_experiment_runs_with_fast_dev_run(tmp_path):
    rng = np.random.default_rng(0)
    hub_copy(tmp_path / "cifar10", CIFAR10, rng)
    hub_copy(tmp_path / "cifar100", [f"c{i:03d}" for i in range(100)], rng, label_column="fine_label")
    image_folder(tmp_path / "imagenet", 1000, rng)
    make_extract(tmp_path / "cifar10dvs", files_per_class=(10,) * 10)
    released(tmp_path / "checkpoints", "imagenet_augmentation_18", "ms_resnet18", 1000)
    released(tmp_path / "checkpoints", "cifar10_augmentation", "ms_resnet18", 10)
    # The N-MNIST / N-Caltech101 recipes run end to end, both stages, in the pipeline test below.
    overrides = [
        "experiment=glob(*,exclude=[nmnist/*,ncaltech101/*])", "debug=fast", "~logger", "data.batch_size=2", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.devices=1", "++trainer.strategy=auto", "trainer.precision=32-true",
        f"paths.cifar10={tmp_path / 'cifar10'}", f"paths.cifar100={tmp_path / 'cifar100'}",
        f"paths.imagenet={tmp_path / 'imagenet'}", f"paths.cifar10dvs={tmp_path / 'cifar10dvs'}",
    ]
    proc = run_cli("i2e_train.cli.train", "-m", *overrides, cwd=tmp_path, timeout=1800)
    launched = [line for line in proc.stdout.splitlines() if "experiment=" in line and "#" in line]
    sim2real = [n for n in group_options("experiment") if n.split("/")[0] in ("nmnist", "ncaltech101")]
    assert len(launched) == len(group_options("experiment")) - len(sim2real) == 14, proc.stdout[-3000:]
    # a failing job of a multirun writes error.txt and the sweep goes on: every job must have its metrics
    jobs = sorted(p for p in (tmp_path / "logs" / "train" / "multiruns").glob("*/*") if (p / ".hydra").is_dir())
    assert len(jobs) == 14, jobs
    failed = {j.name: (j / "error.txt").read_text()[-1500:] for j in jobs if (j / "error.txt").exists()}
    assert not failed, failed
    assert all((j / "metrics.json").is_file() for j in jobs), [j.name for j in jobs if not (j / "metrics.json").exists()]


@pytest.mark.slow
def test_sim2real_pipeline_end_to_end_on_tiny_data(tmp_path):
    """pipeline=sim2real: I2E-CIFAR10 Baseline-II pre-training, then CIFAR10-DVS fine-tuning from it."""
    import json

    from i2e_train.models import state_digest

    rng = np.random.default_rng(1)
    hub_copy(tmp_path / "cifar10", CIFAR10, rng)
    make_extract(tmp_path / "cifar10dvs", files_per_class=(10,) * 10)
    common = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
              "data.batch_size=2", "data.num_workers=0", "trainer.precision=32-true", "~logger",
              f"paths.cifar10={tmp_path / 'cifar10'}", f"paths.cifar10dvs={tmp_path / 'cifar10dvs'}"]
    arg = "common_overrides=[" + ",".join(f"'{o}'" for o in common) + "]"
    run_cli("i2e_train.cli.pipeline", "pipeline=sim2real", arg, cwd=tmp_path, timeout=1800)
    manifest = json.loads((tmp_path / "logs" / "pipeline" / "sim2real" / "pipeline.json").read_text())
    pre, fine = manifest["stages"]["pretrain"], manifest["stages"]["finetune"]
    assert "experiment=cifar10/baseline2" in pre["overrides"] and "experiment=cifar10dvs/transfer2" in fine["overrides"]
    assert fine["init_from"] == pre["best_checkpoint"]
    ckpt = torch.load(pre["best_checkpoint"], map_location="cpu", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert fine["init_digest"] == state_digest(weights)


def released_i2e_copy(root: Path) -> None:
    """A local copy of the released I2E-MNIST (32x32, 10 classes) and I2E-Caltech101 (224x224, 101 classes)
    configs, a few records each (paths.i2e)."""
    from test_i2e_dataset import make_parquet
    from i2e_train.data.writer import write_card

    make_parquet(root, "I2E-MNIST", n=20, classes=10, shape=(8, 2, 32, 32), shards=1, card=False)
    make_parquet(root, "I2E-Caltech101", n=6, classes=101, shape=(8, 2, 224, 224), shards=1, card=False)
    write_card(root, {"I2E-MNIST": ["train", "validation"], "I2E-Caltech101": ["train", "validation"]})


def sim2real_recordings(root: Path) -> None:
    """Tiny N-MNIST and N-Caltech101 in their real ATIS format under paths.nmnist / paths.ncaltech101."""
    from test_real_events import NCALTECH_FOLDERS, make_ncaltech, make_nmnist

    make_nmnist(root / "nmnist", train=2, test=1)
    make_ncaltech(root / "ncaltech101", NCALTECH_FOLDERS, per_class=2)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline, target", [("mnist2nmnist", "nmnist"), ("caltech2ncaltech", "ncaltech101")])
def test_tonic_sim2real_pipelines_end_to_end_on_tiny_data(tmp_path, pipeline, target):
    """I2E twin pre-training (released-data DataModule, local copy), then fine-tuning on recordings in the
    real format read through tonic, from stage 1's best weights with the same head."""
    import json

    from i2e_train.models import state_digest

    released_i2e_copy(tmp_path / "i2e")
    sim2real_recordings(tmp_path)
    common = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
              "data.batch_size=2", "data.num_workers=0", "trainer.precision=32-true", "~logger",
              "model=ms_resnet_tiny",  # the mechanics, not MS-ResNet18's speed at 224x224 on a CPU
              f"paths.i2e={tmp_path / 'i2e'}", f"paths.{target}={tmp_path / target}"]
    arg = "common_overrides=[" + ",".join(f"'{o}'" for o in common) + "]"
    run_cli("i2e_train.cli.pipeline", f"pipeline={pipeline}", arg, cwd=tmp_path, timeout=1800)
    manifest = json.loads((tmp_path / "logs" / "pipeline" / pipeline / "pipeline.json").read_text())
    pre, fine = manifest["stages"]["pretrain"], manifest["stages"]["finetune"]
    assert f"experiment={target}/pretrain" in pre["overrides"] and f"experiment={target}/transfer" in fine["overrides"]
    assert fine["init_from"] == pre["best_checkpoint"] and "replace_head=false" in fine["overrides"]
    ckpt = torch.load(pre["best_checkpoint"], map_location="cpu", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert fine["init_digest"] == state_digest(weights)
    assert (tmp_path / target / "tonic_frames").is_dir() and "val/top1" in fine["metrics"]
