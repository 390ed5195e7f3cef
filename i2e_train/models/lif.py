"""LIF neuron with a fused multi-step CPU kernel, bit-identical to SpikingJelly's.

:class:`LIFNode` is SpikingJelly's ``LIFNode`` (same arguments, same state, no parameters, so
state dicts are unchanged) whose multi-step forward on CPU runs the whole ``[T, N]`` recurrence
in one compiled pass (numba, vectorised and split over the CPU threads) instead of about a dozen
tensor operations per time step, and whose backward does the same in reverse.

Bit-exactness: every element goes through the same float32 operations, in the same order, as
SpikingJelly 2.0's CPU path (``spikingjelly._ops.lif``): charge ``H = V - (V - V_reset)/tau + X``
(or ``V + (X - (V - V_reset))/tau`` with ``decay_input``), spike ``(H - V_th) >= 0``, reset, and
in the backward the surrogate gradient written exactly as SpikingJelly evaluates it (a Python
scalar divided by a tensor is a reciprocal times the scalar). Spikes, final membranes and
input gradients are equal bit for bit; ``tests/test_fast_kernels.py`` checks it for every supported
setting against the installed SpikingJelly.

The fused path is used when all of these hold, and SpikingJelly's own path otherwise:
CPU float32 input, ``detach_reset=True`` (the I2E setting), ``store_v_seq=False``, no
SpikingJelly neuron-precision override, and a surrogate whose gradient is plain arithmetic:
``ATan`` (the I2E default), ``PiecewiseQuadratic``, ``SoftSign`` or ``SuperSpike``. On CUDA
SpikingJelly's fused CUDA/Triton kernels are used. ``node.fast = False`` (or
:func:`i2e_train.models.layers.set_fast_kernels`) switches a node back to SpikingJelly everywhere.

For the backward the fused path keeps the charged membrane H, or with ``node.save_input = True``
(set by :func:`i2e_train.models.memory.set_memory` where the input is kept anyway) the input and
the initial membrane, from which the backward kernel recomputes H: the same gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from spikingjelly.activation_based import neuron
from torch import nn

from i2e_train import kernels

from . import recompute

__all__ = ["LIFNode", "fused_lif_available", "lif_multi_step"]

# SpikingJelly's surrogate ids (spikingjelly._ops.surrogate._SURROGATE_IDS) whose gradient the
# kernel evaluates; the others involve exp/erf, whose vectorised and scalar results differ in
# the last bit, and stay on SpikingJelly's path.
_KERNEL_SURROGATES = {"ATan": 1, "PiecewiseQuadratic": 2, "SoftSign": 4, "SuperSpike": 5}
_BLOCK = 4096  # neurons per parallel work item (16 KiB of float32 per time step)


def fused_lif_available() -> bool:
    """Whether the fused CPU kernel can run here (numba importable)."""
    return kernels.load("lif") is not None


def _surrogate_constants(sg: nn.Module) -> tuple[int, float, float] | None:
    """(kernel surrogate id, c1, c2) as float32-rounded constants, or None if not supported.

    The constants are exactly the Python scalars SpikingJelly multiplies or divides by.
    """
    if type(sg).__module__ != "spikingjelly.activation_based.surrogate" or not getattr(sg, "spiking", True):
        return None
    sid = _KERNEL_SURROGATES.get(type(sg).__name__)
    alpha = getattr(sg, "alpha", None)
    if sid is None or isinstance(alpha, torch.Tensor) or not isinstance(alpha, (int, float)):
        return None
    alpha = float(alpha)
    if sid == 1:  # ATan: z = x * (pi/2*alpha); (alpha/2) / (1 + z*z)
        return sid, math.pi / 2 * alpha, alpha / 2
    if sid == 2:  # PiecewiseQuadratic: (alpha - alpha*alpha*|x|).clamp_min(0)
        return sid, alpha * alpha, alpha
    if sid == 4:  # SoftSign: z = 1/alpha + |x|; 1 / (2*alpha*z*z)
        return sid, 1 / alpha, 2 * alpha
    return sid, alpha, 0.0  # SuperSpike: z = 1 + |x|; alpha / (z*z)


def _kernel_forward(x: torch.Tensor, v0: torch.Tensor, params: tuple, store_h: bool):
    """The forward kernel on x [T, ...] (contiguous float32) from v0 [...]: spikes [T, ...], the final
    membrane [...] and, if ``store_h``, H [T, ...]. ``params``: (tau, decay_input, v_threshold,
    v_reset, surrogate constants)."""
    tau, decay_input, v_threshold, v_reset, _ = params
    t_steps, n = x.shape[0], x[0].numel()
    v = kernels.empty(v0.shape, torch.float32).copy_(v0).reshape(-1)  # updated in place: final V
    spikes = kernels.empty(x.shape, x.dtype)
    h = kernels.empty(x.shape, x.dtype) if store_h else torch.empty(1, dtype=torch.float32)
    kernels.use_threads(torch.get_num_threads())
    kernels.load("lif").lif_forward(
        x.reshape(-1).numpy(), v.numpy(), h.reshape(-1).numpy(), spikes.reshape(-1).numpy(),
        t_steps, n, tau, v_threshold, 0.0 if v_reset is None else v_reset,
        bool(decay_input), v_reset is not None, store_h, _BLOCK,
    )  # fmt: skip
    return spikes, v.reshape(v0.shape), h


def _kernel_backward(grad_spikes, grad_v, params: tuple, h=None, x=None, v0=None):
    """The backward kernel: (gradient of the input [T, ...], of the initial membrane [N]), from the
    charged membrane ``h`` or, recomputing it, from the input ``x`` and the initial membrane ``v0``."""
    tau, decay_input, v_threshold, v_reset, (sid, c1, c2) = params
    ref = h if h is not None else x
    t_steps, n = ref.shape[0], ref[0].numel()
    gs = torch.zeros_like(ref) if grad_spikes is None else grad_spikes.to(torch.float32).contiguous()
    carry = kernels.empty((n,), torch.float32)  # updated in place: the gradient of the initial membrane
    if grad_v is None:
        carry.zero_()
    else:
        carry.copy_(grad_v.reshape(-1))
    gx = kernels.empty(ref.shape, torch.float32)
    k, hard = kernels.load("lif"), v_reset is not None
    kernels.use_threads(torch.get_num_threads())
    if h is not None:
        k.lif_backward(gs.reshape(-1).numpy(), h.reshape(-1).numpy(), carry.numpy(), gx.reshape(-1).numpy(),
                       t_steps, n, tau, v_threshold, bool(decay_input), hard, sid, c1, c2, _BLOCK)  # fmt: skip
        return gx, carry
    # a reset state expanded from one value goes to the kernel as that one value
    v0 = v0[(0,) * v0.dim()].reshape(1) if v0.dim() and v0.stride() == (0,) * v0.dim() else v0
    v0 = v0.to(torch.float32).contiguous().reshape(-1)
    k.lif_backward_from_input(
        gs.reshape(-1).numpy(), x.reshape(-1).numpy(), v0.numpy(), carry.numpy(), gx.reshape(-1).numpy(),
        t_steps, n, tau, v_threshold, 0.0 if v_reset is None else v_reset, bool(decay_input), hard,
        sid, c1, c2, _BLOCK,
    )  # fmt: skip
    return gx, carry


class _FusedLIF(torch.autograd.Function):
    """x_seq [T, ...], v0 [...] -> spikes [T, ...], v_T [...].

    Saves for the backward either the charged membrane H [T, ...] (``save_input=False``) or, with
    ``save_input=True``, the input x_seq itself and v0, from which the backward kernel recomputes
    H block by block: no [T, ...] tensor of its own is kept, and x_seq costs nothing extra when it
    is kept anyway (an input that other layers keep too). Both give the same gradients to the bit.
    """

    @staticmethod
    def forward(ctx, x_seq, v0, tau, decay_input, v_threshold, v_reset, sg_consts, save_input=False):
        x = x_seq.contiguous()
        params = (tau, decay_input, v_threshold, v_reset, sg_consts)
        need_h = not save_input and (torch.is_grad_enabled() or x_seq.requires_grad or v0.requires_grad)
        spikes, v, h = _kernel_forward(x, v0, params, need_h)
        ctx.save_for_backward(*((x, v0) if save_input else (h,)))
        ctx.save_input = save_input
        ctx.params = params
        ctx.v0_shape = v0.shape
        return spikes, v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v):
        saved = ctx.saved_tensors
        if ctx.save_input:
            gx, carry = _kernel_backward(grad_spikes, grad_v, ctx.params, x=saved[0], v0=saved[1])
        else:
            gx, carry = _kernel_backward(grad_spikes, grad_v, ctx.params, h=saved[0])
        return gx, carry.reshape(ctx.v0_shape), None, None, None, None, None, None


def lif_multi_step(
    x_seq: torch.Tensor,
    v0: torch.Tensor,
    tau: float,
    decay_input: bool,
    v_threshold: float,
    v_reset: float | None,
    surrogate_function: nn.Module,
    save_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LIF over ``x_seq [T, ...]`` from membrane ``v0 [...]`` (``detach_reset=True``).

    Returns ``(spikes [T, ...], final membrane [...])``, both differentiable. ``save_input``: keep
    x_seq and v0 for the backward instead of the charged membrane (see :class:`_FusedLIF`; same
    gradients). Raises ``ValueError`` for a setting the kernel does not cover (see the module
    docstring).
    """
    consts = _surrogate_constants(surrogate_function)
    if consts is None:
        raise ValueError(f"the fused LIF kernel does not cover the surrogate {surrogate_function!r}")
    if x_seq.device.type != "cpu" or x_seq.dtype != torch.float32:
        raise ValueError(f"the fused LIF kernel takes CPU float32 input, got {x_seq.dtype} on {x_seq.device}")
    if tuple(v0.shape) != tuple(x_seq.shape[1:]):
        raise ValueError(f"membrane shape {tuple(v0.shape)} does not match input steps {tuple(x_seq.shape[1:])}")
    if kernels.load("lif") is None:
        raise RuntimeError(f"the fused LIF kernel is unavailable: {kernels.unavailable_reason()}")
    kernels.use_threads(torch.get_num_threads())
    return _FusedLIF.apply(x_seq, v0, float(tau), bool(decay_input), float(v_threshold),
                           None if v_reset is None else float(v_reset), consts, bool(save_input))  # fmt: skip


