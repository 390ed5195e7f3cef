"""Shared fixtures: tiny data made by the tests themselves."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Hermetic datasets cache: the Arrow cache of an earlier code version must not answer for this one
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="i2e-test-hf-datasets-"))
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def real_images() -> torch.Tensor:
    """Two real photographs shipped with scikit-learn, resized to 128x128: uint8 [2, 3, 128, 128]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from i2e_train.data.preprocess import preprocess_image

    imgs = load_sample_images().images
    return torch.stack([preprocess_image(Image.fromarray(im), (128, 128)) for im in imgs])


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> str:
    from i2e_train.data.digits import build_digits

    return str(build_digits(tmp_path_factory.mktemp("digits")))


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def cuda_available() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
