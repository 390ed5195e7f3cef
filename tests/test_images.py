"""ImageDataModule (online mode): sources, worker preprocessing, on-device augmentation + I2E."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import compose_in
from i2e_train.data.base import DatasetUnavailableError
from i2e_train.data.images import ImageDataModule, class_targets
from i2e_train.data.preprocess import preprocess_image
from i2e_train.i2e import I2E

CLASSES = ("cat", "dog", "frog")
RES = (32, 32)


def _image(rng, size=16) -> Image.Image:
    # smooth blobs plus noise: enough structure for events at ratio 0.07
    yy, xx = np.mgrid[:size, :size] / size
    base = np.stack([np.sin(6 * xx + rng.random() * 6), np.cos(5 * yy + rng.random() * 6), xx * yy], -1)
    arr = np.clip((base * 0.5 + 0.5) * 200 + rng.integers(0, 55, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<i>.png, 16x16, 3 classes x 6 images (no split folders)."""
    root = tmp_path_factory.mktemp("imgfolder")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(6):
            _image(rng).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hub_parquet(tmp_path_factory):
    """A local copy of a hub image dataset: train/test parquet with an Image column + ClassLabel."""
    import datasets

    root = tmp_path_factory.mktemp("hubcopy")
    rng = np.random.default_rng(1)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    labels = {}
    for split, n in (("train", 9), ("test", 6)):
        labs = [i % 3 for i in range(n)]
        ds = datasets.Dataset.from_dict({"img": [_image(rng) for _ in range(n)], "label": labs}, features=feats)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
        labels[split] = labs
    return root, labels


def _dm(source, **kw) -> ImageDataModule:
    args = dict(name="tiny", source=str(source), num_classes=3, resolution=list(RES), source_size=16,
                batch_size=8, num_workers=0, data_dir=str(source) + "-cache", encoder={"ratio": 0.07, "order": 4})
    args.update(kw)
    return ImageDataModule(**args)


def _first(loader):
    return next(iter(loader))


def test_imagefolder_made_split_labels_and_eval_events_match_the_released_preprocessing(image_folder):
    dm = _dm(image_folder)
    dm.setup()
    assert dm.class_names == list(CLASSES)
    tr, va = dm.datasets["train"], dm.datasets["validation"]
    assert len(tr) + len(va) == 18 and len(va) == 3  # 10% per class, at least one per class
    images, labels = _first(dm.val_dataloader())
    assert images.dtype == torch.uint8 and images.shape == (3, 3, *RES)
    assert labels.dtype == torch.int64
    files = sorted(image_folder.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    val_files = [files[r] for r in va.rows]
    assert labels.tolist() == [CLASSES.index(f.parent.name) for f in val_files]
    expected = torch.stack([preprocess_image(Image.open(f), RES) for f in val_files])
    assert torch.equal(images, expected)
    events = dm.to_events(images, train=False)
    assert events.shape == (8, 3, 2, *RES) and events.dtype == torch.float32
    assert torch.equal(events, I2E(ratio=0.07, order=4).eval()(expected))
    assert torch.equal(dm.to_events(images, train=False), events)  # deterministic
    # the same split again with the same seed; pickles for spawned workers
    dm2 = _dm(image_folder)
    dm2.setup()
    assert np.array_equal(dm2.datasets["validation"].rows, va.rows)
    pickle.dumps(dm2.datasets["train"])


def test_train_mode_cifar_recipes_pil_bicubic(image_folder):
    """The earlier preprocessing (interpolation=pil_bicubic): PIL resize in the workers, crop, flip
    and bicubic resize on the device. (The official v2 pipeline: tests/test_recipe_parity.py.)"""
    torch.manual_seed(0)
    old = dict(interpolation="pil_bicubic")
    dm = _dm(image_folder, train_aug="baseline1", hflip=0.0, encoder={"ratio": 0.07, "random_directions": False}, **old)
    dm.setup()
    src, _ = _first(dm.train_dataloader())
    assert src.shape == (8, 3, 16, 16)  # the workers hand over the source-size image
    ev1, ev2 = dm.to_events(src, train=True), dm.to_events(src, train=True)
    assert ev1.shape == (8, 8, 2, *RES)
    assert torch.equal(ev1, ev2)  # baseline1 without flip and random directions: deterministic resize
    up = torch.nn.functional.interpolate(src.float() / 255, size=RES, mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.equal(ev1, I2E(ratio=0.07).eval()(up))
    # baseline2 adds pad 4 (edge) + random crop before the resize: draws differ from baseline1
    dm2 = _dm(image_folder, train_aug="baseline2", hflip=0.0, encoder={"ratio": 0.07, "random_directions": False},
              **old)
    assert not torch.equal(dm2.to_events(src, train=True), ev1)
    # the full recipe: random directions + flip + crop, different on every draw
    dm3 = _dm(image_folder, **old)
    a, b = dm3.to_events(src, train=True), dm3.to_events(src, train=True)
    assert a.shape == b.shape == (8, 8, 2, *RES) and not torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}


def test_imagenet_family_crops_in_the_workers_pil_bicubic(image_folder):
    dm = _dm(image_folder, aug_family="imagenet", train_aug="baseline2", test_resize=36, interpolation="pil_bicubic")
    dm.setup()
    images, labels = _first(dm.train_dataloader())
    assert images.shape == (8, 3, *RES)  # RandomResizedCrop to the resolution in the workers
    assert dm.to_events(images, train=True).shape == (8, 8, 2, *RES)
    val_images, _ = _first(dm.val_dataloader())
    assert val_images.shape == (3, 3, *RES)  # shorter side 36, centre crop 32
    f = sorted(image_folder.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))[dm.datasets["validation"].rows[0]]
    img = Image.open(f).convert("RGB").resize((36, 36), Image.BICUBIC)
    expected = torch.from_numpy(np.asarray(img)[2:34, 2:34].copy()).permute(2, 0, 1)
    assert torch.equal(val_images[0], expected)


