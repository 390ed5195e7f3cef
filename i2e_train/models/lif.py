"""LIF neuron as one multi-step operator keeping only the charged membrane, on every device.

`LIFNode` is SpikingJelly's ``LIFNode`` (same arguments, same state, no parameters, so
state dicts are unchanged) whose multi-step forward is one autograd function, `lif_multi_step`:

* on CUDA (and any device but CPU) it calls SpikingJelly's own registered operators,
  ``torch.ops.sj_lif.forward`` / ``backward`` (its Triton / CUDA kernels, chosen by SpikingJelly
  from the device), exactly what SpikingJelly's neuron runs there, but keeps only the charged
  membrane ``H [T, ...]`` for the backward: SpikingJelly's autograd also keeps the input and the
  initial membrane, for higher-order gradients, which training never takes;
* on CPU, a compiled kernel (numba, `i2e_train.kernels.lif`) runs the whole ``[T, N]``
  recurrence in one vectorised pass instead of about a dozen tensor operations per time step,
  and its backward in reverse. With ``I2E_CPU_KERNELS=0`` in the environment (or ``node.fast =
  False``, `set_fast_kernels`) the CPU runs SpikingJelly's operators too: the tensor
  operations of its CPU implementation, the path the tests and ``benchmarks/memory.py`` use to
  measure what a GPU does.

Bit-exactness: every path computes the same float32 operations in the same order as
SpikingJelly 2.0 (charge ``H = V - (V - V_reset)/tau + X`` or ``V + (X - (V - V_reset))/tau``
with ``decay_input``, spike ``H >= V_th``, reset; in the backward the surrogate gradient as
SpikingJelly evaluates it). Spikes, final membranes and input gradients equal those of
SpikingJelly's neuron bit for bit (``tests/test_fast_kernels.py``).

The operator covers ``detach_reset=True`` (the I2E setting), ``store_v_seq=False``, no
SpikingJelly neuron-precision override and a surrogate SpikingJelly's operators know (the
compiled CPU kernel: ``ATan``, ``PiecewiseQuadratic``, ``SoftSign``, ``SuperSpike``); other
settings run SpikingJelly's own path unchanged. What the memory engine
(`i2e_train.models.recompute`) makes of the saved ``H`` (kept, or computed again from the
neuron's input) and of the spikes (derived from ``H``) is up to the network's memory mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import spikingjelly._ops.lif  # noqa: F401  (registers torch.ops.sj_lif)
import torch
from spikingjelly._ops.surrogate import _surrogate_spec
from spikingjelly.activation_based import neuron
from torch import nn

from i2e_train import kernels

from . import recompute

__all__ = ["LIFNode", "LIFParams", "fused_lif_available", "lif_charge", "lif_multi_step", "set_fast_kernels",
           "with_spikingjelly_neurons"]

# SpikingJelly's surrogate ids whose gradient the compiled kernel evaluates; the others involve
# exp/erf, whose vectorised and scalar results differ in the last bit, and run SpikingJelly's path.
_KERNEL_SURROGATES = {1, 2, 4, 5}  # ATan, PiecewiseQuadratic, SoftSign, SuperSpike
_BLOCK = 4096  # neurons per parallel work item (16 KiB of float32 per time step)


def fused_lif_available() -> bool:
    """Whether the compiled CPU kernel can run here (numba importable)."""
    return kernels.load("lif") is not None


class LIFParams(NamedTuple):
    """The constants of one LIF operator call (hard reset when ``v_reset`` is not None)."""

    tau: float
    decay_input: bool
    v_threshold: float
    v_reset: float | None
    surrogate_id: int
    alpha: float


def _kernel_constants(p: LIFParams) -> tuple[float, float]:
    """(c1, c2) of the compiled kernel's surrogate: exactly the Python scalars SpikingJelly uses."""
    a = p.alpha
    if p.surrogate_id == 1:  # ATan: z = x * (pi/2*alpha); (alpha/2) / (1 + z*z)
        return math.pi / 2 * a, a / 2
    if p.surrogate_id == 2:  # PiecewiseQuadratic: (alpha - alpha*alpha*|x|).clamp_min(0)
        return a * a, a
    if p.surrogate_id == 4:  # SoftSign: z = 1/alpha + |x|; 1 / (2*alpha*z*z)
        return 1 / a, 2 * a
    return a, 0.0  # SuperSpike: z = 1 + |x|; alpha / (z*z)


def _use_kernel(x: torch.Tensor, p: LIFParams, fast: bool) -> bool:
    return fast and x.dtype == torch.float32 and p.surrogate_id in _KERNEL_SURROGATES and kernels.cpu_enabled("lif", x)


