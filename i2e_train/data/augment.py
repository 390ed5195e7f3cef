"""Batched augmentations that run on the training device.

Event space (pre-converted I2E data): random crop with zero padding and horizontal flip on
events [T, B, C, H, W], one random draw per sample. Image space (online mode, before the
converter) lives beside them so that both pipelines share one implementation of the per-sample crop.

The official scripts' two optional batch augmentations (both off in every recipe):
- ``mixup_cutmix``: ``v2.RandomChoice([v2.CutMix(num_classes), v2.MixUp(num_classes)])`` on a
  batch, giving soft targets [B, K]; the scripts apply it while ``epoch <= epochs * 2 / 3``
  (``mixup_active``) with the loss on the soft targets and the accuracy on the hard labels;
- ``temporal_delete``: keep ``keep`` of the T frames, chosen at random and kept in order
  (``--t_train``).
They are plain functions on [B, ...] / [T, B, ...] tensors with an optional ``generator``, so
other augmentations can be composed with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop", "random_hflip", "EventAugment", "mixup_cutmix", "mixup_active", "temporal_delete",
           "TemporalDelete"]


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


# --------------------------------------------------------------------------- the official options
def mixup_active(epoch: int, max_epochs: int) -> bool:
    """The official schedule: MixUp/CutMix while ``epoch <= epochs * 2 / 3`` (epochs counted from 0)."""
    return int(epoch) <= int(max_epochs) * 2 / 3


def mixup_choice(num_classes: int):
    """The official ``v2.RandomChoice([v2.CutMix(num_classes=K), v2.MixUp(num_classes=K)])``. It
    holds no state between calls: build it once (its Beta distributions are made here), not per batch."""
    from torchvision.transforms import v2

    return v2.RandomChoice([v2.CutMix(num_classes=int(num_classes)), v2.MixUp(num_classes=int(num_classes))])


def mixup_cutmix(x: torch.Tensor, labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None,
                 batch_dim: int = 0, op=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``v2.RandomChoice([v2.CutMix(num_classes=K), v2.MixUp(num_classes=K)])`` on a batch.

    ``x``: float [B, C, H, W] images (the official use: the online mode's images before the
    converter), or any float [..., H, W] tensor with the samples on ``batch_dim`` (events
    [T, B, C, H, W]: batch_dim=1; one box / one lambda for the whole sample, as torchvision
    treats a video). ``labels``: int64 [B]. Returns (mixed x, soft targets float32 [B, K]).

    torchvision draws the choice, lambda and box from torch's global generator (as the official
    scripts); with ``generator`` they come from a seed drawn from it instead (the global
    generator is left as it was). ``op``: a `mixup_choice` built earlier (else one is built).
    """
    if not x.is_floating_point():
        raise TypeError(f"mixup_cutmix needs float inputs (scale uint8 images first), got {x.dtype}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[batch_dim]:
        raise ValueError(f"labels must be [B] with B = x.shape[{batch_dim}] = {x.shape[batch_dim]}, "
                         f"got {tuple(labels.shape)}")
    op = mixup_choice(num_classes) if op is None else op
    xb = x.movedim(batch_dim, 0)
    flat = xb.reshape(xb.shape[0], -1, *xb.shape[-2:])  # [B, C', H, W]: one box per sample
    if generator is None:
        mixed, soft = op(flat, labels)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mixed, soft = op(flat, labels)
    return mixed.reshape(xb.shape).movedim(0, batch_dim), soft.float()


def temporal_delete(events: torch.Tensor, keep: int, generator: torch.Generator | None = None,
                    time_dim: int = 0) -> torch.Tensor:
    """Keep ``keep`` of the T frames of ``events`` (time on ``time_dim``: 0 for [T, B, C, H, W]),
    drawn without replacement for the whole batch and kept in time order (the official
    ``--t_train``). ``keep`` <= 0 or >= T returns the events unchanged."""
    steps = events.shape[time_dim]
    if keep <= 0 or keep >= steps:
        return events
    dev = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.randperm(steps, generator=generator, device=dev)[:keep].sort().values
    return events.index_select(time_dim, chosen.to(events.device))


class TemporalDelete:
    """``temporal_delete`` as a training batch transform of events [T, B, C, H, W] (module.t_train)."""

    def __init__(self, keep: int = 0) -> None:
        if int(keep) < 0:
            raise ValueError(f"t_train (frames kept) must be >= 0, got {keep}")
        self.keep = int(keep)

    def __call__(self, events: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return temporal_delete(events, self.keep, generator, time_dim=0)

    def __repr__(self) -> str:
        return f"TemporalDelete(keep={self.keep})"
