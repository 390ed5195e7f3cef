"""The standard I2E preprocessing of a source image: RGB, bicubic resize to (H, W), [0, 1].

This is what the released datasets went through before conversion. Values are returned as
uint8 [3, H, W] (the converter divides by 255, exactly as torchvision's ToTensor does), so
batches cross process boundaries at a quarter of the float32 size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["to_rgb", "preprocess_image"]


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Any PIL mode (L, P, RGBA, I;16, CMYK, ...) -> RGB; raises naming ``where`` if impossible."""
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit grayscale: scale to 8 bit before the RGB conversion.
            arr = np.asarray(img, dtype=np.float64)
            hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{where}: cannot convert image mode {img.mode!r} to RGB ({exc})") from None


def preprocess_image(img: Image.Image, size: tuple[int, int], where: str = "image") -> torch.Tensor:
    """PIL image -> uint8 tensor [3, H, W]: RGB, bicubic resize to ``size`` = (H, W)."""
    h, w = size
    img = to_rgb(img, where)
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]
