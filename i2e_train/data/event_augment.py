"""Event augmentation on the training device, batched, composable in config (``data.augment=[...]``).

Each entry of ``data.augment`` is a name or a mapping ``{name: <op>, <argument>: <value>, ...}``;
the entries run in order on every training batch, for I2E events (0/1) and for real-recording
frames (event counts) alike, after the batch reached the device (``on_after_batch_transfer``):

    data.augment=[nda]                                   # NDA's policies, one per sample
    'data.augment=[nda,{name: nda_cutmix, p: 0.5}]'      # + NDA's CutMix on half the batches
    'data.augment=[{name: event_drop}]'                  # EventDrop: one of its three drops per sample

Operations (events [T, B, C, H, W]; one random draw per sample unless said otherwise):

* ``roll``, ``rotate``, ``shear``, ``nda`` -- the geometric policies of NDA (Li et al., "Neuromorphic
  Data Augmentation for Training Spiking Neural Networks", ECCV 2022): a circular shift by up to
  ``max_shift`` pixels, a rotation by up to ``max_degrees``, a horizontal shear by up to
  ``max_shear``; ``nda`` applies one of the three, chosen per sample. Pixels move whole (nearest
  neighbour, zeros where nothing maps), so events stay 0/1 and counts stay integers.
* ``nda_cutmix`` -- NDA's CutMix of event frames: each sample gets a box (area ``1 - lam``,
  ``lam ~ Beta(alpha, alpha)`` per sample) from another sample of the batch (a permutation), at
  every time step; the labels mix by the box's true area (they sum to 1).
* ``drop_random``, ``drop_time``, ``drop_area``, ``event_drop`` -- EventDrop (Gu et al.,
  "EventDrop: Data Augmentation for Event-based Learning", IJCAI 2021) on frames: every event
  dropped with probability ``p ~ U(0, max_ratio)`` (counts thinned binomially), the events of a
  random time window (length up to ``max_ratio`` of T) removed, the events of a random box
  (side up to ``max_ratio`` of the frame) removed; ``event_drop`` applies one of identity or the
  three drops, chosen per sample, as the paper does.
* ``crop``, ``hflip`` -- random crop after zero padding and horizontal flip
  (`i2e_train.data.augment`).
* ``mixup_cutmix``, ``temporal_delete`` -- the official scripts' options as entries:
  torchvision's ``RandomChoice([CutMix, MixUp])`` on the event batch (MixUp blends, so 0/1 events
  become fractions; labels soft), and ``--t_train`` (keep ``keep`` of the T frames, in order).

Random numbers: every training batch gets its own generator on the batch's device, seeded by
(the data seed, epoch, batch index in the epoch, rank), the same key the resumable training order
uses, so a run resumed mid-epoch augments the following batches exactly as the uninterrupted
run, and the global RNG is left alone. Labels become soft ``[B, K]`` float targets only when a
mixing entry is present (the loss takes them; the accuracy uses their argmax).

Other entries can be added with `register_augment` (a class taking its arguments as keyword
arguments, whose instances are called as ``op(events, targets, generator) -> (events, targets)``).
The legacy mapping form ``data.augment={crop_padding: 4, hflip: 0.5}`` keeps its behaviour
(`i2e_train.data.augment.EventAugment`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from i2e_train.data.augment import EventAugment, random_crop, random_hflip, temporal_delete
from i2e_train.naming import unknown_name

__all__ = ["EventPipeline", "build_event_augment", "register_augment", "augment_batch", "batch_generator",
           "AUGMENTS"]

AUGMENTS: dict[str, type] = {}


def register_augment(name: str) -> Callable[[type], type]:
    """Register a class as ``data.augment`` entry ``name``."""

    def deco(cls: type) -> type:
        AUGMENTS[name] = cls
        return cls

    return deco


# --------------------------------------------------------------------------- helpers
def _uniform(b: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=g, device=device)


def _chosen(b: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    """Which samples an op applies to (probability ``p`` each), bool [B]."""
    return torch.rand(b, generator=g, device=device) < p


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample (axis 1 of [T, B, ...]): ``a`` where mask, else ``b``."""
    return torch.where(mask.view(1, -1, *([1] * (a.dim() - 2))), a, b)


