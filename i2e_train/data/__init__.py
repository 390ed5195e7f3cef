"""Data: the catalog of released configs, the DataModules, augmentation and dataset builders.

Names are imported on first use, so that ``i2e_train.data.catalog`` (facts only) stays cheap to
import for the model package and the config resolvers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CATALOG": "catalog", "DatasetInfo": "catalog", "get_info": "catalog", "list_datasets": "catalog",
    "EventDataModule": "base", "DatasetUnavailableError": "base", "DataFileError": "base",
    "I2EDataModule": "i2e_dataset", "ImageDataModule": "images", "CIFAR10DVSDataModule": "dvs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
