"""Parity with the official I2E code (issue 23): exact equality, no tolerances.

The official reference (``tests/official``: its ``Network/i2e.py`` and ``MSNet_I2E.py``,
pinned) and the official scripts' argument values (``Train Script/*/code.txt`` and the
``train.py`` defaults) are the spec. Checked here:
(a) the optimiser (groups, Nesterov SGD, weight decay) and the lr of every epoch of every
    experiment equal timm's ``create_optimizer(args, model)`` + ``CosineLRScheduler`` stepped
    with ``scheduler.step(epoch)`` at the start of each epoch, and two steps from the same
    weights and gradients give ``torch.equal`` weights;
(b)-(d) in the data sections below.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from i2e_train.config import compose, group_options

# --------------------------------------------------------------------------- official argument values
# Train Script/Baseline-{I,II}/code.txt (CIFAR10/100, ImageNet) and DVS_CIFAR10/train.py's defaults.
_COMMON = dict(opt="sgd", momentum=0.9, warmup_t=0, warmup_lr_init=0.0, scheduler="cosineLR")
OFFICIAL = {
    "cifar": dict(_COMMON, lr=0.1, lr_min=5e-5, weight_decay=2e-4, epochs=256),
    "imagenet": dict(_COMMON, lr=0.1, lr_min=5e-5, weight_decay=1e-5, epochs=128),
    "dvs": dict(_COMMON, lr=5e-4, lr_min=0.0, weight_decay=0.0, epochs=128),
}
# experiment -> the official script whose recipe it follows (written from the reference)
FAMILY = {
    "cifar10/baseline1": "cifar", "cifar10/baseline2": "cifar", "cifar10/transfer1": "cifar",
    "cifar100/baseline1": "cifar", "cifar100/baseline2": "cifar", "cifar100/transfer1": "cifar",
    "imagenet/baseline1_r18": "imagenet", "imagenet/baseline2_r18": "imagenet",
    "imagenet/baseline2_r34": "imagenet", "imagenet/transfer1_r18": "imagenet",
    "cifar10dvs/baseline": "dvs", "cifar10dvs/transfer1": "dvs", "cifar10dvs/transfer2": "dvs",
    "nmnist/pretrain": "cifar", "nmnist/baseline": "dvs", "nmnist/transfer": "dvs",
    "ncaltech101/pretrain": "imagenet", "ncaltech101/baseline": "dvs", "ncaltech101/transfer": "dvs",
}

STEPPED = ("cifar10/baseline2", "imagenet/baseline2_r34", "cifar10dvs/transfer2")


@pytest.fixture(autouse=True)
def _clear():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_every_experiment_has_an_official_recipe():
    assert sorted(FAMILY) == sorted(n for n in group_options("experiment") if n != "demo")


def _official_model(depth: str, classes: int):
    from official import MSNet_I2E

    return getattr(MSNet_I2E, f"resnet{depth}")(num_classes=classes, ratio=0.07)


_MODELS: dict = {}


def _models(name: str, classes: int, fresh: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, the official network) with the same weights; cached unless ``fresh`` (stepped)."""
    if fresh or (name, classes) not in _MODELS:
        from i2e_train.models import create_model

        ours = create_model(name, num_classes=classes, in_channels=2)
        theirs = _official_model(name.removeprefix("ms_resnet"), classes)
        theirs.load_state_dict(ours.state_dict(), strict=False)  # theirs also holds the I2E kernel
        if fresh:
            return ours, theirs
        _MODELS[(name, classes)] = ours, theirs
    return _MODELS[(name, classes)]


def _groups_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, list[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], sorted(names[id(p)] for p in g["params"] if p.requires_grad))
            for g in optimizer.param_groups]