def _forward(x: torch.Tensor, v0: torch.Tensor, p: LIFParams, kernel: bool):
    """(spikes [T, ...], final membrane [...], H [T, ...] float32) of the recurrence from ``v0``."""
    if not kernel:
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.sj_lif.forward(x, v0, p.tau, p.decay_input, p.v_threshold, p.v_reset, True, p.alpha,
                                            False, p.surrogate_id)  # fmt: skip
    x = x.contiguous()
    t_steps, n = x.shape[0], x[0].numel()
    v = kernels.empty(v0.shape, torch.float32).copy_(v0).reshape(-1)  # updated in place: the final V
    spikes, h = kernels.empty(x.shape, x.dtype), kernels.empty(x.shape, torch.float32)
    kernels.use_threads(torch.get_num_threads())
    kernels.load("lif").lif_forward(
        x.reshape(-1).numpy(), v.numpy(), h.reshape(-1).numpy(), spikes.reshape(-1).numpy(), t_steps, n, p.tau,
        p.v_threshold, 0.0 if p.v_reset is None else p.v_reset, p.decay_input, p.v_reset is not None, True, _BLOCK,
    )  # fmt: skip
    return spikes, v.reshape(v0.shape), h


def _backward(grad_spikes, grad_v, h: torch.Tensor, p: LIFParams, kernel: bool, input_dtype: torch.dtype = torch.float32):
    """(gradient of the input [T, ...], of the initial membrane [...]) from the saved H."""
    if grad_spikes is None:
        grad_spikes = torch.zeros_like(h, dtype=input_dtype)
    if grad_v is None:
        grad_v = torch.zeros_like(h[0])
    if not kernel:
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.sj_lif.backward(grad_spikes, grad_v, h, p.tau, p.decay_input, p.v_threshold, p.v_reset,
                                             True, p.alpha, False, p.surrogate_id)  # fmt: skip
    t_steps, n = h.shape[0], h[0].numel()
    gs = grad_spikes.to(torch.float32).contiguous()
    carry = kernels.empty((n,), torch.float32).copy_(grad_v.reshape(-1))  # in: dL/dV_T, out: dL/dV_0
    gx = kernels.empty(h.shape, torch.float32)
    c1, c2 = _kernel_constants(p)
    kernels.use_threads(torch.get_num_threads())
    kernels.load("lif").lif_backward(gs.reshape(-1).numpy(), h.contiguous().reshape(-1).numpy(), carry.numpy(),
                                     gx.reshape(-1).numpy(), t_steps, n, p.tau, p.v_threshold, p.decay_input,
                                     p.v_reset is not None, p.surrogate_id, c1, c2, _BLOCK)  # fmt: skip
    return gx.to(input_dtype), carry.reshape(h.shape[1:])


class _LIF(torch.autograd.Function):
    """x_seq [T, ...], v0 [...] -> spikes [T, ...], v_T [...]; saves H [T, ...] only."""

    @staticmethod
    def forward(ctx, x_seq, v0, p, kernel):
        spikes, v, h = _forward(x_seq, v0, p, kernel)
        tape = recompute.active()
        if tape is not None:  # the memory engine: H is known as the charge of this input, spikes as H >= V_th
            tape.add_lif(x_seq, v0, h, spikes, p.v_threshold, functools.partial(lif_charge, p=p, kernel=kernel))
        ctx.save_for_backward(h)
        ctx.meta = (p, kernel, x_seq.dtype, v0.dtype)
        return spikes, v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v):
        (h,) = ctx.saved_tensors
        p, kernel, x_dtype, v_dtype = ctx.meta
        gx, gv = _backward(grad_spikes, grad_v, h, p, kernel, x_dtype)
        return gx, gv.to(v_dtype), None, None


def lif_charge(x_seq: torch.Tensor, v0: torch.Tensor, p: LIFParams, kernel: bool) -> torch.Tensor:
    """H [T, ...] of the recurrence, computed as `lif_multi_step` computes it (the memory
    engine's recomputation: the same operations, so the same bits)."""
    return _forward(x_seq, v0, p, kernel)[2]


