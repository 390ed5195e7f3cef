"""ImageDataModule: static images -> on-device augmentation + I2E (the paper's online mode).

Sources (``source``, kind auto-detected or given as ``source_type``):
- a Hugging Face image dataset id (``uoft-cs/cifar10``, ``uoft-cs/cifar100``), cached under
  ``<data_dir>/hf-cache``, or a local copy of one (a snapshot folder, parquet files, a
  ``save_to_disk`` folder). Image column ``img``/``image`` and label column
  ``label``/``labels``/``fine_label`` are found automatically (``image_column`` /
  ``label_column`` override);
- an ImageFolder tree: ``root/<split>/<class>/<image>`` (ImageNet: train/ and val/), or
  ``root/<class>/<image>`` with a seeded stratified validation split (Caltech, Mini-ImageNet).
Sources are read by the same code as ``i2e-convert`` (`i2e_train.data.sources`), so labels and
errors agree between the online and the offline route.

Labels: class names that are the numbers 0..K-1 (ClassLabel indices, digit folders) are the
class index; other names (``n01440764``, ``cat``) are indexed in sorted order, as
torchvision's ImageFolder does.

Where the work happens (``interpolation="bilinear"``, the default, and "bicubic"): the official
scripts' pipeline.
- DataLoader workers decode, convert to RGB and run the recipe's torchvision ``v2.Compose`` on the
  uint8 tensor (``OfficialTransform``), exactly the official ``transform_train`` /
  ``transform_test`` without the final ``ToDtype`` (the converter scales uint8 as it does):
  - cifar, baseline2: Pad(crop_padding, edge), RandomCrop(source_size), Resize(resolution),
    RandomHorizontalFlip(hflip); baseline1: Resize + flip;
  - imagenet, baseline2: RandomResizedCrop(resolution) + flip; baseline1: Resize + flip;
  - evaluation (and train_aug=none): Resize(resolution), or Resize(test_resize) + CenterCrop.
  Random draws come from a seed per (run seed, epoch, sample index) (``sample_seed``): the
  same for any number of workers, and again the same for a resumed epoch.
- ``on_after_batch_transfer`` runs the I2E converter on the training device (training: train
  mode, random directions; validation: eval mode, canonical directions): batches become
  (events [T, B, 2, H, W] float32, labels).

``interpolation="pil_bicubic"`` (i2e-train before the recipe audit): workers resize with PIL
bicubic (cifar: to source_size; imagenet baseline2: RandomResizedCrop on PIL); the device
crops, flips and (cifar) resizes with ``interpolate(bicubic, antialias)`` on float.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from i2e_train.data.augment import mixup_active, mixup_choice, mixup_cutmix, random_crop, random_hflip
from i2e_train.data.base import (
    DatasetUnavailableError,
    EventDataModule,
    as_size,
    resolve_info,
)
from i2e_train.data.event_augment import augment_batch, build_event_augment
from i2e_train.data.preprocess import check_interpolation, preprocess_image, to_rgb, to_uint8
from i2e_train.data.sources import (
    BadImageError,
    SourceError,
    detect_kind,
    load_image,
    open_source,
)
from i2e_train.data.splits import stratified_split
from i2e_train.i2e import I2E

__all__ = ["ImageDataModule", "ImageSet", "build_encoder", "class_targets", "TRAIN_AUGS", "AUG_FAMILIES"]

log = logging.getLogger(__name__)

TRAIN_AUGS = ("baseline1", "baseline2", "none")
TRAIN_CONVERSIONS = ("autocast", "float32")
_AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
AUG_FAMILIES = ("cifar", "imagenet")
_PAD_MODES = {"replicate": "replicate", "edge": "replicate", "constant": "constant", "zeros": "constant",
              "reflect": "reflect", "circular": "circular"}
_V2_PAD_MODES = {"replicate": "edge", "edge": "edge", "constant": "constant", "zeros": "constant",
                 "reflect": "reflect"}
_ENCODER_KEYS = ("ratio", "order", "padding_mode", "threshold", "random_directions", "dtype", "direction_draw")
_VAL_FOLDERS = ("val", "validation", "valid", "test")


# --------------------------------------------------------------------------- helpers
def build_encoder(encoder: I2E | Mapping[str, Any] | None, default_ratio: float | None = None) -> I2E:
    """An I2E instance from an instance, a dict/DictConfig of I2E kwargs, or None (defaults)."""
    if isinstance(encoder, I2E):
        return encoder
    if encoder is None:
        kwargs: dict[str, Any] = {}
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(encoder, DictConfig):
                encoder = OmegaConf.to_container(encoder, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(encoder, Mapping):
            raise TypeError(f"encoder must be an I2E instance or a dict of I2E arguments, got {type(encoder).__name__}")
        kwargs = {k: v for k, v in encoder.items() if k != "_target_"}
        unknown = sorted(set(kwargs) - set(_ENCODER_KEYS))
        if unknown:
            raise ValueError(f"unknown encoder setting(s) {unknown}; expected some of {list(_ENCODER_KEYS)}")
    if "ratio" not in kwargs and default_ratio is not None:
        kwargs["ratio"] = default_ratio
    return I2E(**kwargs)


def class_targets(class_names: Sequence[str], num_classes: int, where: str) -> dict[str, int]:
    """Class name -> target index. Names that are numbers below num_classes are the index;
    other names are indexed in their (sorted) order, as torchvision's ImageFolder does."""
    names = [str(n) for n in class_names]
    if names and all(n.isdigit() for n in names) and all(int(n) < num_classes for n in names):
        if len(names) != num_classes:
            log.warning("%s: %d classes found, the config says num_classes=%d (numbered classes are kept as they are)",
                        where, len(names), num_classes)
        return {n: int(n) for n in names}
    if len(names) != num_classes:
        raise ValueError(
            f"{where}: found {len(names)} classes ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}) "
            f"but the data config says num_classes={num_classes}"
        )
    return {n: i for i, n in enumerate(names)}