def _step_twice(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for k in range(2):
        for name, g in grads.items():
            params[name].grad = g * (k + 1)
        optimizer.step()


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_optimizer_and_lr_schedule_equal_the_official_scripts(name, monkeypatch):
    from timm.optim import create_optimizer
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from i2e_train.module import SNNClassifier

    args = argparse.Namespace(**OFFICIAL[FAMILY[name]])
    cfg = compose("train", [f"experiment={name}", "paths.output_dir=unused", "paths.root_dir=.", "init_from=null"])
    ours, theirs = _models(cfg.model.name, int(cfg.data.num_classes), fresh=name in STEPPED)
    module = SNNClassifier(ours, int(cfg.data.num_classes), optimizer=instantiate(cfg.optim),
                           scheduler=instantiate(cfg.scheduler))
    conf = module.configure_optimizers()
    opt, sched = (conf["optimizer"], conf["lr_scheduler"]["scheduler"]) if isinstance(conf, dict) else (conf, None)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] is True
    assert int(cfg.trainer.max_epochs) == args.epochs

    official = create_optimizer(args, theirs)
    official_sched = CosineLRScheduler(official, t_initial=args.epochs, lr_min=args.lr_min,
                                       warmup_t=args.warmup_t, warmup_lr_init=args.warmup_lr_init)
    # the same parameter groups (by parameter name), hyper-parameters and order
    assert _groups_by_name(ours, opt) == _groups_by_name(theirs, official)
    keys = ("lr", "momentum", "nesterov", "dampening", "weight_decay", "maximize")
    assert [{k: g[k] for k in keys} for g in opt.param_groups] == [{k: g[k] for k in keys}
                                                                    for g in official.param_groups]

    # lr of every epoch: the official loop calls scheduler.step(epoch) at each epoch's start;
    # Lightning calls our lr_scheduler_step at the end of epoch e (current_epoch = e)
    epoch = [0]
    monkeypatch.setattr(SNNClassifier, "current_epoch", property(lambda self: epoch[0]))
    for e in range(args.epochs):
        official_sched.step(e)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in official.param_groups], f"epoch {e}"
        epoch[0] = e
        module.lr_scheduler_step(sched, None)

    # two optimiser steps from the same weights and gradients (at the lr of epoch 1); the groups
    # and hyper-parameters above are all a step depends on, so one experiment per recipe suffices
    if name not in STEPPED:
        return
    official_sched.step(1)
    sched.step(epoch=1)
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in ours.named_parameters() if p.requires_grad}
    _step_twice(ours, opt, grads)
    _step_twice(theirs, official, grads)
    mine, ref = ours.state_dict(), theirs.state_dict()
    for key, value in mine.items():
        assert torch.equal(value, ref[key]), key


# --------------------------------------------------------------------------- system settings
def test_cuda_math_only_on_cuda_and_restored(monkeypatch):
    """gpu / ddp trainers: cudnn.benchmark (unless deterministic) and TF32 matmuls for the run,
    put back afterwards; a CPU run changes nothing."""
    from types import SimpleNamespace

    from i2e_train.callbacks import CudaMath

    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb = CudaMath()
    cb.setup(cpu, None, "fit")
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
    cuda = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    try:
        cb.setup(cuda, None, "fit")
        assert torch.backends.cudnn.benchmark is True and torch.backends.cuda.matmul.allow_tf32 is True
        cb.teardown(cuda, None, "fit")
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        cb.setup(cuda, None, "fit")
        assert torch.backends.cudnn.benchmark is False  # deterministic runs: no autotuning
    finally:
        cb.teardown(cuda, None, "fit")
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
    for trainer, expected in (("gpu", True), ("ddp", True), ("cpu", False), ("default", False)):
        cfg = compose("train", [f"trainer={trainer}", "paths.output_dir=unused"])
        assert bool(cfg.trainer.get("cuda_math")) is expected, trainer


