"""Data: the catalog of released configs, the DataModules, augmentation and dataset builders.

Names are imported on first use, so that ``i2e_train.data.catalog`` (facts only) stays cheap to
import for the model package and the config resolvers.
"""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "catalog": ["CATALOG", "DatasetInfo", "get_info", "list_datasets"],
    "base": ["EventDataModule", "DatasetUnavailableError", "DataFileError"],
    "i2e_dataset": ["I2EDataModule"], "images": ["ImageDataModule"], "dvs": ["CIFAR10DVSDataModule"],
})
