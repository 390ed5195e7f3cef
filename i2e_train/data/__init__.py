"""Data: the catalog of released configs, DataModules, augmentation and dataset builders."""

from i2e_train.data.catalog import CATALOG, DatasetInfo, get_info, list_datasets
from i2e_train.data.dvs import CIFAR10DVSDataModule
from i2e_train.data.base import DataFileError, DatasetUnavailableError, EventDataModule
from i2e_train.data.i2e_dataset import I2EDataModule
from i2e_train.data.images import ImageDataModule

__all__ = ["CATALOG", "DatasetInfo", "get_info", "list_datasets", "I2EDataModule", "ImageDataModule",
           "CIFAR10DVSDataModule", "EventDataModule", "DatasetUnavailableError", "DataFileError"]
