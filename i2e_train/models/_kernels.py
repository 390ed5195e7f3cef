"""numba kernels of the fast CPU paths (:mod:`i2e_train.models.lif`, :mod:`i2e_train.models.layers`);
imported on first use, compiled once and cached on disk.

LIF: arrays are flat float32 views of contiguous ``[T, N]`` tensors. The neurons are cut into
blocks that run in parallel; inside a block the time loop is outside and the neuron loop inside,
on slices, so that LLVM vectorises it. Only IEEE float32 ``+ - * /`` and comparisons are used
(no fast-math, no contraction into FMA, ``error_model='numpy'`` so that a division has no
Python zero check), in SpikingJelly's order, which is what makes the results bit-identical to
its tensor operations. Max pooling: one parallel item per ``[H, W]`` plane, PyTorch's scan order.
I2E: one parallel item per image; the same float32 difference and comparisons as the tensor path.
Packed events come from a small LLVM intrinsic (:func:`_event_bits`) that turns 32 comparisons
into a 32-bit word at once, which plain numba loops cannot express.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_F32 = np.float32
_JIT = {"cache": True, "boundscheck": False, "error_model": "numpy"}  # every compiled kernel


@njit(**_JIT)
def _forward_block(x, v, h, s, tau, thr, reset, decay_input, hard, store_h):  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        vi = v[i]
        if decay_input:
            hi = vi + (x[i] - (vi - reset)) / tau
        else:
            hi = vi - (vi - reset) / tau + x[i]
        if store_h:
            h[i] = hi
        fired = (hi - thr) >= _F32(0.0)
        s[i] = _F32(1.0) if fired else _F32(0.0)
        if hard:
            v[i] = reset if fired else hi
        else:
            v[i] = hi - thr if fired else hi


@njit(parallel=True, **_JIT)
def _forward(x, v, h, s, t_steps, n, tau, thr, reset, decay_input, hard, store_h, block):  # pragma: no cover
    for b in prange((n + block - 1) // block):
        lo = b * block
        hi = min(n, lo + block)
        for t in range(t_steps):
            o = t * n
            hb = h[o + lo : o + hi] if store_h else h
            _forward_block(x[o + lo : o + hi], v[lo:hi], hb, s[o + lo : o + hi], tau, thr, reset, decay_input, hard,
                           store_h)  # fmt: skip


@njit(inline="always", error_model="numpy")
def _sg_atan(x, c1, c2):  # (alpha/2) / (1 + z*z), z = x * (pi/2*alpha); scalar / tensor = reciprocal * scalar
    z = x * c1
    return (_F32(1.0) / (_F32(1.0) + z * z)) * c2


@njit(inline="always", error_model="numpy")
def _sg_piecewise_quadratic(x, c1, c2):  # (alpha - alpha*alpha*|x|).clamp_min(0), NaN kept
    g = c2 - c1 * abs(x)
    return g if (g > _F32(0.0) or g != g) else _F32(0.0)


@njit(inline="always", error_model="numpy")
def _sg_soft_sign(x, c1, c2):  # 1 / (2*alpha*z*z), z = 1/alpha + |x|
    z = c1 + abs(x)
    return _F32(1.0) / (c2 * z * z)


@njit(inline="always", error_model="numpy")
def _sg_super_spike(x, c1, c2):  # alpha / (z*z), z = 1 + |x|
    z = _F32(1.0) + abs(x)
    return (_F32(1.0) / (z * z)) * c1


def _make_backward_block(sg_fn):
    """One block kernel per surrogate, so that the loop body has no branch on the surrogate."""

    def block(gs, h, carry, gx, tau, thr, decay_input, hard, c1, c2):  # pragma: no cover - compiled
        one = _F32(1.0)
        for i in range(h.shape[0]):
            hi = h[i]
            sg = sg_fn(hi - thr, c1, c2)
            rg = (_F32(0.0) if hi >= thr else one) if hard else one
            gh = gs[i] * sg + carry[i] * rg
            gx[i] = gh / tau if decay_input else gh
            carry[i] = gh - gh / tau

    return block


_bwd_atan = njit(**_JIT)(_make_backward_block(_sg_atan))
_bwd_piecewise_quadratic = njit(**_JIT)(_make_backward_block(_sg_piecewise_quadratic))
_bwd_soft_sign = njit(**_JIT)(_make_backward_block(_sg_soft_sign))
_bwd_super_spike = njit(**_JIT)(_make_backward_block(_sg_super_spike))


@njit(parallel=True, **_JIT)
def _backward(gs, h, carry, gx, t_steps, n, tau, thr, decay_input, hard, sid, c1, c2, block):  # pragma: no cover
    for b in prange((n + block - 1) // block):
        lo = b * block
        hi = min(n, lo + block)
        for t in range(t_steps - 1, -1, -1):
            o = t * n
            args = (gs[o + lo : o + hi], h[o + lo : o + hi], carry[lo:hi], gx[o + lo : o + hi])
            if sid == 1:
                _bwd_atan(*args, tau, thr, decay_input, hard, c1, c2)
            elif sid == 2:
                _bwd_piecewise_quadratic(*args, tau, thr, decay_input, hard, c1, c2)
            elif sid == 4:
                _bwd_soft_sign(*args, tau, thr, decay_input, hard, c1, c2)
            else:
                _bwd_super_spike(*args, tau, thr, decay_input, hard, c1, c2)


def lif_forward(x, v, h, s, t_steps, n, tau, thr, reset, decay_input, hard, store_h, block) -> None:
    """Run the LIF recurrence: x [T*N] -> spikes s [T*N], charged H [T*N] (if store_h); v [N] in/out."""
    _forward(x, v, h, s, t_steps, n, _F32(tau), _F32(thr), _F32(reset), decay_input, hard, store_h, block)


def lif_backward(gs, h, carry, gx, t_steps, n, tau, thr, decay_input, hard, sid, c1, c2, block) -> None:
    """Backward of :func:`lif_forward` (``detach_reset``): gs, H [T*N] -> gx [T*N]; carry [N]:
    in, the gradient of the final membrane; out, that of the initial one."""
    _backward(gs, h, carry, gx, t_steps, n, _F32(tau), _F32(thr), decay_input, hard, sid, _F32(c1), _F32(c2), block)


def use_threads(n: int) -> None:
    """Run the kernels on ``n`` threads, the caller's (torch's) thread count.

    numba's OpenMP layer and torch share one libgomp, so the count is only ever set to the value
    torch already uses (never lowered below it, which would slow torch down too).
    """
    n = int(n)
    if 1 <= n <= numba.config.NUMBA_NUM_THREADS and numba.get_num_threads() != n:
        numba.set_num_threads(n)


# --------------------------------------------------------------------------- max pooling
# PyTorch's CPU max_pool2d (NCHW), element for element: the window is clipped to the input, the
# running maximum starts at -inf with the index of the window's first in-bounds pixel, and a
# pixel replaces it when it is greater or NaN, scanning rows then columns; the backward adds
# each output gradient to its argmax pixel in output row-major order.
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


# --------------------------------------------------------------------------- I2E
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
    """V of image b (max over channels; uint8 / 255) into the replicate-padded plane vp [H+2, W+2];
    returns (min, max, all finite). m: scratch row of the images' dtype."""
    h, w = images.shape[2], images.shape[3]
    scale = _F32(255.0)
    lo = _F32(np.inf)
    hi = _F32(-np.inf)
    finite = True
    for y in range(h):
        _channel_max(images, b, y, m)
        row = vp[y + 1, 1 : w + 1]
        if is_uint8:
            for x in range(w):
                row[x] = _F32(m[x]) / scale
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
    (uint8 / 255 as float32), the per-image threshold in thr [B] (``fixed``: ``ratio`` itself,
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


def _splat(builder, value, n):
    """LLVM IR: an n-lane vector holding ``value`` in every lane."""
    vec = ir.VectorType(value.type, n)
    undef = ir.Constant(vec, None)
    first = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _event_bits(n):
    """Intrinsic ``f(vp, a, b, th, out, at_on, at_off)``: events of n (8 or 32) pixels as bits.

    d = vp.flat[b : b + n] - vp.flat[a : a + n] (float32), ON = d >= th, OFF = d <= -th: the same
    IEEE subtraction and ordered comparisons as the dense kernel, on one n-lane vector each. The n
    comparison results become an n-bit integer directly (an ``<n x i1>`` bitcast; on x86 a mask
    move), their lanes first reversed inside each byte so that the first pixel of a byte lands in
    its bit 7, as ``np.packbits``; the n/8 bytes are stored at ``out.flat[at_on]`` and
    ``out.flat[at_off]`` (little-endian byte order). No bounds checks: callers keep every index
    in range. vp and out must be C-contiguous (float32 / uint8).
    """

    @intrinsic
    def event_bits(typingctx, vp, a, b, th, out, at_on, at_off):
        if not (isinstance(vp, types.Array) and vp.dtype == types.float32 and vp.layout == "C"
                and isinstance(out, types.Array) and out.dtype == types.uint8 and out.layout == "C"
                and th == types.float32):  # fmt: skip
            return None
        sig = types.void(vp, a, b, th, out, at_on, at_off)

        def codegen(context, builder, sig, args):
            plane, off_a, off_b, thr, dst, on_at, off_at = args
            src = context.make_array(sig.args[0])(context, builder, plane).data
            dst = context.make_array(sig.args[4])(context, builder, dst).data
            lanes = ir.VectorType(ir.FloatType(), n)

            def load(offset):
                return builder.load(builder.bitcast(builder.gep(src, [offset]), lanes.as_pointer()), align=4)

            d = builder.fsub(load(off_b), load(off_a))
            order = [8 * g + 7 - k for g in range(n // 8) for k in range(8)]
            order = ir.Constant(ir.VectorType(ir.IntType(32), n), order)
            d = builder.shuffle_vector(d, ir.Constant(lanes, None), order)
            word = ir.IntType(n)
            on = builder.bitcast(builder.fcmp_ordered(">=", d, _splat(builder, thr, n)), word)
            off = builder.bitcast(builder.fcmp_ordered("<=", d, _splat(builder, builder.fneg(thr), n)), word)
            for bits, at in ((on, on_at), (off, off_at)):
                builder.store(bits, builder.bitcast(builder.gep(dst, [at]), word.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return event_bits


_event_bits_8 = _event_bits(8)
_event_bits_32 = _event_bits(32)


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
    :func:`i2e_intensity` and the packed events per image in one parallel loop, so that each
    image's padded V is used while it is in cache. ``bad[b]``: image b holds NaN/Inf (its
    output is then meaningless and the caller raises)."""
    _i2e_packed_images(images, images.dtype == np.uint8, _F32(ratio), fixed, cell_a, cell_b, out, bad)