def lif_multi_step(x_seq: torch.Tensor, v0: torch.Tensor, p: LIFParams, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The LIF operator over ``x_seq [T, ...]`` from membrane ``v0 [...]`` (float32), with
    ``detach_reset``: ``(spikes [T, ...] in x's dtype, final membrane [...])``, both differentiable.
    ``fast``: the compiled CPU kernel where it applies (see the module docstring)."""
    return _lif(x_seq, v0, p, _use_kernel(x_seq, p, fast))


def _lif(x_seq: torch.Tensor, v0: torch.Tensor, p: LIFParams, kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(v0.shape) != tuple(x_seq.shape[1:]):
        raise ValueError(f"membrane shape {tuple(v0.shape)} does not match input steps {tuple(x_seq.shape[1:])}")
    return _LIF.apply(x_seq, v0, p, kernel)


class LIFNode(neuron.LIFNode):
    """SpikingJelly's ``LIFNode`` whose multi-step forward is `lif_multi_step` (see the module
    docstring). Same arguments and state as ``spikingjelly.activation_based.neuron.LIFNode``;
    ``fast=False`` keeps this node off the compiled CPU kernel."""

    def __init__(self, *args: Any, fast: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = bool(fast)

    def operator_params(self) -> LIFParams | None:
        """The constants of `lif_multi_step` for this node, or None when it does not apply."""
        spec = _surrogate_spec(self.surrogate_function)
        if spec is None or not self.detach_reset or self.store_v_seq or getattr(self, "_neuron_precision", None):
            return None
        return LIFParams(float(self.tau), bool(self.decay_input), float(self.v_threshold),
                         None if self.v_reset is None else float(self.v_reset), spec[0], spec[1])  # fmt: skip

    def materialize_states(self, inputs, states, step_mode):
        """SpikingJelly's states, with a reset membrane made in float32 for half-precision input.

        SpikingJelly makes the membrane in the input's dtype, and its fused CUDA/Triton kernels
        take a float32 membrane only: with a float16 / bfloat16 input (``16-mixed``,
        ``bf16-mixed``) every LIF would fall back to the torch reference (about a dozen kernels
        per time step). A float32 membrane keeps the fused kernel (spikes in the input's dtype)."""
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        if (states and isinstance(states[0], float) and x.dtype in (torch.float16, torch.bfloat16)
                and getattr(self, "_neuron_precision", None) is None):  # fmt: skip
            return (torch.full_like(x, states[0], dtype=torch.float32), *states[1:])
        return super().materialize_states(inputs, states, step_mode)

    def multi_step_forward(self, x_seq: torch.Tensor, *args: torch.Tensor, **kwargs: object):
        p = None if (args or kwargs or x_seq.dim() < 2) else self.operator_params()
        if p is None or x_seq.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return super().multi_step_forward(x_seq, *args, **kwargs)
        v = self._memories.get("v")
        if isinstance(v, float):  # a reset state: one value for every neuron, no [N] tensor
            v0 = torch.full((), v, dtype=torch.float32, device=x_seq.device).expand(x_seq.shape[1:])
        else:
            v0 = self.materialize_states((x_seq,), tuple(self._memories.values()), "m")[0]
            if not isinstance(v0, torch.Tensor) or v0.dtype != torch.float32:
                return super().multi_step_forward(x_seq)
        kernel = _use_kernel(x_seq, p, self.fast)
        spikes, v_last = _lif(x_seq, v0, p, kernel)
        seg = recompute.lif_segment(x_seq, v0, spikes, v_last, functools.partial(lif_charge, p=p, kernel=kernel),
                                    functools.partial(_backward, p=p, kernel=kernel, input_dtype=x_seq.dtype))  # fmt: skip
        if seg is not None:  # after a batch norm, in a recomputing memory mode: the backward by channel slices
            spikes, v_last = seg
        self._memories["v"] = v_last
        self.v_seq = None
        return spikes

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fast={self.fast}"


def set_fast_kernels(model: nn.Module, enabled: bool) -> int:
    """Let every `LIFNode` of ``model`` use the compiled CPU kernel (``enabled``) or not;
    returns how many nodes. Off, the CPU runs SpikingJelly's operators (the same results)."""
    count = 0
    for m in model.modules():
        if isinstance(m, LIFNode):
            m.fast = bool(enabled)
            count += 1
    return count


def with_spikingjelly_neurons(model: nn.Module) -> nn.Module:
    """``model`` with every `LIFNode` replaced, in place, by SpikingJelly's own ``LIFNode``
    of the same settings (the official network: the baseline of the benchmarks and tests)."""
    for m in list(model.modules()):
        for name, c in list(m.named_children()):
            if isinstance(c, LIFNode):
                setattr(m, name, neuron.LIFNode(tau=c.tau, decay_input=c.decay_input, v_threshold=c.v_threshold,
                                                v_reset=c.v_reset, surrogate_function=c.surrogate_function,
                                                detach_reset=c.detach_reset, step_mode=c.step_mode,
                                                store_v_seq=c.store_v_seq))  # fmt: skip
    return model