def test_hub_style_parquet_source(hub_parquet):
    root, labels = hub_parquet
    dm = _dm(root)  # val_split auto = "test" for hub sources
    dm.setup()
    assert len(dm.datasets["train"]) == 9 and len(dm.datasets["validation"]) == 6
    images, labs = _first(dm.val_dataloader())
    assert images.shape == (6, 3, *RES) and labs.tolist() == labels["test"]
    events, labs2 = dm.on_after_batch_transfer((images, labs))  # no trainer: evaluation
    assert events.shape == (8, 6, 2, *RES) and torch.equal(labs2, labs)
    assert torch.equal(events, I2E(ratio=0.07).eval()(images))


def test_errors_name_the_problem(image_folder, tmp_path):
    bad = tmp_path / "bad"
    for c in CLASSES:
        (bad / c).mkdir(parents=True)
        _image(np.random.default_rng(2)).save(bad / c / "0.png")
        _image(np.random.default_rng(3)).save(bad / c / "1.png")
    (bad / "dog" / "broken.png").write_bytes(b"not a png at all")
    dm = _dm(bad, val_split=None, val_fraction=0.01)
    dm.setup()
    with pytest.raises(ValueError, match="broken.png"):
        for _ in dm.train_dataloader():
            pass
    with pytest.raises(ValueError, match="num_classes=4"):
        _dm(image_folder, num_classes=4).setup()
    with pytest.raises(ValueError, match="catalog says"):
        ImageDataModule(name="I2E-CIFAR10", source="x", num_classes=3)
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        _dm(tmp_path / "nowhere").setup()
    with pytest.raises(DatasetUnavailableError, match="val/<class>"):
        _dm(tmp_path / "nowhere", source_type="imagefolder").setup()
    with pytest.raises(ValueError, match="train_aug"):
        _dm(image_folder, train_aug="baseline3")
    assert class_targets(["2", "0", "1"], 3, "x") == {"2": 2, "0": 0, "1": 1}


def test_train_fast_dev_run_online_with_own_data(hub_parquet, tmp_path, monkeypatch):
    """data=cifar10 on images of your own (a name outside the catalog): classes and resolution given,
    the converter ratio defaults to 0.07, the order is overridden; one batch trains."""
    root, _ = hub_parquet
    cfg = compose_in(tmp_path, monkeypatch, "train", [
        "debug=fast", "~logger", "data=cifar10", f"data.source={root}", "data.name=tiny", "data.num_classes=3",
        "data.resolution=[32,32]", "data.source_size=16", "data.batch_size=4", "data.num_workers=0",
        "data.encoder.order=0"])
    assert cfg.data.encoder.ratio == 0.07 and cfg.data.timesteps == 8 and cfg.model.num_classes == 3
    from i2e_train.tasks.train import train

    fit = train(cfg)["fit"]
    assert 0 < fit["train/loss_step"] < 10 and 0 <= fit["val/top1"] <= 1, fit


def test_eval_events_equal_the_i2e_convert_records(hub_parquet, tmp_path):
    import pyarrow.parquet as pq

    from i2e_train.codec import decode_record
    from i2e_train.convert import convert

    root, labels = hub_parquet
    out = tmp_path / "converted"
    convert(root, out, "tiny", splits={"validation": "test"}, resolution=RES[0], ratio=0.07, order=4,
            interpolation="bilinear", num_workers=0, device="cpu", progress=False, cache_dir=str(tmp_path / "cache"))
    (shard,) = (out / "tiny").glob("validation-*.parquet")
    recs = pq.read_table(shard).column("data").to_pylist()
    converted = torch.from_numpy(np.stack([decode_record(r) for r in recs])).transpose(0, 1)  # [T, B, C, H, W]
    dm = _dm(root)
    dm.setup()
    images, _ = _first(dm.val_dataloader())
    assert torch.equal(dm.to_events(images, train=False).bool(), converted)


