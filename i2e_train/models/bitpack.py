"""Spike tensors saved as bits for the backward pass, on any device.

A spike tensor holds only 0.0 and 1.0; `pack_spikes` stores it as 1 bit per element
(uint8 bytes, element i = bit ``i % 8`` of byte ``i // 8``, in the tensor's memory order) and
`unpack_spikes` rebuilds exactly the same tensor: same values (+0.0 / +1.0), shape, dtype,
device and memory format (contiguous or channels-last). On CPU float32 tensors the numba kernel
(`i2e_train.kernels.spikes`) does it and checks for free that the values are spikes; on
other devices (or with ``I2E_CPU_KERNELS=0``) plain tensor operations do it, without a host
synchronisation: an input the caller cannot vouch for (``trusted=False``) is checked on CPU only;
on other devices it is not packed (the check would read a device value on the host every step).
Whatever cannot be packed exactly (other values, other strides) is reported
with ``None`` and the caller keeps the tensor as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from i2e_train import kernels

__all__ = ["SpikeLayout", "pack_spikes", "unpack_spikes"]

_ONE_BITS = 0x3F800000  # float32 +1.0


class SpikeLayout(NamedTuple):
    """What `unpack_spikes` needs besides the bits: the tensor's shape, dtype, device and
    whether its memory order is channels-last ([N, H, W, C] in memory for an [N, C, H, W] tensor)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    channels_last: bool


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """x flattened in its memory order (a view) and whether it is channels-last, or None."""
    if x.is_contiguous():
        return x.reshape(-1), False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1), True
    return None


def _use_kernel(x: torch.Tensor) -> bool:
    """Whether the numba kernel packs / unpacks tensors like ``x``."""
    return x.dtype == torch.float32 and kernels.cpu_enabled("spikes", x)


def _pack_torch(flat: torch.Tensor, trusted: bool) -> torch.Tensor | None:
    if not trusted:
        if flat.device.type != "cpu":  # a check would read a device value on the host: keep x as it is
            return None
        if not bool(((flat == 1) | ((flat == 0) & ~torch.signbit(flat))).all()):  # exactly +0.0 or +1.0
            return None
    nonzero = flat != 0
    pad = (-flat.numel()) % 8
    if pad:
        nonzero = torch.cat([nonzero, nonzero.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)  # made on the device: no host copy
    return (nonzero.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)  # distinct bits: sum = or


def pack_spikes(x: torch.Tensor, trusted: bool = False) -> tuple[torch.Tensor, SpikeLayout] | None:
    """``(bits uint8 [ceil(numel/8)], layout)`` of the spike tensor x, or None when x cannot be
    packed losslessly (a value other than +0.0 / +1.0, or strides other than contiguous or
    channels-last). ``trusted=True``: the caller guarantees spikes (the output of a spiking
    neuron), so the tensor-operation path skips its check; the CPU kernel always checks. Off CPU
    an untrusted tensor gives None (see the module docstring)."""
    if not x.is_floating_point() or x.numel() == 0:
        return None
    order = _memory_order(x)
    if order is None:
        return None
    flat, channels_last = order
    layout = SpikeLayout(x.shape, x.dtype, x.device, channels_last)
    if _use_kernel(x):
        kernels.use_threads(torch.get_num_threads())
        bits = kernels.empty(((flat.numel() + 7) // 8,), torch.uint8)
        ok = kernels.load("spikes").pack_spikes(flat.view(torch.int32).numpy().view("uint32"), bits.numpy())
        return (bits, layout) if ok else None
    bits = _pack_torch(flat, trusted)
    return None if bits is None else (bits, layout)


def unpack_spikes(bits: torch.Tensor, layout: SpikeLayout) -> torch.Tensor:
    """The tensor that `pack_spikes` packed into ``bits``, bit for bit (a new tensor)."""
    shape, dtype, device, channels_last = layout
    physical = (shape[0], shape[2], shape[3], shape[1]) if channels_last else tuple(shape)
    numel = 1
    for s in shape:
        numel *= int(s)
    if dtype == torch.float32 and kernels.cpu_enabled("spikes", bits):
        kernels.use_threads(torch.get_num_threads())
        flat = kernels.empty((numel,), dtype)
        kernels.load("spikes").unpack_spikes(bits.numpy(), flat.numpy())
    else:
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        flat = bits.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).reshape(-1)[:numel].to(dtype)
    x = flat.view(physical)
    return x.permute(0, 3, 1, 2) if channels_last else x