def _affine(events: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample affine warp of events [T, B, C, H, W] by ``theta`` [B, 2, 3] (normalised
    coordinates), nearest neighbour, zeros outside: every output pixel is one input pixel or 0."""
    t, b, c, h, w = events.shape
    x = events.permute(1, 0, 2, 3, 4).reshape(b, t * c, h, w)
    grid = F.affine_grid(theta.to(x.dtype if x.is_floating_point() else torch.float32), [b, t * c, h, w],
                         align_corners=False)
    y = F.grid_sample(x if x.is_floating_point() else x.float(), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False).to(events.dtype)
    return y.reshape(b, t, c, h, w).permute(1, 0, 2, 3, 4)


def _roll(events: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Circular shift of each sample by (dy, dx) pixels (int [B])."""
    t, b, c, h, w = events.shape
    dev = events.device
    rows = (torch.arange(h, device=dev)[None, :] - dy[:, None]) % h  # [B, H]
    cols = (torch.arange(w, device=dev)[None, :] - dx[:, None]) % w  # [B, W]
    idx = torch.arange(b, device=dev)[:, None, None]
    x = events.permute(1, 3, 4, 0, 2)  # [B, H, W, T, C]
    out = x[idx, rows[:, :, None], cols[:, None, :]]
    return out.permute(3, 0, 4, 1, 2)


def _box(b: int, h: int, w: int, side_h: torch.Tensor, side_w: torch.Tensor, g, device) -> torch.Tensor:
    """A box per sample (sides in pixels, int [B]) at a uniform position: bool mask [B, H, W]."""
    y0 = (torch.rand(b, generator=g, device=device) * (h - side_h + 1)).floor().long()
    x0 = (torch.rand(b, generator=g, device=device) * (w - side_w + 1)).floor().long()
    ys = torch.arange(h, device=device)[None, :]
    xs = torch.arange(w, device=device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + side_h)[:, None])
    in_x = (xs >= x0[:, None]) & (xs < (x0 + side_w)[:, None])
    return in_y[:, :, None] & in_x[:, None, :]


# --------------------------------------------------------------------------- NDA (Li et al., ECCV 2022)
class _Op:
    """Base: ``p`` = probability that a sample is augmented."""

    mixes = False

    def __init__(self, p: float = 1.0) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


@register_augment("roll")
class Roll(_Op):
    """NDA roll: circular shift by up to ``max_shift`` pixels in x and y."""

    def __init__(self, max_shift: int = 5, p: float = 1.0) -> None:
        super().__init__(p)
        self.max_shift = int(max_shift)

    def warp(self, events: torch.Tensor, g) -> torch.Tensor:
        b, dev, m = events.shape[1], events.device, self.max_shift
        dy = torch.randint(-m, m + 1, (b,), generator=g, device=dev)
        dx = torch.randint(-m, m + 1, (b,), generator=g, device=dev)
        return _roll(events, dy, dx)

    def __call__(self, events, targets, g):
        chosen = _chosen(events.shape[1], self.p, g, events.device)
        return _where(chosen, self.warp(events, g), events), targets


@register_augment("rotate")
class Rotate(Roll):
    """NDA rotate: rotation about the centre by up to ``max_degrees``."""

    def __init__(self, max_degrees: float = 15.0, p: float = 1.0) -> None:
        _Op.__init__(self, p)
        self.max_degrees = float(max_degrees)

    def warp(self, events, g):
        b, dev = events.shape[1], events.device
        a = _uniform(b, -self.max_degrees, self.max_degrees, g, dev) * (math.pi / 180)
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        return _affine(events, theta)


@register_augment("shear")
class Shear(Roll):
    """NDA shear: horizontal shear by a factor of up to ``max_shear``."""

    def __init__(self, max_shear: float = 0.3, p: float = 1.0) -> None:
        _Op.__init__(self, p)
        self.max_shear = float(max_shear)

    def warp(self, events, g):
        b, dev = events.shape[1], events.device
        s = _uniform(b, -self.max_shear, self.max_shear, g, dev)
        one, zero = torch.ones_like(s), torch.zeros_like(s)
        theta = torch.stack([torch.stack([one, s, zero], 1), torch.stack([zero, one, zero], 1)], 1)
        return _affine(events, theta)


