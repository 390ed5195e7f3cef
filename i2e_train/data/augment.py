"""Batched augmentations that run on the training device, one random draw per sample.

Event space (pre-converted I2E data): random crop with zero padding and horizontal flip on
events [T, B, C, H, W]. Image space (online mode, before the converter) lives beside them so
that both pipelines share one implementation of the per-sample crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop", "random_hflip", "EventAugment"]


def random_crop(
    x: torch.Tensor, size: tuple[int, int], padding: int = 0, pad_mode: str = "constant",
    generator: torch.Generator | None = None, batch_dim: int = 0,
) -> torch.Tensor:
    """Per-sample random crop of ``size`` after padding the last two dims by ``padding``.

    ``x`` is [..., H, W] with the sample axis at ``batch_dim`` (0 for images [B, C, H, W],
    1 for events [T, B, C, H, W]). ``pad_mode``: "constant" (zeros), "replicate" (edge), ...
    """
    h, w = size
    if padding:
        lead = x.shape[:-2]
        flat = x.reshape(-1, 1, *x.shape[-2:])
        if pad_mode != "constant" and not flat.is_floating_point():
            flat = F.pad(flat.float(), (padding,) * 4, mode=pad_mode).to(x.dtype)
        else:
            flat = F.pad(flat, (padding,) * 4, mode=pad_mode)
        x = flat.reshape(*lead, *flat.shape[-2:])
    hp, wp = x.shape[-2:]
    if hp < h or wp < w:
        raise ValueError(f"cannot crop {size} out of {(hp, wp)}")
    b = x.shape[batch_dim]
    dev = x.device
    oy = torch.randint(0, hp - h + 1, (b,), device=dev, generator=generator)
    ox = torch.randint(0, wp - w + 1, (b,), device=dev, generator=generator)
    rows = oy[:, None] + torch.arange(h, device=dev)  # [B, h]
    cols = ox[:, None] + torch.arange(w, device=dev)  # [B, w]
    xb = x.movedim(batch_dim, 0)  # [B, ..., Hp, Wp]
    lead = xb.shape[1:-2]
    xb = xb.reshape(b, -1, hp, wp)  # [B, K, Hp, Wp]
    idx = torch.arange(b, device=dev)[:, None, None]
    out = xb.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # [B, h, w, K]
    out = out.permute(0, 3, 1, 2).reshape(b, *lead, h, w)
    return out.movedim(0, batch_dim)


def random_hflip(
    x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None, batch_dim: int = 0
) -> torch.Tensor:
    """Flip the last axis of each sample (axis ``batch_dim``) with probability ``p``."""
    if p <= 0:
        return x
    b = x.shape[batch_dim]
    flip = torch.rand(b, device=x.device, generator=generator) < p
    shape = [1] * x.dim()
    shape[batch_dim] = b
    return torch.where(flip.view(shape), x.flip(-1), x)


class EventAugment:
    """Random crop (zero padding) + horizontal flip for events [T, B, C, H, W]."""

    def __init__(self, crop_padding: int = 0, hflip: float = 0.0) -> None:
        if crop_padding < 0 or not 0.0 <= hflip <= 1.0:
            raise ValueError(f"crop_padding must be >= 0 and hflip in [0, 1], got {crop_padding}, {hflip}")
        self.crop_padding = int(crop_padding)
        self.hflip = float(hflip)

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip > 0

    def __call__(self, events: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.crop_padding:
            events = random_crop(events, events.shape[-2:], self.crop_padding, generator=generator, batch_dim=1)
        if self.hflip:
            events = random_hflip(events, self.hflip, generator=generator, batch_dim=1)
        return events

    def __repr__(self) -> str:
        return f"EventAugment(crop_padding={self.crop_padding}, hflip={self.hflip})"