def test_validation_runs_without_autocast_and_unsmoothed():
    """The official validate(): no autocast (float32 network under a 16-mixed trainer), plain CE."""
    from i2e_train.module import SNNClassifier

    net = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(8, 3))  # [T, B, 2, 2, 2] -> [T, B, 3]

    class Mean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).mean(0)

    module = SNNClassifier(Mean(), 3, label_smoothing=0.1)
    seen = []
    module.log = lambda name, value, **kw: seen.append((name, value))
    events = torch.rand(4, 5, 2, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as Lightning's precision plugin wraps the step
        module.validation_step((events, labels), 0)
    loss = dict(seen)["val/loss"]
    assert loss.dtype == torch.float32
    assert torch.equal(loss, torch.nn.functional.cross_entropy(module(events), labels))


# --------------------------------------------------------------------------- the official options
def test_mixup_cutmix_is_the_official_random_choice_and_schedule():
    from torchvision.transforms import v2

    from i2e_train.data.augment import mixup_active, mixup_cutmix

    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    official = v2.RandomChoice([v2.CutMix(num_classes=5), v2.MixUp(num_classes=5)])
    for seed in range(6):  # both branches are drawn
        torch.manual_seed(seed)
        want_x, want_y = official(images, labels)
        torch.manual_seed(seed)
        got_x, got_y = mixup_cutmix(images, labels, 5)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    # seeded by a generator: reproducible, global RNG untouched; events [T, B, ...] mix per sample
    events = torch.rand(4, 6, 2, 8, 8)
    state = torch.get_rng_state()
    a = mixup_cutmix(events, labels, 5, torch.Generator().manual_seed(1), batch_dim=1)
    b = mixup_cutmix(events, labels, 5, torch.Generator().manual_seed(1), batch_dim=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(torch.get_rng_state(), state)
    assert a[0].shape == events.shape and a[1].shape == (6, 5)
    # official: `if epoch <= args.epochs * 2 / 3 and args.mixup` with epoch counted from 0
    assert [e for e in range(256) if mixup_active(e, 256)] == list(range(171))
    assert [e for e in range(128) if mixup_active(e, 128)] == list(range(86))


def test_online_datamodule_mixes_as_the_official_loop_while_the_schedule_says():
    """data.mixup=true: the DataModule's training batch is the official RandomChoice on the
    ToDtype-scaled images (same draws under the same seed) while epoch <= 2/3 of max_epochs, then
    converted; after that, plain batches."""
    from types import SimpleNamespace

    from torchvision.transforms import v2

    from i2e_train.data.images import ImageDataModule

    dm = ImageDataModule(name="I2E-CIFAR10", source="unused", num_classes=10, resolution=[128, 128],
                         encoder={"ratio": 0.07, "order": 4}, aug_family="cifar", mixup=True)  # fmt: skip
    images = torch.randint(0, 256, (4, 3, 128, 128), dtype=torch.uint8)  # as the workers hand them over
    labels = torch.tensor([0, 3, 7, 9])
    official = v2.RandomChoice([v2.CutMix(num_classes=10), v2.MixUp(num_classes=10)])
    for seed in range(4):
        dm.trainer = SimpleNamespace(training=True, precision="32-true", current_epoch=2, max_epochs=3)
        torch.manual_seed(seed)
        events, hard, soft = dm.on_after_batch_transfer((images, labels), 0)
        torch.manual_seed(seed)
        _, want = official(v2.functional.to_dtype(images, torch.float32, scale=True), labels)
        assert torch.equal(hard, labels) and torch.equal(soft, want.float())
        assert events.shape == (8, 4, 2, 128, 128)
    dm.trainer = SimpleNamespace(training=True, precision="32-true", current_epoch=3, max_epochs=3)
    assert len(dm.on_after_batch_transfer((images, labels), 0)) == 2  # epoch 3 > 3 * 2/3: no mixing


def test_temporal_delete_keeps_t_train_frames_in_order():
    from i2e_train.data.augment import TemporalDelete, temporal_delete

    events = torch.arange(8.0).view(8, 1, 1).expand(8, 3, 2).clone()  # frame t holds t
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = temporal_delete(events, 5, gen)
        kept = out[:, 0, 0].tolist()
        assert len(kept) == 5 and kept == sorted(set(kept)) and set(kept) <= set(range(8))
        assert torch.equal(out, events[[int(k) for k in kept]])
        seen.add(tuple(kept))
    assert len(seen) > 1
    assert temporal_delete(events, 0) is events and temporal_delete(events, 8) is events  # off (official default 0)
    assert torch.equal(TemporalDelete(3)(events, torch.Generator().manual_seed(1)),
                       temporal_delete(events, 3, torch.Generator().manual_seed(1)))


def test_soft_targets_train_the_loss_hard_labels_the_accuracy():
    from i2e_train.module import SNNClassifier

    class Mean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):  # [T, B, 2, 2, 2] -> [B, 3]
            return self.fc(x.flatten(2)).mean(0)

    module = SNNClassifier(Mean(), 3, label_smoothing=0.1)
    module.log = lambda *a, **k: None
    events, labels = torch.rand(4, 5, 2, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    soft = torch.softmax(torch.randn(5, 3), 1)
    loss = module.training_step((events, labels, soft), 0)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(module(events), soft, label_smoothing=0.1))
    assert module.train_top1.tp.sum() + module.train_top1.fn.sum() == 5  # accuracy on the 5 hard labels


# --------------------------------------------------------------------------- data: (b) validation, (c) training
# The official transforms, as written in Train Script/Baseline-{I,II}/utils.py (get_dataset).
def _official_transforms():
    from torchvision.transforms import v2

    return {
        "cifar_train_baseline2": v2.Compose([
            v2.PILToTensor(), v2.Pad(4, padding_mode="edge"), v2.RandomCrop(32), v2.Resize((128, 128)),
            v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)]),
        "cifar_train_baseline1": v2.Compose([
            v2.PILToTensor(), v2.Resize((128, 128)), v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True)]),
        "cifar_test": v2.Compose([v2.PILToTensor(), v2.Resize((128, 128)), v2.ToDtype(torch.float32, scale=True)]),
        "imagenet_train_baseline2": v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True)]),
        "imagenet_train_baseline1": v2.Compose([
            v2.PILToTensor(), v2.Resize((224, 224)), v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True)]),
        "imagenet_test": v2.Compose([v2.PILToTensor(), v2.Resize(256), v2.CenterCrop(224),
                                     v2.ToDtype(torch.float32, scale=True)]),
    }


