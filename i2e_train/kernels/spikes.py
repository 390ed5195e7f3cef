"""Spike tensors as bits: float32 0.0 / 1.0 <-> 1 bit per element, used by `i2e_train.models.bitpack`.

Arrays are flat views of contiguous tensors. Packed layout: element i is bit ``i % 8`` of byte
``i // 8`` (little bit order, ``np.packbits(..., bitorder='little')``); the unused bits of the
last byte are 0. 32 elements go at a time through `i2e_train.kernels.bits` (one vector
compare and one mask move, or one mask-to-vector conversion), the rest one by one, in chunks
that run in parallel. Packing also checks, for free, that every value is exactly +0.0 or +1.0:
only then is unpacking the exact inverse.
"""

from __future__ import annotations

from numba import njit, prange

from ._jit import _F32
from ._jit import JIT as _JIT
from .bits import bits_spikes_32 as _bits_spikes_32
from .bits import spike_bits_32 as _spike_bits_32

_CHUNK = 1 << 16  # elements per parallel work item (a multiple of 32)
_ZERO_BITS = 0
_ONE_BITS = 0x3F800000  # float32 1.0


@njit(parallel=True, **_JIT)
def _pack(xi, out, chunk):  # pragma: no cover - compiled
    m = xi.shape[0]
    bad = 0
    for c in prange((m + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(m, lo + chunk)
        i = lo
        while i + 32 <= hi:
            if _spike_bits_32(xi, i, out, i >> 3) != 0xFFFFFFFF:
                bad += 1
            i += 32
        for j in range(i >> 3, (hi + 7) >> 3):  # the tail (only in the last chunk)
            out[j] = 0
        for j in range(i, hi):
            v = xi[j]
            if v != _ZERO_BITS and v != _ONE_BITS:
                bad += 1
            if v != _ZERO_BITS:
                out[j >> 3] |= 1 << (j & 7)
    return bad == 0


@njit(parallel=True, **_JIT)
def _unpack(bits, out, chunk):  # pragma: no cover - compiled
    m = out.shape[0]
    for c in prange((m + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(m, lo + chunk)
        i = lo
        while i + 32 <= hi:
            _bits_spikes_32(bits, i >> 3, out, i)
            i += 32
        for j in range(i, hi):
            out[j] = _F32(1.0) if (bits[j >> 3] >> (j & 7)) & 1 else _F32(0.0)


def pack_spikes(xi, out) -> bool:
    """Pack ``xi`` (the uint32 view of float32 [M]) into ``out`` (uint8 [ceil(M/8)]).

    Returns whether every value was exactly +0.0 or +1.0 (if not, ``out`` is not a faithful copy).
    """
    return bool(_pack(xi, out, _CHUNK))


def unpack_spikes(bits, out) -> None:
    """Unpack ``bits`` (uint8 [ceil(M/8)]) into ``out`` (float32 [M]): 0.0 or 1.0 per element."""
    _unpack(bits, out, _CHUNK)