@register_augment("nda")
class NDA(_Op):
    """NDA's geometric policy: one of roll / rotate / shear per sample (uniformly)."""

    def __init__(self, max_shift: int = 5, max_degrees: float = 15.0, max_shear: float = 0.3, p: float = 1.0) -> None:
        super().__init__(p)
        self.ops = (Roll(max_shift), Rotate(max_degrees), Shear(max_shear))

    def __call__(self, events, targets, g):
        b, dev = events.shape[1], events.device
        chosen = _chosen(b, self.p, g, dev)
        which = torch.randint(0, len(self.ops), (b,), generator=g, device=dev)
        out = events
        for i, op in enumerate(self.ops):
            out = _where(chosen & (which == i), op.warp(events, g), out)
        return out, targets


@register_augment("nda_cutmix")
class NDACutMix(_Op):
    """NDA's CutMix on event frames: a box from another sample of the batch; labels mixed by area."""

    mixes = True

    def __init__(self, alpha: float = 1.0, p: float = 1.0) -> None:
        super().__init__(p)
        if float(alpha) <= 0:
            raise ValueError(f"nda_cutmix: alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def __call__(self, events, targets, g):
        t, b, c, h, w = events.shape
        dev = events.device
        chosen = _chosen(b, self.p, g, dev)
        perm = torch.randperm(b, generator=g, device=dev)
        if self.alpha == 1.0:  # Beta(1, 1) is U(0, 1): drawn on the device, no host round trip
            lam = torch.rand(b, generator=g, device=dev, dtype=torch.float64)  # [B]
        else:  # no seeded Beta sampler on the device: drawn on the host from the batch generator's seed
            rng = np.random.default_rng([g.initial_seed(), 0xC07])  # initial_seed: a host value, no sync
            lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, b)).to(dev)  # [B], one small copy
        cut = torch.sqrt(1.0 - lam)
        box = _box(b, h, w, (cut * h).round().long(), (cut * w).round().long(), g, dev) & chosen[:, None, None]
        mixed = torch.where(box[None, :, None], events[:, perm], events)
        keep = 1.0 - box.flatten(1).float().mean(1)  # the true share of the sample's own pixels, [B]
        soft = keep[:, None] * targets + (1.0 - keep)[:, None] * targets[perm]
        return mixed, soft


# --------------------------------------------------------------------------- EventDrop (Gu et al., IJCAI 2021)
@register_augment("drop_random")
class DropRandom(_Op):
    """Drop every event with probability ``q ~ U(0, max_ratio)`` (per sample); counts thinned binomially."""

    def __init__(self, max_ratio: float = 0.1, p: float = 1.0) -> None:
        super().__init__(p)
        self.max_ratio = float(max_ratio)

    def drop(self, events, g):
        b, dev = events.shape[1], events.device
        q = _uniform(b, 0.0, self.max_ratio, g, dev).view(1, b, 1, 1, 1).expand_as(events)
        counts = events.float()
        kept = torch.binomial(counts, (1.0 - q).to(counts.dtype).contiguous(), generator=g)
        return kept.to(events.dtype)

    def __call__(self, events, targets, g):
        chosen = _chosen(events.shape[1], self.p, g, events.device)
        return _where(chosen, self.drop(events, g), events), targets


@register_augment("drop_time")
class DropTime(DropRandom):
    """Drop the events of a random time window of up to ``max_ratio`` of T (whole frames)."""

    def drop(self, events, g):
        t, b = events.shape[:2]
        dev = events.device
        length = _uniform(b, 0.0, self.max_ratio, g, dev)
        start = _uniform(b, 0.0, 1.0, g, dev) * (1.0 - length)
        pos = (torch.arange(t, device=dev, dtype=length.dtype)[:, None] + 0.5) / t  # frame centres [T, 1]
        gone = (pos >= start[None]) & (pos < (start + length)[None])  # [T, B]
        return events * (~gone).view(t, b, 1, 1, 1).to(events.dtype)