def _photo_crops(sizes, seed: int):
    """Crops of the two real photographs shipped with scikit-learn, as RGB PIL images of ``sizes``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos
    rng = np.random.default_rng(seed)
    out = []
    for k, (h, w) in enumerate(sizes):
        p = photos[k % 2]
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        out.append(Image.fromarray(np.ascontiguousarray(p[y:y + h, x:x + w])))
    return out


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """An ImageFolder of 32x32 photo crops: train/ and test/ with the 10 CIFAR-10 classes (2 + 1 each)."""
    from i2e_train.data.catalog import CIFAR10_CLASSES

    root = tmp_path_factory.mktemp("cifar_like")
    images = iter(_photo_crops([(32, 32)] * 30, seed=0))
    for split, n in (("train", 2), ("test", 1)):
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                next(images).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """An ImageFolder of photo crops of several sizes and aspect ratios (JPEG, as ILSVRC): 3 classes."""
    root = tmp_path_factory.mktemp("imagenet_like")
    sizes = [(300, 260), (240, 320), (400, 300), (256, 256), (230, 500), (333, 250)]
    images = iter(_photo_crops(sizes * 2, seed=1))
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                next(images).save(root / split / c / f"{i}.JPEG", quality=90)
    return root


def _cifar_dm(root, **kw):
    from i2e_train.data.images import ImageDataModule

    return ImageDataModule(name="I2E-CIFAR10", source=str(root), source_type="imagefolder", val_split="test",
                           batch_size=64, num_workers=0, data_dir=str(root) + "-cache", seed=2024, **kw)


def _imagenet_dm(root, **kw):
    from i2e_train.data.images import ImageDataModule

    return ImageDataModule(name="tiny-imagenet", source=str(root), source_type="imagefolder", val_split="val",
                           num_classes=3, resolution=224, aug_family="imagenet", test_resize=256,
                           encoder={"ratio": 0.12}, batch_size=64, num_workers=0, data_dir=str(root) + "-cache",
                           seed=2024, **kw)


def _files(ds) -> list:
    return [ds.reader.where(int(r)) for r in ds.rows]


def _official_i2e(ratio: float, train: bool = False):
    from official.i2e import I2E as OfficialI2E

    return OfficialI2E(ratio=ratio).train(train)  # shuffle = preset 4, replicate padding


@pytest.mark.parametrize("family", ["cifar", "imagenet"])
def test_validation_events_equal_official_transform_test_and_i2e(family, cifar_like, imagenet_like):
    """(b) image for image: official transform_test + official I2E (eval) == our validation events."""
    from PIL import Image

    dm = _cifar_dm(cifar_like) if family == "cifar" else _imagenet_dm(imagenet_like)
    dm.setup()
    images, _ = next(iter(dm.val_dataloader()))
    ours = dm.to_events(images, train=False)
    transform = _official_transforms()[f"{family}_test"]
    official = _official_i2e(0.07 if family == "cifar" else 0.12)
    files = _files(dm.datasets["validation"])
    assert len(files) == images.shape[0] >= 6
    for k, f in enumerate(files):
        x = transform(Image.open(f).convert("RGB"))  # [3, H, W] float32
        assert torch.equal(images[k].float().mul(1.0 / 255), x), f"pixels of {f}"
        assert torch.equal(ours[:, k], official(x[None])[:, 0]), f"events of {f}"


@pytest.mark.parametrize("family, aug", [("cifar", "baseline2"), ("cifar", "baseline1"),
                                         ("imagenet", "baseline2"), ("imagenet", "baseline1")])
def test_training_batch_equals_official_transform_train(family, aug, cifar_like, imagenet_like, monkeypatch):
    """(c) one training batch: with the sample's seed (a function of run seed, epoch and index) as
    the global seed, the official transform_train draws the same crops / flips and gives the same
    pixels; with the same direction vectors the official I2E (train mode) gives the same events."""
    from PIL import Image

    import official.i2e as official_module
    from i2e_train.data.images import sample_seed

    dm = (_cifar_dm(cifar_like, train_aug=aug) if family == "cifar"
          else _imagenet_dm(imagenet_like, train_aug=aug))
    dm.setup()
    loader = dm.train_dataloader()
    items = list(iter(loader.sampler))[:6]
    assert all(isinstance(i, tuple) and i[1] == 0 for i in items)  # (index, epoch) pairs
    images, _ = dm.datasets["train"].__getitems__(items)  # what the DataLoader's workers run
    transform = _official_transforms()[f"{family}_train_{aug}"]
    files = _files(dm.datasets["train"])
    for k, (index, epoch) in enumerate(items):
        torch.manual_seed(sample_seed(2024, epoch, index))
        x = transform(Image.open(files[index]).convert("RGB"))
        assert torch.equal(images[k].float().mul(1.0 / 255), x), f"pixels of {files[index]}"
    # the same directions: ours drawn by our generator, handed to the official random.choice
    enc = dm.encoder.train()
    cell_a, cell_b = enc.directions(1, torch.device("cpu"), torch.Generator().manual_seed(5))
    chosen = {enc.order[t]: [int(cell_a[t, 0]) + 1, int(cell_b[t, 0]) + 1] for t in range(8)}
    groups = {id(v): g for g, v in enumerate(official_module.selectable_directions)}
    monkeypatch.setattr(official_module.random, "choice", lambda seq: chosen[groups[id(seq)]])
    ours = dm.to_events(images, train=True, generator=torch.Generator().manual_seed(5))
    official = _official_i2e(dm.encoder.ratio, train=True)
    assert torch.equal(ours, official(images.float().mul(1.0 / 255)))


# --------------------------------------------------------------------------- (d) i2e-convert
# How each released config was made: the official notebooks (Dataset Transformation/*.ipynb:
# v2.Resize default bilinear) where one exists, else the dataset card's protocol (v2 bicubic).
PROTOCOLS = [("I2E-MNIST", 32, "bicubic"), ("I2E-CIFAR10", 128, "bilinear"), ("I2E-CIFAR100", 128, "bilinear"),
             ("I2E-ImageNet", 224, "bilinear"), ("I2E-Caltech101", 224, "bicubic")]


def _protocol(size: int, interpolation: str):
    from torchvision.transforms import InterpolationMode, v2

    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), interpolation=mode),
                       v2.ToDtype(torch.float32, scale=True)])


@pytest.mark.parametrize("config, size, interpolation", PROTOCOLS)
def test_convert_pixels_equal_the_protocol_of_each_released_config(config, size, interpolation):
    """(d) the pixels i2e-convert converts (interpolation=auto) are the notebook's / card's."""
    from i2e_train.convert import _settings
    from i2e_train.data.preprocess import preprocess_image

    s = _settings(config, None, None, None, None, "cpu", 1, "raise")
    assert s.size == (size, size) and s.interpolation == interpolation
    protocol = _protocol(size, interpolation)
    for img in _photo_crops([(32, 32), (28, 28), (300, 260), (64, 96)], seed=2):
        ours = preprocess_image(img, s.size, "photo", s.interpolation)
        assert torch.equal(ours.float().mul(1.0 / 255), protocol(img))
    if config == "I2E-ImageNet":  # its validation split: the notebook's Resize(256) + CenterCrop(224)
        assert s.val_resize == 256
        for img in _photo_crops([(300, 260), (240, 320), (256, 256)], seed=4):
            ours = preprocess_image(img, s.size, "photo", s.interpolation, s.val_resize)
            assert torch.equal(ours.float().mul(1.0 / 255), _official_transforms()["imagenet_test"](img))
    else:
        assert s.val_resize is None


@pytest.mark.parametrize("config, size, interpolation", [PROTOCOLS[0], PROTOCOLS[1]])
def test_convert_records_equal_protocol_plus_official_i2e(config, size, interpolation, tmp_path):
    """(d) end to end: i2e-convert's records == the protocol's pixels through the official I2E (eval)."""
    import numpy as np
    import pyarrow.parquet as pq

    from i2e_train.codec import decode_record
    from i2e_train.convert import convert
    from i2e_train.data.catalog import CATALOG

    src = tmp_path / "src" / "train"
    for k, img in enumerate(_photo_crops([(32, 32), (40, 30), (32, 32), (50, 64)], seed=3)):
        (src / str(k % 2)).mkdir(parents=True, exist_ok=True)
        img.save(src / str(k % 2) / f"{k}.png")
    convert(tmp_path / "src", tmp_path / "out", config, splits="train", num_workers=0, device="cpu", progress=False)
    (shard,) = (tmp_path / "out" / config).glob("train-*.parquet")
    table = pq.read_table(shard).to_pydict()
    official = _official_i2e(CATALOG[config].ratio)
    from PIL import Image

    for path, data in zip(table["file_path"], table["data"]):
        x = _protocol(size, interpolation)(Image.open(src / path.replace(".npy", ".png")).convert("RGB"))
        assert np.array_equal(decode_record(data), official(x[None])[:, 0].numpy().astype(bool)), path


# --------------------------------------------------------------------------- i2e-eval of released weights
@pytest.mark.slow
def test_eval_released_weight_online_uses_the_official_preprocessing(cifar_like, tmp_path, monkeypatch):
    """``i2e-eval ckpt_path=released:<name> data=cifar10`` on local images: the same top-1 as the
    official evaluation (transform_test + official I2E + the network), image for image."""
    from PIL import Image

    from helpers import compose_in, save_official_checkpoint
    from i2e_train.models import create_model
    from i2e_train.tasks.evaluate import evaluate_from_overrides

    torch.manual_seed(0)
    model = create_model("ms_resnet18", num_classes=10).eval()
    save_official_checkpoint(model, tmp_path / "checkpoints" / "cifar10_augmentation.pth.tar")
    overrides = ["ckpt_path=released:cifar10_augmentation", "data=cifar10", f"data.source={cifar_like}",
                 "data.source_type=imagefolder", "data.num_workers=0", "data.batch_size=5"]
    cfg = compose_in(tmp_path, monkeypatch, "eval", overrides)
    result = evaluate_from_overrides(cfg, overrides + [f"paths.output_dir={tmp_path / 'run'}"])
    assert result["model"] == "ms_resnet18" and result["data"] == "I2E-CIFAR10"

    from i2e_train.data.catalog import CIFAR10_CLASSES

    transform, official = _official_transforms()["cifar_test"], _official_i2e(0.07)
    files = sorted((cifar_like / "test").rglob("*.png"))
    with torch.no_grad():
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        logits = model(official(x))
    labels = torch.tensor([CIFAR10_CLASSES.index(f.parent.name) for f in files])
    assert result["val/top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)


def test_checkpoints_of_earlier_recipes_are_evaluated_with_their_preprocessing():
    from omegaconf import OmegaConf

    from i2e_train.tasks.evaluate import _merge_stored

    cfg = compose("eval", ["data=cifar10", "paths.output_dir=unused"])
    stored = {"data": {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "interpolation"}}
    assert _merge_stored(cfg, stored, []).data.interpolation == "pil_bicubic"
    assert _merge_stored(cfg, stored, ["data.interpolation=bilinear"]).data.interpolation == "bilinear"
    current = {"data": OmegaConf.to_container(cfg.data)}
    assert _merge_stored(cfg, current, []).data.interpolation == "bilinear"


def test_ddp_training_split_drops_the_uneven_tail_as_the_official_sampler():
    """Official: DistributedSampler(train, shuffle=True, drop_last=True), batch_size / ngpus per rank."""
    from types import SimpleNamespace

    from i2e_train.data.distributed import per_device_batch_size
    from i2e_train.data.sampler import ResumableTrainData

    class DM(ResumableTrainData):
        trainer = SimpleNamespace(world_size=2, global_rank=0)

    kw = DM()._train_sampling(list(range(9)), 4, seed=1)
    sampler = kw["sampler"]
    assert sampler.drop_last and len(sampler) == 4  # 9 samples, 2 ranks: 4 each, one dropped
    ranks = []
    for r in (0, 1):
        DM.trainer = SimpleNamespace(world_size=2, global_rank=r)
        ranks.append(list(DM()._train_sampling(list(range(9)), 4, seed=1)["sampler"]))
    assert len(set(ranks[0] + ranks[1])) == 8
    assert per_device_batch_size(128, SimpleNamespace(world_size=2)) == int(128 / 2)  # official args.batch_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_conversion_under_autocast_equals_the_official_converter(dtype):
    """train_conversion=autocast: the official converter inside autocast (its conv2d in the low
    precision; run here under CPU autocast, the same casts as CUDA's) == ours with compute_dtype."""
    from types import SimpleNamespace

    from torchvision.transforms.v2.functional import to_dtype

    from i2e_train.i2e import I2E

    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    floats = to_dtype(images, torch.float32, scale=True)
    official = _official_i2e(0.07)
    with torch.autocast("cpu", dtype=dtype):
        want = official(floats)
    assert not torch.equal(want, official(floats))  # the rounding matters on these images
    ours = I2E(ratio=0.07).eval()
    assert torch.equal(ours(images, compute_dtype=dtype), want)
    assert torch.equal(ours(floats, compute_dtype=dtype), want)
    # the DataModule asks for it only on CUDA under a mixed-precision trainer
    from i2e_train.data.images import ImageDataModule

    mod = ImageDataModule(name="I2E-CIFAR10", source="unused", source_type="imagefolder", num_workers=0)
    mod.trainer = SimpleNamespace(precision="16-mixed")
    assert mod.conversion_dtype(torch.device("cuda")) == torch.float16
    assert mod.conversion_dtype(torch.device("cpu")) is None
    mod.trainer = SimpleNamespace(precision="32-true")
    assert mod.conversion_dtype(torch.device("cuda")) is None
