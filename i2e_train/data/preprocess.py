"""Preprocessing of a source image before conversion: RGB, uint8 tensor, resize to (H, W).

The official pipeline (the training scripts' ``get_dataset`` and the dataset notebooks that made
the released I2E-CIFAR10/100 and I2E-ImageNet) is torchvision ``v2`` on uint8 tensors:
``PILToTensor`` then ``v2.Resize`` (default **bilinear**, antialias on), then
``ToDtype(float32, scale=True)``; the last step happens in the converter (``I2E.intensity``
scales uint8 exactly as ``ToDtype``). Values are returned as uint8 [3, H, W], so batches cross
process boundaries at a quarter of the float32 size.

``interpolation`` (a named choice everywhere it is offered):
- ``"bilinear"``: ``v2.Resize`` default, the official code (training scripts and notebooks);
- ``"bicubic"``: ``v2.Resize(..., BICUBIC)`` on the uint8 tensor, the dataset card's protocol
  (for the released configs without a notebook: MNIST, Fashion-MNIST, Caltech, Mini-ImageNet);
- ``"pil_bicubic"``: PIL's bicubic resize of the image, i2e-train's preprocessing before the
  recipe audit (close to, but not the same pixels as, either of the above).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["INTERPOLATIONS", "check_interpolation", "to_rgb", "to_uint8", "resize_uint8", "preprocess_image"]

INTERPOLATIONS = ("bilinear", "bicubic", "pil_bicubic")


def check_interpolation(interpolation: str, where: str = "interpolation") -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where} must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r} "
                         "(bilinear = the official code, bicubic = the dataset card, pil_bicubic = earlier i2e-train)")
    return interpolation


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


def to_uint8(img: Image.Image, where: str = "image") -> torch.Tensor:
    """PIL image -> RGB -> uint8 [3, h, w] (``v2.PILToTensor``)."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(to_rgb(img, where))


def resize_uint8(x: torch.Tensor, size, interpolation: str = "bilinear") -> torch.Tensor:
    """``v2.Resize(size, interpolation, antialias=True)`` of uint8 [..., h, w] (``size`` an int
    for the shorter side, or (H, W)). ``interpolation``: "bilinear" or "bicubic"."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
    return resize(x, list(size) if not isinstance(size, int) else [size], interpolation=mode, antialias=True)


def preprocess_image(img: Image.Image, size: tuple[int, int], where: str = "image",
                     interpolation: str = "bilinear", resize_shorter: int | None = None) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, H, W]: RGB, resize to ``size`` = (H, W) (see the module doc);
    with ``resize_shorter``: the shorter side resized to it, then a centre crop of ``size``
    (``v2.Resize(resize_shorter), v2.CenterCrop(size)``: the official ImageNet validation)."""
    h, w = size
    if resize_shorter is not None:
        from torchvision.transforms.v2.functional import center_crop

        if check_interpolation(interpolation) == "pil_bicubic":
            import torchvision.transforms.functional as TF
            from torchvision.transforms import InterpolationMode

            img = TF.resize(to_rgb(img, where), int(resize_shorter), interpolation=InterpolationMode.BICUBIC)
            return center_crop(to_uint8(img, where), [h, w])
        return center_crop(resize_uint8(to_uint8(img, where), int(resize_shorter), interpolation), [h, w])
    if check_interpolation(interpolation) == "pil_bicubic":
        img = to_rgb(img, where)
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]
    x = to_uint8(img, where)
    if tuple(x.shape[-2:]) != (h, w):
        x = resize_uint8(x, (h, w), interpolation)
    return x