@register_augment("drop_area")
class DropArea(DropRandom):
    """Drop the events of a random box with sides up to ``max_ratio`` of the frame's."""

    def __init__(self, max_ratio: float = 0.3, p: float = 1.0) -> None:
        super().__init__(max_ratio, p)

    def drop(self, events, g):
        t, b, c, h, w = events.shape
        dev = events.device
        frac = _uniform(b, 0.0, self.max_ratio, g, dev)
        box = _box(b, h, w, (frac * h).round().long(), (frac * w).round().long(), g, dev)
        return events * (~box)[None, :, None].to(events.dtype)


@register_augment("event_drop")
class EventDrop(_Op):
    """EventDrop: per sample one of identity, random drop, drop by time, drop by area (uniformly)."""

    def __init__(self, random_ratio: float = 0.1, time_ratio: float = 0.1, area_ratio: float = 0.3,
                 p: float = 1.0) -> None:
        super().__init__(p)
        self.drops = (DropRandom(random_ratio), DropTime(time_ratio), DropArea(area_ratio))

    def __call__(self, events, targets, g):
        b, dev = events.shape[1], events.device
        chosen = _chosen(b, self.p, g, dev)
        which = torch.randint(0, len(self.drops) + 1, (b,), generator=g, device=dev)  # 0 = identity
        out = events
        for i, op in enumerate(self.drops, start=1):
            out = _where(chosen & (which == i), op.drop(events, g), out)
        return out, targets


# --------------------------------------------------------------------------- crop / flip entries
@register_augment("crop")
class Crop(_Op):
    """Random crop of the frame's size after ``padding`` zero pixels per side."""

    def __init__(self, padding: int = 4) -> None:
        super().__init__(1.0)
        self.padding = int(padding)

    def __call__(self, events, targets, g):
        return random_crop(events, tuple(events.shape[-2:]), self.padding, generator=g, batch_dim=1), targets


@register_augment("hflip")
class HFlip(_Op):
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def __call__(self, events, targets, g):
        return random_hflip(events, self.p, generator=g, batch_dim=1), targets


