"""Max pooling kernels, used by :class:`i2e_train.models.layers.MaxPool2d`.

PyTorch's CPU max_pool2d (NCHW), element for element: the window is clipped to the input, the
running maximum starts at -inf with the index of the window's first in-bounds pixel, and a
pixel replaces it when it is greater or NaN, scanning rows then columns; the backward adds
each output gradient to its argmax pixel in output row-major order. One parallel item per
``[H, W]`` plane.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._jit import _F32
from ._jit import JIT as _JIT


@njit(parallel=True, **_JIT)
def _maxpool_forward(x, y, idx, kh, kw, sh, sw, ph, pw):  # pragma: no cover - compiled
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
                idx[p, oh, ow] = best_i


@njit(parallel=True, **_JIT)
def _maxpool_backward(gy, idx, gx):  # pragma: no cover - compiled
    planes, oh_n, ow_n = gy.shape
    w = gx.shape[2]
    for p in prange(planes):
        gxp = gx[p]
        gxp[:, :] = 0
        for oh in range(oh_n):
            for ow in range(ow_n):
                i = idx[p, oh, ow]
                gxp[i // w, i % w] += gy[p, oh, ow]


def maxpool_forward(x, y, idx, kh, kw, sh, sw, ph, pw) -> None:
    """Max pooling of x [P, H, W] float32 into y [P, Ho, Wo], argmax (h*W + w) into idx int32."""
    _maxpool_forward(x, y, idx, kh, kw, sh, sw, ph, pw)


def maxpool_backward(gy, idx, gx) -> None:
    """gx [P, H, W] = 0, then gy [P, Ho, Wo] added at the argmax of each output."""
    _maxpool_backward(gy, idx, gx)
