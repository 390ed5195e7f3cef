"""I2E converter kernels, used by [`i2e_train.i2e.I2E`][i2e_train.i2e.I2E] on CPU (``backend="numba"``).

One parallel item per image; the same float32 maximum, uint8 scaling, range, threshold,
difference and comparisons as the tensor path, so the output is bit-identical to it (and so to
the official conv2d converter). Packed events come from `i2e_train.kernels.bits`, which
turns 32 comparisons into a 32-bit word at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._jit import _F32
from ._jit import JIT as _JIT
from .bits import event_bits_8 as _event_bits_8
from .bits import event_bits_32 as _event_bits_32


@njit(**_JIT)
def _channel_max(images, b, y, m):  # pragma: no cover - compiled
    src = images[b, 0, y]
    for x in range(m.shape[0]):
        m[x] = src[x]
    for k in range(1, images.shape[1]):
        src = images[b, k, y]
        for x in range(m.shape[0]):
            m[x] = max(m[x], src[x])


@njit(**_JIT, fastmath={"nnan", "ninf", "nsz"})
def _row_range(row, lo, hi):  # pragma: no cover - compiled (only run on rows checked finite)
    for x in range(row.shape[0]):
        lo = min(lo, row[x])
        hi = max(hi, row[x])
    return lo, hi


@njit(**_JIT)
def _sample_intensity(images, b, is_uint8, vp, m):  # pragma: no cover - compiled
    """V of image b (max over channels; uint8 * float32(1/255), torchvision's ToDtype(scale=True)) into the replicate-padded plane vp [H+2, W+2];
    returns (min, max, all finite). m: scratch row of the images' dtype."""
    h, w = images.shape[2], images.shape[3]
    scale = _F32(1.0 / 255.0)  # v2.ToDtype(float32, scale=True): x.to(float32).mul_(1 / 255)
    lo = _F32(np.inf)
    hi = _F32(-np.inf)
    finite = True
    for y in range(h):
        _channel_max(images, b, y, m)
        row = vp[y + 1, 1 : w + 1]
        if is_uint8:
            for x in range(w):
                row[x] = _F32(m[x]) * scale
        else:
            ok = True
            for x in range(w):
                v = _F32(m[x])
                row[x] = v
                ok &= np.isfinite(v)
            finite &= ok
        if finite:
            lo, hi = _row_range(row, lo, hi)
    vp[0, 1 : w + 1] = vp[1, 1 : w + 1]  # replicate padding: rows, then columns
    vp[h + 1, 1 : w + 1] = vp[h, 1 : w + 1]
    for y in range(h + 2):
        vp[y, 0] = vp[y, 1]
        vp[y, w + 1] = vp[y, w]
    return lo, hi, finite


@njit(inline="always")
def _threshold(lo, hi, ratio, fixed):  # pragma: no cover - compiled
    """I2E.thresholds(): ``ratio``, or (max - min) * ratio of the image's V, in float32."""
    return ratio if fixed else (hi - lo) * ratio


@njit(parallel=True, **_JIT)
def _i2e_intensity(images, is_uint8, ratio, fixed, vpad, thr, bad):  # pragma: no cover - compiled
    for b in prange(images.shape[0]):
        m = np.empty(images.shape[3], images.dtype)
        lo, hi, finite = _sample_intensity(images, b, is_uint8, vpad[b], m)
        thr[b] = _threshold(lo, hi, ratio, fixed)
        bad[b] = not finite


def i2e_intensity(images, ratio, fixed, vpad, thr, bad) -> None:
    """images [B, C, H, W] float32 or uint8 -> replicate-padded V = max over C in vpad [B, H+2, W+2]
    (uint8 * float32(1/255), as ToDtype(scale=True)), the per-image threshold in thr [B] (``fixed``: ``ratio`` itself,
    else (max - min) * ratio) and ``bad[b]`` set when a float image holds NaN/Inf. One pass; max,
    the division and the threshold are the tensor path's float32 operations."""
    _i2e_intensity(images, images.dtype == np.uint8, _F32(ratio), fixed, vpad, thr, bad)


@njit(inline="always")
def _cell_rows(vp, y, cell_a, cell_b, w):  # pragma: no cover - compiled
    """Row y of V at grid cells a and b (0..8 on the 3x3 grid): views of the padded plane vp."""
    ra, ca = cell_a // 3, cell_a % 3
    rb, cb = cell_b // 3, cell_b % 3
    return vp[y + ra, ca : ca + w], vp[y + rb, cb : cb + w]


@njit(parallel=True, **_JIT)
def _i2e_dense(vpad, thr, cell_a, cell_b, out):  # pragma: no cover - compiled
    steps, n, h, w = out.shape[0], out.shape[1], out.shape[3], out.shape[4]
    for b in prange(n):
        th = thr[b]
        neg_th = -th
        for t in range(steps):
            for y in range(h):
                pa, pb = _cell_rows(vpad[b], y, cell_a[t, b], cell_b[t, b], w)
                on = out[t, b, 0, y]
                off = out[t, b, 1, y]
                for x in range(w):
                    d = pb[x] - pa[x]
                    on[x] = d >= th
                    off[x] = d <= neg_th


def i2e_dense(vpad, thr, cell_a, cell_b, out) -> None:
    """I2E events written once into out [T, B, 2, H, W] (float32, bool or uint8), one pass.

    vpad [B, H+2, W+2] float32, thr [B] float32, cell_a / cell_b [T, B] int64 (grid cells 0..8).
    R = V[cell b] - V[cell a] (one float32 subtraction), ON = R >= thr, OFF = R <= -thr: the same
    operations as the tensor path.
    """
    _i2e_dense(vpad, thr, cell_a, cell_b, out)




@njit(**_JIT)
def _packed_sample(vp, th, cells_a, cells_b, out_b):  # pragma: no cover - compiled
    """Packed events of one image: vp [H+2, W+2], cells [T], out_b [T, 2, H, W/8] (W % 8 == 0);
    bit (7 - x % 8) of byte x // 8 is the event at column x, as ``np.packbits``. 32 pixels at a
    time, then 8 at a time for the rest of a row."""
    steps, h, w8 = out_b.shape[0], out_b.shape[2], out_b.shape[3]
    wp = vp.shape[1]
    w32 = w8 - w8 % 4  # bytes covered by 32-pixel words
    for t in range(steps):
        ca, cb = cells_a[t], cells_b[t]  # grid cell k: row k // 3, column k % 3 of the padded plane
        at_a = (ca // 3) * wp + ca % 3
        at_b = (cb // 3) * wp + cb % 3
        for y in range(h):
            a = at_a + y * wp
            b = at_b + y * wp
            on = (2 * t * h + y) * w8  # out_b[t, 0, y, 0]
            off = on + h * w8  # out_b[t, 1, y, 0]
            for j in range(0, w32, 4):
                _event_bits_32(vp, a + 8 * j, b + 8 * j, th, out_b, on + j, off + j)
            for j in range(w32, w8):
                _event_bits_8(vp, a + 8 * j, b + 8 * j, th, out_b, on + j, off + j)


@njit(parallel=True, **_JIT)
def _i2e_packed_images(images, is_uint8, ratio, fixed, cell_a, cell_b, out, bad):  # pragma: no cover - compiled
    n, _, h, w = images.shape
    for b in prange(n):
        vp = np.empty((h + 2, w + 2), np.float32)  # this image's padded V stays in cache
        m = np.empty(w, images.dtype)
        lo, hi, finite = _sample_intensity(images, b, is_uint8, vp, m)
        bad[b] = not finite
        _packed_sample(vp, _threshold(lo, hi, ratio, fixed), cell_a[:, b], cell_b[:, b], out[b])


def i2e_packed_images(images, ratio, fixed, cell_a, cell_b, out, bad) -> None:
    """Images [B, C, H, W] (float32 or uint8) straight to packed events out [B, T, 2, H, W/8]:
    `i2e_intensity` and the packed events per image in one parallel loop, so that each
    image's padded V is used while it is in cache. ``bad[b]``: image b holds NaN/Inf (its
    output is then meaningless and the caller raises)."""
    _i2e_packed_images(images, images.dtype == np.uint8, _F32(ratio), fixed, cell_a, cell_b, out, bad)
