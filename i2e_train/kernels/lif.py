"""Fused multi-step LIF kernels (forward and backward), used by `i2e_train.models.lif`.

Arrays are flat float32 views of contiguous ``[T, N]`` tensors. The neurons are cut into blocks
that run in parallel; inside a block the time loop is outside and the neuron loop inside, on
slices, so that LLVM vectorises it. Only IEEE float32 ``+ - * /`` and comparisons are used, in
SpikingJelly's order, which is what makes the results bit-identical to its tensor operations.

The backward kernel, `lif_backward`, reads the charged membrane H saved by the forward.
"""

from __future__ import annotations

from numba import njit, prange

from ._jit import _F32
from ._jit import JIT as _JIT


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
    """Backward of `lif_forward` (``detach_reset``): gs, H [T*N] -> gx [T*N]; carry [N]:
    in, the gradient of the final membrane; out, that of the initial one."""
    _backward(gs, h, carry, gx, t_steps, n, _F32(tau), _F32(thr), decay_input, hard, sid, _F32(c1), _F32(c2), block)