# --------------------------------------------------------------------------- the official options as entries
@register_augment("mixup_cutmix")
class MixUpCutMix(_Op):
    """The official scripts' ``v2.RandomChoice([v2.CutMix(), v2.MixUp()])`` (torchvision's own
    transforms) on the event batch: per batch one of CutMix (one box for the whole batch, taken
    from the previous sample, ``batch.roll(1)``) or MixUp (a blend with the previous sample, so
    0/1 events become fractions); labels mixed by torchvision (soft targets, summing to 1). Unlike
    ``data.mixup`` of the online mode it has no 2/3-of-the-epochs schedule: it mixes every batch.
    torchvision draws its choice, lambda and box on the host (from the batch generator's seed, no
    device read); the mixing itself runs on the batch's device."""

    mixes = True

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(1.0)
        if float(alpha) <= 0:
            raise ValueError(f"mixup_cutmix: alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        from torchvision.transforms import v2

        self._choice = v2.RandomChoice([v2.CutMix(alpha=self.alpha), v2.MixUp(alpha=self.alpha)])  # built once

    def __repr__(self) -> str:
        return f"MixUpCutMix(alpha={self.alpha!r})"

    def __call__(self, events, targets, g):
        xb = events.movedim(1, 0)  # [B, T, C, H, W]
        flat = xb.reshape(xb.shape[0], -1, *xb.shape[-2:])  # [B, T*C, H, W]: one box per sample, as for a video
        # torchvision draws from torch's CPU generator: seeded from the batch generator's seed (a host
        # value: no device read) inside a fork, so the global CPU state is restored and no other
        # device's generator is touched
        base = g.initial_seed() if g is not None else torch.initial_seed()
        seed = int(np.random.SeedSequence([base, 0x3C11]).generate_state(1, np.uint64)[0]) % 2**63
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            mixed, soft = self._choice(flat if flat.is_floating_point() else flat.float(), targets)
        return mixed.reshape(xb.shape).movedim(0, 1).to(events.dtype), soft


@register_augment("temporal_delete")
class TemporalDeleteEntry(_Op):
    """The official ``--t_train``: keep ``keep`` of the T frames, drawn for the whole batch and kept
    in time order (`i2e_train.data.augment.temporal_delete`; T becomes ``keep``)."""

    def __init__(self, keep: int) -> None:
        super().__init__(1.0)
        if int(keep) < 1:
            raise ValueError(f"temporal_delete: keep (frames kept) must be >= 1, got {keep!r}")
        self.keep = int(keep)

    def __call__(self, events, targets, g):
        return temporal_delete(events, self.keep, generator=g, time_dim=0), targets


# --------------------------------------------------------------------------- the pipeline
class EventPipeline:
    """The ``data.augment`` entries in order; ``num_classes`` turns labels into soft targets when
    an entry mixes samples."""

    def __init__(self, ops: Sequence[Any], num_classes: int) -> None:
        self.ops = list(ops)
        self.num_classes = int(num_classes)

    @property
    def active(self) -> bool:
        return bool(self.ops)

    @property
    def mixes(self) -> bool:
        return any(getattr(op, "mixes", False) for op in self.ops)

    def __call__(self, events: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """events [T, B, C, H, W], targets int64 [B] -> augmented events, targets ([B, K] float if mixed)."""
        if self.mixes and targets.dim() == 1:
            targets = F.one_hot(targets, self.num_classes).to(torch.float32)
        for op in self.ops:
            events, targets = op(events, targets, generator)
        return events, targets

    def __repr__(self) -> str:
        return f"EventPipeline({self.ops})"


def _entry(spec: Any, where: str) -> Any:
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping) and "name" in spec:
        kwargs = {str(k): v for k, v in spec.items() if k != "name"}
        name = str(spec["name"])
    else:
        raise ValueError(f"{where}: an entry is a name or a mapping with 'name' (e.g. {{name: roll, max_shift: 3}}), "
                         f"got {spec!r}")
    if name not in AUGMENTS:
        raise unknown_name(f"augmentation ({where})", name, sorted(AUGMENTS), listed="Available augmentations")
    try:
        return AUGMENTS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: augmentation {name!r}: {err}") from None


def build_event_augment(augment: Any, num_classes: int, where: str = "data.augment"):
    """``data.augment`` -> what a DataModule calls on training batches.

    None / empty: nothing. A list: an `EventPipeline` of registered entries. A mapping
    without ``name`` (``{crop_padding, hflip}``): the legacy `EventAugment`.
    """
    if augment is None:
        return EventAugment()
    if isinstance(augment, Mapping) and "name" not in augment:
        return EventAugment(**augment)
    specs = [augment] if isinstance(augment, (str, Mapping)) else list(augment)
    return EventPipeline([_entry(s, f"{where}[{i}]") for i, s in enumerate(specs)], num_classes)


def batch_generator(device: torch.device, seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
    """The generator of one training batch: a function of (seed, epoch, batch index, rank)."""
    mixed = np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(batch), int(rank), 0xA06]).generate_state(
        1, np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(mixed) % 2**63)
    return g


def augment_batch(dm: Any, events: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A DataModule's training augmentation of one batch on the device (its ``augment``), or the
    batch unchanged outside training. The generator is keyed by the trainer's position."""
    augment = getattr(dm, "augment", None)
    trainer = getattr(dm, "trainer", None)
    if augment is None or not augment.active or trainer is None or not trainer.training or events.shape[1] == 0:
        return events, targets
    if not isinstance(augment, EventPipeline):
        return augment(events), targets
    seed = getattr(dm, "seed", None)
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
    loop = trainer.fit_loop.epoch_loop
    batch = loop.batch_progress.current.ready  # the index of the batch being moved (Lightning's batch_idx)
    g = batch_generator(events.device, seed, trainer.current_epoch, batch, trainer.global_rank)
    return augment(events, targets, g)