# --------------------------------------------------------------------------- worker transforms
class _Resize:
    """RGB + bicubic resize to (H, W) with PIL -> uint8 [3, H, W] (interpolation=pil_bicubic)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = tuple(size)

    def __call__(self, img: Image.Image, where: str, seed: int | None = None) -> torch.Tensor:
        return preprocess_image(img, self.size, where, "pil_bicubic")

    def __repr__(self) -> str:
        return f"Resize{self.size}"


class _ResizeCenterCrop:
    """RGB, shorter side -> ``resize`` (bicubic), centre crop (H, W) -> uint8 [3, H, W]."""

    def __init__(self, resize: int, size: tuple[int, int]) -> None:
        self.resize, self.size = int(resize), tuple(size)

    def __call__(self, img: Image.Image, where: str, seed: int | None = None) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        img = to_rgb(img, where)
        img = TF.resize(img, self.resize, interpolation=InterpolationMode.BICUBIC)
        img = TF.center_crop(img, list(self.size))
        return _to_uint8(img)

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.resize}, {self.size})"


class _RandomResizedCrop:
    """RGB + torchvision RandomResizedCrop to (H, W), bicubic -> uint8 [3, H, W]."""

    def __init__(self, size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float]) -> None:
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode

        self.size = tuple(size)
        self.op = transforms.RandomResizedCrop(self.size, scale=tuple(scale), ratio=tuple(ratio),
                                               interpolation=InterpolationMode.BICUBIC)

    def __call__(self, img: Image.Image, where: str, seed: int | None = None) -> torch.Tensor:
        return _to_uint8(self.op(to_rgb(img, where)))

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.op.scale}, ratio={self.op.ratio})"


class OfficialTransform:
    """The official scripts' torchvision ``v2.Compose`` on the uint8 tensor of an RGB image,
    without the final ``ToDtype(float32, scale=True)`` (the converter scales exactly as it does):
    image -> uint8 [3, H, W].

    Random transforms (RandomCrop, RandomResizedCrop, RandomHorizontalFlip) draw from torch's
    global generator, as in the official DataLoader workers; here it is seeded with the sample's
    own seed (a function of the run's seed, the epoch and the sample index, see ``sample_seed``)
    inside ``torch.random.fork_rng``, so the draws do not depend on the number of workers, a
    resumed epoch draws the same, and the process's generator is left as it was.
    """

    def __init__(self, ops: Sequence[Any]) -> None:
        from torchvision.transforms import v2

        self.compose = v2.Compose(list(ops))

    def __call__(self, img: Image.Image, where: str, seed: int | None = None) -> torch.Tensor:
        x = to_uint8(img, where)  # v2.PILToTensor() of the RGB image
        if seed is None:
            return self.compose(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.compose(x)

    def __repr__(self) -> str:
        return f"OfficialTransform({self.compose})"


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random augmentation in one epoch."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(index), 0xA06]).generate_state(1, np.uint64)[0]
               % 2**63)


def _to_uint8(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]


# --------------------------------------------------------------------------- dataset
class ImageSet(Dataset):
    """Images of one split, decoded and resized in the DataLoader workers.

    ``reader`` gives the raw image values (file paths, or ``datasets`` Image records) of
    positions ``rows``; ``targets`` are their class indices. ``__getitems__`` returns a whole
    batch: (uint8 [B, 3, h, w], int64 [B]). An unreadable image raises an error naming it.
    """

    def __init__(self, reader, rows: np.ndarray, targets: np.ndarray, transform, split: str,
                 seed: int | None = None) -> None:
        self.reader, self.rows = reader, np.asarray(rows, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.rows) != len(self.targets):
            raise ValueError(f"split {split!r}: {len(self.rows)} rows but {len(self.targets)} targets")
        self.transform, self.split = transform, split
        # per-sample augmentation seeds: the training sampler then yields (index, epoch) items
        self.seed = None if seed is None else int(seed)
        self.wants_epoch = self.seed is not None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: Sequence[int] | Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Items are indices, or (index, epoch) pairs from the training sampler: those seed each
        sample's random augmentation with ``sample_seed(seed, epoch, index)``."""
        seeds: list[int | None] = [None] * len(indices)
        if len(indices) and isinstance(indices[0], (tuple, list)):
            pairs = [(int(i), int(e)) for i, e in indices]
            indices = [i for i, _ in pairs]
            if self.seed is not None:
                seeds = [sample_seed(self.seed, e, i) for i, e in pairs]
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        try:
            values = self.reader.fetch(rows.tolist())
        except Exception as exc:  # noqa: BLE001 - name the first row of the failing read
            raise BadImageError(f"{self.reader.where(int(rows[0]))}: cannot read rows "
                                f"({type(exc).__name__}: {exc})") from exc
        images = []
        for pos, value, seed in zip(rows.tolist(), values, seeds):
            where = self.reader.where(pos)
            img = load_image(value, where)  # BadImageError names the file / row
            try:
                images.append(self.transform(img, where, seed))
            except BadImageError:
                raise
            except Exception as exc:  # noqa: BLE001 - resize/crop failures name the file too
                raise BadImageError(f"{where}: cannot preprocess image ({type(exc).__name__}: {exc})") from exc
        return torch.stack(images), torch.from_numpy(self.targets[idx].copy())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, targets = self.__getitems__([index])
        return images[0], int(targets[0])


def collate_images(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch gathered by ``ImageSet.__getitems__`` passes through; single items are stacked."""
    if isinstance(batch, tuple) and len(batch) == 2 and torch.is_tensor(batch[0]) and batch[0].dim() == 4:
        return batch
    return torch.stack([b[0] for b in batch]), torch.tensor([int(b[1]) for b in batch], dtype=torch.int64)


# --------------------------------------------------------------------------- the DataModule
def _check_settings(source, source_type, train_aug, aug_family, pad_mode, hflip, crop_padding) -> None:
    if train_aug not in TRAIN_AUGS:
        raise ValueError(f"train_aug must be one of {TRAIN_AUGS}, got {train_aug!r}")
    if aug_family not in AUG_FAMILIES:
        raise ValueError(f"aug_family must be one of {AUG_FAMILIES}, got {aug_family!r}")
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {sorted(_PAD_MODES)}, got {pad_mode!r}")
    if not 0.0 <= float(hflip) <= 1.0 or int(crop_padding) < 0:
        raise ValueError(f"hflip must be in [0, 1] and crop_padding >= 0, got {hflip}, {crop_padding}")
    if source_type not in ("auto", "hub", "parquet", "imagefolder"):
        raise ValueError(f"source_type must be auto, hub, parquet or imagefolder, got {source_type!r}")
    if source is None or str(source) == "":
        raise ValueError("source is required: a hub dataset id, a local copy of one, parquet files or an image folder")


def _run_seed(seed: int | None) -> int:
    """The DataModule's seed, else seed_everything's (the run's), else 0 (as the sampler's)."""
    return int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))


def _encoder_for(encoder, info) -> I2E:
    """The converter of the data: its T must be the data's; a ratio other than the catalog's is logged."""
    enc = build_encoder(encoder, info.ratio)
    if enc.timesteps != info.timesteps:
        raise ValueError(f"data config for {info.name}: timesteps={info.timesteps} but the I2E converter "
                         f"makes {enc.timesteps}")
    if info.ratio is not None and abs(enc.ratio - info.ratio) > 1e-12:
        log.warning("%s: encoder ratio %g differs from the catalog's %g (the released data's)",
                    info.name, enc.ratio, info.ratio)
    return enc


class ImageDataModule(EventDataModule):
    """Static images converted to I2E events on the training device (online mode).

    Args:
        name: a catalog config name (``I2E-CIFAR10``, ``I2E-CIFAR100``, ``I2E-ImageNet``, ...),
            whose classes / resolution / T are checked against the given values, or a name of
            your own (then num_classes and resolution are required).
        source: hub dataset id, local copy of one, parquet file(s), or an ImageFolder root.
        source_type: "auto" (detect), "hub", "parquet" or "imagefolder".
        hf_config: the hub dataset's config name, if it has several.
        data_dir: cache folder for hub downloads (``<data_dir>/hf-cache``).
        num_classes: the class count.
        resolution: [H, W] of the events.
        timesteps: T of the events (8, the converter's).
        train_split: source split for training ("train").
        val_split: source split for validation; "auto" = "test" for hub/parquet sources (CIFAR's
            hub sets ship train/test), for an ImageFolder the first of val/validation/valid/test
            that exists, else a stratified split; None = always a seeded stratified split of
            train_split (``val_fraction``, ``seed``).
        image_column: the image column's name (auto-detected when None).
        label_column: the label column's name (auto-detected when None).
        batch_size: the GLOBAL batch; under DDP each process loads batch_size / world_size.
        num_workers: the DataLoaders' worker processes.
        pin_memory: the DataLoaders' ``pin_memory``.
        drop_last: drop the last incomplete training batch.
        train_aug: "baseline1", "baseline2" or "none"; aug_family: "cifar" or "imagenet"
            (see the module docstring for the recipes).
        source_size: (cifar) the size of the image that is padded/cropped before the resize (32).
        crop_padding: (cifar, baseline2) padding before the random crop.
        pad_mode: that padding's mode: "replicate" (= edge, official), "constant" (zeros) or
            "reflect".
        hflip: horizontal flip probability in training (baseline1/2).
        test_resize: evaluation resize of the shorter side before a centre crop to resolution
            (ImageNet: 256); None = resize straight to resolution (the released data).
        rrc_scale: (imagenet, baseline2) RandomResizedCrop's scale range.
        rrc_ratio: (imagenet, baseline2) RandomResizedCrop's aspect-ratio range.
        encoder: I2E settings (dict / DictConfig: ratio, order, padding_mode, threshold,
            random_directions, direction_draw, dtype) or an I2E instance; ratio defaults to the catalog's.
        interpolation: "bilinear" (official: the scripts' torchvision v2 Compose in the workers),
            "bicubic" (the same with v2 bicubic) or "pil_bicubic" (i2e-train before the recipe
            audit: PIL bicubic in the workers, crop / flip / bicubic resize on the device).
        train_conversion: "autocast" (official: under a 16-mixed / bf16-mixed trainer on CUDA the
            training conversion's response is rounded as autocast's conv2d rounds it) or "float32".
        mixup: the official ``--mixup``: ``v2.RandomChoice([CutMix, MixUp])`` on the training
            images (float, before the converter) while ``epoch <= max_epochs * 2 / 3``; batches
            then carry soft targets [B, K] as a third element (loss on them, accuracy on the labels).
        augment: event augmentation of the converted training batches on the device, after the
            converter (and after ``mixup`` when both are on): a list of ``data/event_augment.py``
            entries (e.g. ``[nda, event_drop]``), seeded per batch like the other DataModules;
            None = none. The image-space augmentation above (``train_aug``) is unchanged.
    """

    collate_fn = collate_images

    def __init__(
        self,
        name: str = "I2E-CIFAR10",
        source: str = "uoft-cs/cifar10",
        source_type: str = "auto",
        hf_config: str | None = None,
        data_dir: str = "data",
        num_classes: int | None = None,
        resolution: int | Sequence[int] | None = None,
        timesteps: int = 8,
        train_split: str = "train",
        val_split: str | None = "auto",
        image_column: str | None = None,
        label_column: str | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = True,
        drop_last: bool = False,
        val_fraction: float = 0.1,
        seed: int = 2024,
        train_aug: str = "baseline2",
        aug_family: str = "cifar",
        source_size: int | Sequence[int] = 32,
        crop_padding: int = 4,
        pad_mode: str = "replicate",
        hflip: float = 0.5,
        test_resize: int | None = None,
        rrc_scale: Sequence[float] = (0.08, 1.0),
        rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
        encoder: I2E | Mapping[str, Any] | None = None,
        interpolation: str = "bilinear",
        train_conversion: str = "autocast",
        mixup: bool = False,
        augment: Any = None,
    ) -> None:
        _check_settings(source, source_type, train_aug, aug_family, pad_mode, hflip, crop_padding)
        self.interpolation = check_interpolation(interpolation, "data.interpolation")
        if train_conversion not in TRAIN_CONVERSIONS:
            raise ValueError(f"data.train_conversion must be one of {', '.join(TRAIN_CONVERSIONS)}, "
                             f"got {train_conversion!r}")
        self.train_conversion = train_conversion
        self.mixup = bool(mixup)
        if self.interpolation != "pil_bicubic" and pad_mode not in _V2_PAD_MODES:
            raise ValueError(f"pad_mode {pad_mode!r} has no torchvision v2 equivalent; use one of "
                             f"{sorted(_V2_PAD_MODES)} or data.interpolation=pil_bicubic")
        super().__init__(resolve_info(name, num_classes, resolution, timesteps, kind="online"), batch_size,
                         num_workers, pin_memory, drop_last, seed)
        self.encoder = _encoder_for(encoder, self.info)
        self._mixup_op = mixup_choice(self.num_classes) if self.mixup else None  # built once, used every batch
        self.augment = build_event_augment(augment, self.num_classes)  # on the events, after the converter
        self.name, self.source, self.source_type, self.hf_config = name, str(source), source_type, hf_config
        self.data_dir = Path(data_dir)
        self.train_split, self.val_split = train_split, val_split
        self.image_column, self.label_column = image_column, label_column
        self.val_fraction = float(val_fraction)
        self.train_aug, self.aug_family = train_aug, aug_family
        self.source_size = as_size(source_size, "source_size")
        self.crop_padding, self.pad_mode, self.hflip = int(crop_padding), _PAD_MODES[pad_mode], float(hflip)
        self.test_resize = None if test_resize is None else int(test_resize)
        self.rrc_scale, self.rrc_ratio = tuple(float(s) for s in rrc_scale), tuple(float(r) for r in rrc_ratio)
        self.pad_mode_name = pad_mode

    # ---- worker-side transforms
    @property
    def official(self) -> bool:
        """The official torchvision v2 pipeline in the workers (interpolation bilinear / bicubic)."""
        return self.interpolation != "pil_bicubic"

    def _v2_ops(self, train: bool) -> list:
        """The official scripts' v2.Compose of this recipe (without PILToTensor / ToDtype)."""
        from torchvision.transforms import InterpolationMode, v2

        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[self.interpolation]
        size = list(self.resolution)
        if not train or self.train_aug == "none":
            if self.test_resize is not None:  # ImageNet: Resize(256), CenterCrop(224)
                return [v2.Resize(self.test_resize, interpolation=mode), v2.CenterCrop(size)]
            return [v2.Resize(size, interpolation=mode)]
        ops: list = []
        if self.aug_family == "cifar":
            if self.train_aug == "baseline2":
                ops += [v2.Pad(self.crop_padding, padding_mode=_V2_PAD_MODES[self.pad_mode_name]),
                        v2.RandomCrop(list(self.source_size))]
            ops.append(v2.Resize(size, interpolation=mode))
        elif self.train_aug == "baseline2":
            ops.append(v2.RandomResizedCrop(size, scale=self.rrc_scale, ratio=self.rrc_ratio, interpolation=mode))
        else:
            ops.append(v2.Resize(size, interpolation=mode))
        if self.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(self.hflip))
        return ops

    def _eval_transform(self):
        if self.official:
            return OfficialTransform(self._v2_ops(train=False))
        if self.test_resize is not None:
            return _ResizeCenterCrop(self.test_resize, self.resolution)
        return _Resize(self.resolution)

    def _train_transform(self):
        if self.official:
            return OfficialTransform(self._v2_ops(train=True))
        if self.train_aug == "none":
            return self._eval_transform()
        if self.aug_family == "cifar":
            return _Resize(self.source_size)
        if self.train_aug == "baseline2":
            return _RandomResizedCrop(self.resolution, self.rrc_scale, self.rrc_ratio)
        return _Resize(self.resolution)

    # ---- loading
    def _kind(self) -> str:
        if self.source_type in ("imagefolder", "parquet") and not any(ch in self.source for ch in "*?["):
            if not Path(self.source).exists():
                layout = "parquet files"
                if self.source_type == "imagefolder":
                    layout = ("<source>/train/<class>/<image> and <source>/val/<class>/<image>, "
                              "or <source>/<class>/<image> with val_split=null")
                raise DatasetUnavailableError(f"{self.name}: source {self.source!r} does not exist "
                                              f"(expected {layout}); set data.source to where the images are")
        if self.source_type != "auto":
            return self.source_type
        try:
            return detect_kind(self.source)
        except SourceError as exc:
            raise DatasetUnavailableError(f"{self.name}: {exc}") from None

    def _resolved_val_split(self, kind: str) -> str | None:
        if self.val_split != "auto":
            return self.val_split
        if kind != "imagefolder":
            return "test"
        root = Path(self.source)
        for name in _VAL_FOLDERS:
            if (root / name).is_dir() and (root / self.train_split).is_dir():
                return name
        return None

    def _open(self, kind: str, wanted: "OrderedDict[str, str]"):
        cache = str(self.data_dir / "hf-cache")
        try:
            return open_source(self.source, kind, wanted, self.hf_config, self.image_column, self.label_column,
                                cache, None)
        except SourceError as exc:
            if exc.__cause__ is None:  # bad content (columns, labels, empty): the message says what
                raise
            hint = ""
            if not Path(self.source).exists():
                hint = (f"\nTo use a local copy, download it where you have network:\n  hf download {self.source} "
                        f"--repo-type dataset --local-dir <folder>\n"
                        f"and point the data config at it: data.source=<folder>")
            if "validation" in wanted:
                hint += (f"\n(The validation split is {wanted['validation']!r}; for a source without one, "
                         "data.val_split=null makes a seeded stratified split of the training split.)")
            raise DatasetUnavailableError(f"{self.name}: {exc}{hint}") from exc

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        kind = self._kind()
        val = self._resolved_val_split(kind)
        wanted = OrderedDict([("train", self.train_split)])
        if val is not None:
            wanted["validation"] = val
        src = self._open(kind, wanted)
        self.class_names = list(src.class_names)
        mapping = class_targets(self.class_names, self.num_classes, f"{self.name} ({self.source})")
        per_split = {}
        for sp in src.splits:
            targets = np.asarray([mapping[c] for c in sp.classes], dtype=np.int64)
            per_split[sp.name] = (sp, targets)
        train_sp, train_targets = per_split["train"]
        if val is None:
            tr, va = stratified_split(train_targets, self.val_fraction, self.seed)
            parts = {"train": (train_sp, tr), "validation": (train_sp, va)}
            labels = {"train": f"{self.train_split}[train]", "validation": f"{self.train_split}[validation]"}
            log.info("%s: no validation split; made a stratified one (%d / %d, seed %d)", self.name, len(tr), len(va),
                     self.seed)
        else:
            parts = {k: (per_split[k][0], np.arange(per_split[k][0].count)) for k in ("train", "validation")}
            labels = {"train": self.train_split, "validation": val}
        for key, (sp, rows) in parts.items():
            if len(rows) == 0:
                raise DatasetUnavailableError(f"{self.name}: split {labels[key]!r} of {self.source} is empty")
            targets = per_split[sp.name][1][rows]
            train = key == "train"
            transform = self._train_transform() if train else self._eval_transform()
            seed = _run_seed(getattr(self, "seed", None)) if train and self.official else None
            self.datasets[key] = ImageSet(sp.reader, rows, targets, transform, labels[key], seed)

    # ---- device side
    def augment_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training augmentation on the device: uint8 [B, 3, h, w] -> [B, 3, H, W] (uint8 or float in [0, 1])."""
        x = images
        if self.train_aug == "none" or self.official:  # official: augmented in the workers (v2)
            return x
        if self.aug_family == "cifar" and self.train_aug == "baseline2" and self.crop_padding > 0:
            x = random_crop(x, tuple(x.shape[-2:]), self.crop_padding, self.pad_mode, generator=generator)
        if self.hflip > 0:  # flip commutes with the resize below; flipping the small image is cheaper
            x = random_hflip(x, self.hflip, generator=generator)
        if tuple(x.shape[-2:]) != self.resolution:
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            x = F.interpolate(x, size=self.resolution, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        return x

    def to_events(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images [B, 3, h, w] (on any device) -> events [T, B, 2, H, W] (converter's dtype).

        ``train``: augment + converter in train mode (random directions); else the converter in
        eval mode (canonical directions) on the worker-resized images.
        """
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 3, h, w], got shape {tuple(images.shape)}")
        enc = self.encoder.to(images.device)  # buffers only: a no-op once it sits on the device
        compute_dtype = None
        if train:
            x = self.augment_images(images, generator)
            enc.train()
            compute_dtype = self.conversion_dtype(images.device)
        else:
            x = images
            enc.eval()
        if tuple(x.shape[-2:]) != self.resolution:
            raise ValueError(f"images of size {tuple(x.shape[-2:])} reached the converter; the config's resolution "
                             f"is {self.resolution}")
        return enc(x, generator=generator, compute_dtype=compute_dtype)

    def conversion_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype of the training conversion's response: the official scripts run the in-model
        converter inside ``torch.amp.autocast(device_type="cuda")``, so with a mixed-precision
        trainer on CUDA its conv2d rounds to float16 (``train_conversion="autocast"``, default);
        None (float32) on CPU, with 32-bit trainers, or with ``train_conversion="float32"``."""
        if self.train_conversion != "autocast" or device.type != "cuda" or self.trainer is None:
            return None
        return _AUTOCAST_DTYPES.get(str(self.trainer.precision))

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        images, targets = batch
        train = self.trainer is not None and self.trainer.training
        if train and self.mixup and mixup_active(self.trainer.current_epoch, self.trainer.max_epochs):
            from torchvision.transforms.v2.functional import to_dtype

            floats = to_dtype(images, torch.float32, scale=True)  # the official ToDtype, then the mix
            mixed, soft = mixup_cutmix(floats, targets, self.num_classes, op=self._mixup_op)
            events, soft = augment_batch(self, self.to_events(mixed, True), soft)  # [T, B, 2, H, W], [B, K]
            return events, targets, soft
        return augment_batch(self, self.to_events(images, train), targets)  # event augmentation: training only
