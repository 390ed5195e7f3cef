"""The embedded default dataset: scikit-learn's digits as an I2E parquet, built offline.

1,797 real 8x8 grayscale digits (values 0..16, shipped inside scikit-learn) go through the
standard I2E preprocessing (scaled to 8 bit, RGB, PIL bicubic resize to 32x32: "pil_bicubic") and the converter
in evaluation mode (ratio 0.10 as for MNIST, order preset 4) into the released schema:
``<root>/I2E-Digits/{train,validation}-00000-of-00001.parquet`` plus a dataset card, with a
fixed stratified 80/20 split (1,437 / 360). The build is deterministic: rebuilding gives the
same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from i2e_train.files import atomic_write_json
from i2e_train.codec import encode_record
from i2e_train.data.catalog import get_info
from i2e_train.data.preprocess import preprocess_image
from i2e_train.data.writer import shard_name, write_card, write_shard
from i2e_train.i2e import I2E

__all__ = ["NAME", "build_digits", "digits_split"]

NAME = "I2E-Digits"
_SPLIT_SEED = 0
_VAL_FRACTION = 0.2


def digits_split() -> dict[str, np.ndarray]:
    """Fixed stratified split of the 1,797 digits: split name -> sorted sample indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    tr, va = train_test_split(
        np.arange(len(y)), test_size=_VAL_FRACTION, stratify=y, random_state=_SPLIT_SEED
    )
    return {"train": np.sort(tr), "validation": np.sort(va)}


def _images(size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """All digits preprocessed: uint8 [N, 3, H, W] and labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs8 = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [N, 8, 8]
    batch = torch.stack(
        [preprocess_image(Image.fromarray(im, mode="L"), size, f"digit {i}", "pil_bicubic") for i, im in enumerate(imgs8)]
    )
    return batch, d.target


def build_digits(root: str | Path, force: bool = False) -> Path:
    """Build (or reuse) the demo parquet under ``root``; returns ``root``.

    An existing build is reused when its recorded parameters match; otherwise it is rebuilt.
    """
    info = get_info(NAME)
    root = Path(root)
    params = {"name": NAME, "resolution": list(info.resolution), "ratio": info.ratio, "order": info.order,
              "split_seed": _SPLIT_SEED, "val_fraction": _VAL_FRACTION, "format": 1}
    stamp = root / NAME / "build.json"
    if not force and stamp.exists() and json.loads(stamp.read_text()) == params:
        if all((root / NAME / shard_name(s, 0, 1)).exists() for s in ("train", "validation")):
            return root
    images, labels = _images(info.resolution)
    conv = I2E(ratio=info.ratio, order=info.order, dtype=torch.bool).eval()
    with torch.no_grad():
        events = conv(images)  # [T, N, 2, H, W] bool
    class_names = [str(c) for c in range(info.num_classes)]
    for split, idx in digits_split().items():
        write_shard(
            root / NAME / shard_name(split, 0, 1),
            file_paths=[f"{labels[i]}/{i:04d}.npy" for i in idx],
            labels=[int(labels[i]) for i in idx],
            records=[encode_record(events[:, i]) for i in idx],
            class_names=class_names,
        )
    write_card(
        root,
        {NAME: ["train", "validation"]},
        body=(
            f"# {NAME}\n\nscikit-learn digits converted by I2E (ratio {info.ratio}, order preset "
            f"{info.order}, {info.resolution[0]}x{info.resolution[1]}), released I2E schema.\n"
        ),
    )
    atomic_write_json(stamp, params, indent=1)
    return root
