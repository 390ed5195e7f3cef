"""Max pooling kernels, used by `i2e_train.models.layers.MaxPool2d`.

PyTorch's CPU max_pool2d (NCHW), element for element: the window is clipped to the input, the
running maximum starts at -inf with the index of the window's first in-bounds pixel, and a
pixel replaces it when it is greater or NaN, scanning rows then columns; the backward adds
each output gradient to its argmax pixel in output row-major order. One parallel item per
``[H, W]`` plane.

The argmax is stored either as the pixel's index in its plane (``h * W + w``, int32) or, with
``relative=True``, as its offset in the (unclipped) window, ``dh * kw + dw``, which fits in int8
for windows of up to 127 pixels: 4x less memory, the same pixel, the same gradients.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._jit import _F32
from ._jit import JIT as _JIT


@njit(parallel=True, **_JIT)
def _maxpool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, relative):  # pragma: no cover - compiled
    planes, h, w = x.shape
    oh_n, ow_n = y.shape[1], y.shape[2]
    for p in prange(planes):
        xp = x[p]
        for oh in range(oh_n):
            ih0 = oh * sh - ph
            ih1 = min(ih0 + kh, h)
            ih0 = max(ih0, 0)
            for ow in range(ow_n):
                iw0 = ow * sw - pw
                iw1 = min(iw0 + kw, w)
                iw0 = max(iw0, 0)
                best = _F32(-np.inf)
                best_i = ih0 * w + iw0
                for ih in range(ih0, ih1):
                    for iw in range(iw0, iw1):
                        v = xp[ih, iw]
                        if v > best or v != v:
                            best = v
                            best_i = ih * w + iw
                y[p, oh, ow] = best
                if relative:
                    dh = best_i // w - (oh * sh - ph)
                    idx[p, oh, ow] = dh * kw + best_i % w - (ow * sw - pw)
                else:
                    idx[p, oh, ow] = best_i


@njit(parallel=True, **_JIT)
def _maxpool_backward(gy, idx, gx, kw, sh, sw, ph, pw, relative):  # pragma: no cover - compiled
    planes, oh_n, ow_n = gy.shape
    w = gx.shape[2]
    for p in prange(planes):
        gxp = gx[p]
        gxp[:, :] = 0
        for oh in range(oh_n):
            for ow in range(ow_n):
                i = np.int64(idx[p, oh, ow])
                if relative:
                    gxp[oh * sh - ph + i // kw, ow * sw - pw + i % kw] += gy[p, oh, ow]
                else:
                    gxp[i // w, i % w] += gy[p, oh, ow]


def maxpool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, relative=False) -> None:
    """Max pooling of x [P, H, W] float32 into y [P, Ho, Wo]; the argmax into idx [P, Ho, Wo]:
    ``h * W + w`` (int32), or with ``relative`` the window offset ``dh * kw + dw`` (int8)."""
    _maxpool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, relative)


def maxpool_backward(gy, idx, gx, kw=0, sh=0, sw=0, ph=0, pw=0, relative=False) -> None:
    """gx [P, H, W] = 0, then gy [P, Ho, Wo] added at the argmax of each output (idx as stored by
    `maxpool_forward`; the window geometry is only read for ``relative`` indices)."""
    _maxpool_backward(gy, idx, gx, kw, sh, sw, ph, pw, relative)
