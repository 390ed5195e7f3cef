"""The authors' released weights (Hugging Face model repo ``Ruichen0424/I2E``): one row each.

Each [`ReleasedWeight`][i2e_train.models.released.ReleasedWeight] names its model, the data it was trained on (a catalog config,
whose classes, resolution and converter settings it reads from the catalog rather than
restating them), the paper's method and top-1, and the data config it is evaluated on.
``released:<name>`` (or the bare name) refers to a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Optional, Union

from i2e_train.data.catalog import DatasetInfo, get_info
from i2e_train.naming import unknown_name

__all__ = ["HF_REPO_ID", "RELEASED_PREFIX", "RELEASED_EXTENSIONS", "ReleasedWeight", "RELEASED_WEIGHTS", "find_released", "get_released",
           "released_key"]

HF_REPO_ID = "Ruichen0424/I2E"
RELEASED_PREFIX = "released:"
_SUFFIX = ".pth.tar"
# Extensions a released file may carry on the hub (the official code saves `.pth.tar`; the model
# card speaks of `.pth` files; a converted copy may be `.safetensors`), in order of preference.
RELEASED_EXTENSIONS = (".pth.tar", ".pth", ".pt", ".safetensors")
# Data config (configs/data/<name>.yaml) each released model is evaluated on: models fed by the
# converter are evaluated on the released I2E validation data (converted in eval mode).
_DATA_CONFIGS = {"I2E-CIFAR10": "i2e_cifar10", "I2E-CIFAR100": "i2e_cifar100", "I2E-ImageNet": "i2e_imagenet",
                 "CIFAR10-DVS": "cifar10dvs"}


@dataclass(frozen=True)
class ReleasedWeight:
    """One released checkpoint of the I2E paper (MS-ResNet, T = 8).

    ``dataset`` is a catalog config; ``top1`` is the paper's top-1 accuracy (%). ``input_kind``
    is ``'images'`` for models fed by the I2E converter and ``'dvs'`` for models fed by
    CIFAR10-DVS frames (event counts; no converter: ``ratio`` and ``order`` are ``None``).
    """

    name: str
    model: str
    dataset: str
    method: str
    top1: float
    repo_id: str = HF_REPO_ID

    @property
    def info(self) -> DatasetInfo:
        return get_info(self.dataset)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def resolution(self) -> int:
        return self.info.resolution[0]

    @property
    def timesteps(self) -> int:
        return self.info.timesteps

    @property
    def input_kind(self) -> str:
        return "dvs" if self.info.kind == "dvs" else "images"

    @property
    def ratio(self) -> Optional[float]:
        return self.info.ratio

    @property
    def order(self) -> Optional[int]:
        return self.info.order

    @property
    def data_config(self) -> str:
        """The data config (``configs/data/<name>.yaml``) the model is evaluated on."""
        return _DATA_CONFIGS[self.dataset]

    @property
    def filename(self) -> str:
        """File name in the Hugging Face repo, e.g. ``cifar10_baseline.pth.tar``."""
        return self.name + _SUFFIX

    @property
    def filenames(self) -> tuple[str, ...]:
        """Every file name the weight may have (name stem with each of `RELEASED_EXTENSIONS`)."""
        return tuple(self.name + ext for ext in RELEASED_EXTENSIONS)

    @property
    def url(self) -> str:
        """Where to get the file by hand."""
        return f"https://huggingface.co/{self.repo_id}"


# Paper Table (top-1, MS-ResNet, T = 8). Transfer-I on CIFAR10-DVS starts from I2E-ImageNet,
# Transfer-II from I2E-CIFAR10.
RELEASED_WEIGHTS: dict[str, ReleasedWeight] = {
    w.name: w
    for w in (
        ReleasedWeight("dvscifar10_baseline", "ms_resnet18", "CIFAR10-DVS", "Baseline", 65.6),
        ReleasedWeight("dvscifar10_transferI", "ms_resnet18", "CIFAR10-DVS", "Transfer-I", 83.1),
        ReleasedWeight("dvscifar10_transferII", "ms_resnet18", "CIFAR10-DVS", "Transfer-II", 92.5),
        ReleasedWeight("cifar10_baseline", "ms_resnet18", "I2E-CIFAR10", "Baseline-I", 85.07),
        ReleasedWeight("cifar10_augmentation", "ms_resnet18", "I2E-CIFAR10", "Baseline-II", 89.23),
        ReleasedWeight("cifar10_transfer", "ms_resnet18", "I2E-CIFAR10", "Transfer-I", 90.86),
        ReleasedWeight("cifar100_baseline", "ms_resnet18", "I2E-CIFAR100", "Baseline-I", 51.32),
        ReleasedWeight("cifar100_augmentation", "ms_resnet18", "I2E-CIFAR100", "Baseline-II", 60.68),
        ReleasedWeight("cifar100_transfer", "ms_resnet18", "I2E-CIFAR100", "Transfer-I", 64.53),
        ReleasedWeight("imagenet_baseline_18", "ms_resnet18", "I2E-ImageNet", "Baseline-I", 48.30),
        ReleasedWeight("imagenet_augmentation_18", "ms_resnet18", "I2E-ImageNet", "Baseline-II", 57.97),
        ReleasedWeight("imagenet_finetune_18", "ms_resnet18", "I2E-ImageNet", "Transfer-I", 59.28),
        ReleasedWeight("imagenet_augmentation_34", "ms_resnet34", "I2E-ImageNet", "Baseline-II", 60.50),
    )
}


def released_key(name: str) -> str:
    """``'released:cifar10_baseline.pth.tar'`` (or a path ending so) -> ``'cifar10_baseline'``."""
    name = name.strip()
    if name.startswith(RELEASED_PREFIX):
        name = name[len(RELEASED_PREFIX) :]
    name = PurePosixPath(name).name
    for ext in RELEASED_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def get_released(name: str) -> ReleasedWeight:
    """The row ``name`` (``'released:<name>'``, the bare name or its file name); ValueError with the
    closest names otherwise."""
    key = released_key(name)
    if key not in RELEASED_WEIGHTS:
        raise unknown_name("released weight", name, RELEASED_WEIGHTS, key=key, listed="Released")
    return RELEASED_WEIGHTS[key]


def find_released(source: Union[str, os.PathLike]) -> Optional[ReleasedWeight]:
    """The [`ReleasedWeight`][i2e_train.models.released.ReleasedWeight] a source names, or ``None`` when it is a path.

    ``'released:<name>'`` must name a released weight (``ValueError`` otherwise); a bare name
    (``'cifar10_baseline'`` or ``'cifar10_baseline.pth.tar'``) counts only when no file of
    that name exists.
    """
    s = os.fspath(source)
    if s.startswith(RELEASED_PREFIX):
        return get_released(s)
    if os.path.exists(s) or os.sep in s or "/" in s:
        return None
    return RELEASED_WEIGHTS.get(released_key(s))