class LIFNode(neuron.LIFNode):
    """SpikingJelly's ``LIFNode`` with the fused CPU kernel for multi-step input (see module doc).

    Same arguments and state as ``spikingjelly.activation_based.neuron.LIFNode``; ``fast=False``
    turns the kernel off for this node. ``save_input=True`` (set by the ``bits`` memory modes,
    :mod:`i2e_train.models.memory`) makes the fused path keep its input for the backward instead
    of the charged membrane, and a reset membrane as one scalar instead of a ``[N]`` tensor.
    """

    save_input: bool = False

    def __init__(self, *args: Any, fast: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = bool(fast)

    def _fused_ok(self, x_seq: torch.Tensor) -> bool:
        return (
            self.fast
            and x_seq.device.type == "cpu"
            and x_seq.dtype == torch.float32
            and x_seq.dim() >= 2
            and self.detach_reset
            and not self.store_v_seq
            and getattr(self, "_neuron_precision", None) is None
            and _surrogate_constants(self.surrogate_function) is not None
            and kernels.load("lif") is not None
        )

    def materialize_states(self, inputs, states, step_mode):
        """SpikingJelly's states, with a reset membrane made in float32 under autocast on CUDA.

        SpikingJelly makes the membrane in the input's dtype, and its fused CUDA/Triton kernels
        take a float32 membrane only: with a float16 / bfloat16 input (``16-mixed``,
        ``bf16-mixed``) every LIF would fall back to the torch reference (about a dozen kernels
        per time step). A float32 membrane keeps the fused kernel (spikes in the input's dtype)."""
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        if (states and isinstance(states[0], float) and x.device.type == "cuda"
                and x.dtype in (torch.float16, torch.bfloat16) and getattr(self, "_neuron_precision", None) is None):  # fmt: skip
            return (torch.full_like(x, states[0], dtype=torch.float32), *states[1:])
        return super().materialize_states(inputs, states, step_mode)

    def initial_membrane(self, x_seq: torch.Tensor, scalar_ok: bool) -> torch.Tensor | None:
        """The membrane the fused kernel starts from for input ``x_seq [T, ...]``, as SpikingJelly
        materialises it (``[...]`` float32), or None when the kernel cannot take it. ``scalar_ok``:
        a reset state may come as one value expanded to ``[...]`` (no ``[N]`` tensor)."""
        v = self._memories.get("v")
        if scalar_ok and isinstance(v, float):
            return torch.full((), v, dtype=torch.float32).expand(x_seq.shape[1:])
        v = self.materialize_states((x_seq,), tuple(self._memories.values()), "m")[0]
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != tuple(x_seq.shape[1:]):
            return None
        return v

    def multi_step_forward(self, x_seq: torch.Tensor, *args: torch.Tensor, **kwargs: object):
        if not (args or kwargs or self._fused_ok(x_seq)) and recompute.active() is not None:
            # the memory engine runs (not the CPU layer): keep only the input, membranes again in the backward
            return recompute.checkpointed(super().multi_step_forward, (x_seq,), (self,))
        if args or kwargs or not self._fused_ok(x_seq):
            return super().multi_step_forward(x_seq, *args, **kwargs)
        v = self.initial_membrane(x_seq, scalar_ok=self.save_input)
        if v is None:
            return super().multi_step_forward(x_seq)
        spikes, v_last = lif_multi_step(
            x_seq, v, self.tau, self.decay_input, self.v_threshold, self.v_reset, self.surrogate_function,
            self.save_input,
        )
        self._memories["v"] = v_last
        self.v_seq = None
        return spikes

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fast={self.fast}"