@pytest.mark.parametrize("data", ["cifar10", "cifar100", "imagenet"])
def test_online_data_configs_compose_and_instantiate(data):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from i2e_train.config import compose

    GlobalHydra.instance().clear()
    try:
        cfg = compose("train", [f"data={data}", "paths.output_dir=unused", "data.encoder.order=0",
                                "data.encoder.threshold=fixed", "data.encoder.random_directions=false"])
    finally:
        GlobalHydra.instance().clear()
    dm = instantiate(cfg.data)  # no data is touched before setup()
    assert isinstance(dm, ImageDataModule) and dm.num_classes == cfg.model.num_classes
    assert dm.encoder.order == (0, 1, 2, 3, 4, 5, 6, 7) and dm.encoder.threshold == "fixed"
    assert not dm.encoder.random_directions and dm.encoder.ratio == dm.info.ratio
    assert dm.shape == (8, 2, *dm.resolution)


def test_imagefolder_with_split_folders(tmp_path):
    rng = np.random.default_rng(4)
    for split, n in (("train", 3), ("val", 2)):
        for c in CLASSES:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                _image(rng).save(tmp_path / split / c / f"{i}.jpg")
    dm = _dm(tmp_path, aug_family="imagenet", train_aug="baseline1")  # val_split auto -> val/
    dm.setup()
    assert len(dm.datasets["train"]) == 9 and len(dm.datasets["validation"]) == 6
    images, labels = _first(dm.val_dataloader())
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and images.shape == (6, 3, *RES)
    train_images, _ = _first(dm.train_dataloader())
    assert train_images.shape == (8, 3, *RES)


def _trainer_at(batch: int, epoch: int = 0, training: bool = True):
    """What ``augment_batch`` reads of a Lightning trainer: mode, epoch, rank, batch index."""
    from types import SimpleNamespace

    progress = SimpleNamespace(current=SimpleNamespace(ready=batch))
    return SimpleNamespace(training=training, current_epoch=epoch, max_epochs=3, global_rank=0, precision="32-true",
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_online_mode_event_augmentation_runs_on_the_converted_batch(image_folder):
    """data.augment in the online mode: the training batch is converted on the device, then goes
    through the same data/event_augment.py pipeline (seeded by the trainer's position) as I2E and
    real-recording batches; validation batches are not augmented."""
    from i2e_train.data.event_augment import batch_generator, build_event_augment

    fixed = dict(train_aug="none", encoder={"ratio": 0.07, "order": 4, "random_directions": False}, seed=7)
    spec = ["nda", {"name": "nda_cutmix", "p": 1.0}, "event_drop"]
    plain, aug = _dm(image_folder, **fixed), _dm(image_folder, augment=spec, **fixed)
    plain.setup()
    images, labels = _first(plain.train_dataloader())
    plain.trainer = aug.trainer = _trainer_at(batch=2, epoch=1)
    events, same_labels = plain.on_after_batch_transfer((images, labels))
    assert same_labels is labels  # no augmentation: labels untouched
    out, soft = aug.on_after_batch_transfer((images, labels))
    want, want_soft = build_event_augment(spec, 3)(events.clone(), labels, batch_generator(events.device, 7, 1, 2))
    assert torch.equal(out, want) and torch.equal(soft, want_soft) and not torch.equal(out, events)
    assert set(out.unique().tolist()) <= {0.0, 1.0} and soft.shape == (8, 3)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    again, _ = aug.on_after_batch_transfer((images, labels))
    aug.trainer = _trainer_at(batch=3, epoch=1)
    other, _ = aug.on_after_batch_transfer((images, labels))
    assert torch.equal(again, out) and not torch.equal(other, out)
    aug.trainer = _trainer_at(batch=2, epoch=1, training=False)
    val, val_labels = aug.on_after_batch_transfer((images, labels))
    assert torch.equal(val, aug.to_events(images, train=False)) and val_labels is labels


def test_online_mode_mixup_then_event_augmentation(image_folder):
    """mixup=true and a mixing event augmentation together: the batch carries the labels and the
    soft targets of both mixes, which still sum to 1."""
    dm = _dm(image_folder, train_aug="none", mixup=True, augment=["nda_cutmix"], seed=1,
             encoder={"ratio": 0.07, "order": 4, "random_directions": False})
    dm.setup()
    images, labels = _first(dm.train_dataloader())
    dm.trainer = _trainer_at(batch=0)
    torch.manual_seed(0)
    events, hard, soft = dm.on_after_batch_transfer((images, labels))
    assert events.shape == (8, 8, 2, *RES) and hard is labels and soft.shape == (8, 3)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).any()
