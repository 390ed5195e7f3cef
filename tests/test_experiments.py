"""Every paper-table experiment composes to the official recipe (REFERENCE sections 4-5)."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra

from i2e_train.config import compose, group_options

C = dict(batch=128, lr=0.1, lr_min=5e-5, wd=2e-4, epochs=256, ratio=0.07, res=128, ls=0.1, precision="16-mixed")
I = dict(batch=128, lr=0.1, lr_min=5e-5, wd=1e-5, epochs=128, ratio=0.12, res=224, ls=0.1, precision="16-mixed",
         classes=1000)
D = dict(batch=32, lr=5e-4, lr_min=0.0, wd=0.0, epochs=128, ratio=None, res=128, ls=0.1, precision="16-mixed",
         classes=10, model="ms_resnet18", aug=None)

# experiment -> recipe (written from the reference, not from the config files)
RECIPES = {
    "cifar10/baseline1": dict(C, classes=10, model="ms_resnet18", aug="baseline1", init=None, top1=85.07),
    "cifar10/baseline2": dict(C, classes=10, model="ms_resnet18", aug="baseline2", init=None, top1=89.23),
    "cifar10/transfer1": dict(C, classes=10, model="ms_resnet18", aug="baseline2",
                              init="released:imagenet_augmentation_18", head=True, top1=90.86),
    "cifar100/baseline1": dict(C, classes=100, model="ms_resnet18", aug="baseline1", init=None, top1=51.32),
    "cifar100/baseline2": dict(C, classes=100, model="ms_resnet18", aug="baseline2", init=None, top1=60.68),
    "cifar100/transfer1": dict(C, classes=100, model="ms_resnet18", aug="baseline2",
                               init="released:imagenet_augmentation_18", head=True, top1=64.53),
    "imagenet/baseline1_r18": dict(I, model="ms_resnet18", aug="baseline1", init=None, top1=48.30),
    "imagenet/baseline2_r18": dict(I, model="ms_resnet18", aug="baseline2", init=None, top1=57.97),
    "imagenet/transfer1_r18": dict(I, model="ms_resnet18", aug="baseline2", init="released:imagenet_augmentation_18",
                                   top1=59.28),
    "imagenet/baseline2_r34": dict(I, model="ms_resnet34", aug="baseline2", init=None, top1=60.50),
    "cifar10dvs/baseline": dict(D, init=None, top1=65.6),
    "cifar10dvs/transfer1": dict(D, init="released:imagenet_augmentation_18", head=True, top1=83.1),
    "cifar10dvs/transfer2": dict(D, init="released:cifar10_augmentation", head=False, top1=92.5),
}


# Sim-to-real recipes beyond the paper (no paper row): I2E pre-training on a twin's released events,
# then the CIFAR10-DVS fine-tuning recipe (D) on its real recordings read through tonic.
P32 = dict(C, res=32, classes=10, data="I2E-MNIST", aug=None)  # the I2E-CIFAR optimiser recipe
P224 = dict(I, classes=101, data="I2E-Caltech101", aug=None)  # the I2E-ImageNet optimiser recipe
SIM2REAL = {
    "nmnist/pretrain": dict(P32, model="ms_resnet18", init=None),
    "nmnist/baseline": dict(D, res=32, data="N-MNIST", init=None),
    "nmnist/transfer": dict(D, res=32, data="N-MNIST", head=False,
                            init="./logs/pipeline/mnist2nmnist/pretrain/model.safetensors"),
    "ncaltech101/pretrain": dict(P224, model="ms_resnet18", init=None),
    "ncaltech101/baseline": dict(D, res=224, classes=101, data="N-Caltech101", init=None),
    "ncaltech101/transfer": dict(D, res=224, classes=101, data="N-Caltech101", head=False,
                                 init="./logs/pipeline/caltech2ncaltech/pretrain/model.safetensors"),
}


@pytest.fixture(autouse=True)
def _clear():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_one_experiment_per_table_row():
    assert sorted({**RECIPES, **SIM2REAL}) == sorted(n for n in group_options("experiment") if n != "demo")


@pytest.mark.parametrize("name", sorted(SIM2REAL))
def test_sim2real_experiment_matches_recipe(name):
    r = SIM2REAL[name]
    cfg = compose("train", [f"experiment={name}", "paths.output_dir=unused", "paths.root_dir=."])
    assert cfg.data.name == r["data"] and cfg.model.name == r["model"] and cfg.seed == 2024
    assert cfg.data.num_classes == cfg.model.num_classes == cfg.module.num_classes == r["classes"]
    assert list(cfg.data.resolution) == [r["res"], r["res"]] and cfg.data.timesteps == 8
    assert cfg.data.batch_size == r["batch"] and cfg.data.augment is r["aug"]
    assert cfg.optim.opt == "sgd" and cfg.optim.lr == pytest.approx(r["lr"]) and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == pytest.approx(r["wd"])
    assert cfg.scheduler.lr_min == pytest.approx(r["lr_min"]) and cfg.scheduler.warmup_t == 0
    assert cfg.trainer.max_epochs == cfg.scheduler.t_initial == r["epochs"]
    assert cfg.module.label_smoothing == r["ls"] and cfg.trainer.precision == r["precision"]
    assert cfg.init_from == r["init"] and bool(cfg.replace_head) == r.get("head", False)
    assert cfg.paper_top1 is None and "sim2real" in cfg.tags
    if r["data"].startswith("I2E-"):
        assert cfg.data.path is None  # paths.i2e: the hub unless a local copy is given
    else:
        assert cfg.data.split == ("official" if r["data"] == "N-MNIST" else "stratified")
        assert cfg.data.spatial == ("crop" if r["data"] == "N-MNIST" else "area")


@pytest.mark.parametrize("pipeline, target", [("mnist2nmnist", "nmnist"), ("caltech2ncaltech", "ncaltech101")])
def test_sim2real_pipelines_pretrain_on_the_twin_then_fine_tune(pipeline, target):
    cfg = compose("pipeline", [f"pipeline={pipeline}"])
    stages = cfg.pipeline.stages
    assert list(stages) == ["pretrain", "finetune"] and cfg.pipeline.name == pipeline
    assert list(stages.pretrain.overrides) == [f"experiment={target}/pretrain"]
    assert list(stages.finetune.overrides) == [f"experiment={target}/transfer"]
    assert stages.finetune.init_from == "pretrain" and stages.finetune.replace_head is False


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_experiment_matches_recipe(name):
    r = RECIPES[name]
    cfg = compose("train", [f"experiment={name}", "paths.output_dir=unused"])
    assert cfg.model.name == r["model"]
    assert cfg.data.num_classes == cfg.model.num_classes == cfg.module.num_classes == r["classes"]
    assert list(cfg.data.resolution) == [r["res"], r["res"]] and cfg.data.timesteps == 8
    assert cfg.data.batch_size == r["batch"]
    assert cfg.optim.opt == "sgd" and cfg.optim.lr == pytest.approx(r["lr"]) and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == pytest.approx(r["wd"])
    assert cfg.scheduler.lr_min == pytest.approx(r["lr_min"]) and cfg.scheduler.warmup_t == 0
    assert cfg.trainer.max_epochs == cfg.scheduler.t_initial == r["epochs"]
    assert cfg.module.label_smoothing == r["ls"]
    assert cfg.trainer.precision == r["precision"]
    assert cfg.seed == 2024
    assert cfg.init_from == r["init"]
    if r["init"]:
        assert bool(cfg.replace_head) == r.get("head", False)
    assert cfg.paper_top1 == pytest.approx(r["top1"])
    if r["ratio"] is not None:
        assert cfg.data.encoder.ratio == pytest.approx(r["ratio"]) and cfg.data.encoder.order == 4
        assert cfg.data.encoder.random_directions is True and cfg.data.encoder.threshold == "dynamic"
        assert cfg.data.train_aug == r["aug"]
    else:
        assert cfg.data.frames_number == 8 and cfg.data.split_by == "number" and cfg.data.train_ratio == 0.9
        assert cfg.data.augment is None
    if name.startswith("imagenet/"):
        assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp"


def test_ablations_are_overrides():
    cfg = compose("train", ["experiment=cifar10/baseline2", "data.encoder.order=0", "data.encoder.threshold=fixed",
                            "data.encoder.random_directions=false", "paths.output_dir=unused"])
    assert cfg.data.encoder.order == 0 and cfg.data.encoder.threshold == "fixed"
    assert cfg.data.encoder.random_directions is False


def test_slurm_launcher_config_composes_with_the_ddp_trainer():
    cfg = compose("train", ["experiment=imagenet/baseline2_r18", "hydra/launcher=slurm", "paths.output_dir=unused"],
                  return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == cfg.trainer.devices == 2 and launcher.nodes == cfg.trainer.num_nodes == 1
