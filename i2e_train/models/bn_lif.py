"""Batch norm followed by the fused LIF, keeping only the batch norm's input for the backward.

:func:`bn_lif` computes ``neuron(bn(x))`` for a convolution output ``x [T*B, C, H, W]`` in one
autograd function (the CPU fast path of :func:`i2e_train.models.memory.bn_fire`). The forward
calls the batch norm module itself (running statistics and ``num_batches_tracked`` move exactly
as in the plain network) and the LIF kernel without storing H; it keeps ``x``, the affine
parameters and the initial membrane. The backward recomputes the batch norm's output, mean and
inverse standard deviation with the same ATen call (``native_batch_norm`` in training mode,
without running statistics), runs the LIF backward that recomputes H from that output, and then
``native_batch_norm_backward``, as autograd does for the plain network: the same gradients to the
bit, without keeping the batch norm's output (which the LIF would keep) or H.
"""

from __future__ import annotations

import torch
from torch import nn

from . import recompute
from .lif import LIFNode, _kernel_backward, _kernel_forward, _surrogate_constants

__all__ = ["bn_lif", "bn_lif_ok"]


class _BatchNormLIF(torch.autograd.Function):
    """x [T*B, C, H, W], weight, bias [C], v0 [B, C, H, W] -> spikes [T, B, C, H, W], v_T [B, C, H, W]."""

    @staticmethod
    def forward(ctx, x, weight, bias, v0, bn, t_steps, params):
        y = bn(x)  # the module's own forward (grad is off here): [T*B, C, H, W]
        spikes, v, _ = _kernel_forward(y.view(t_steps, *v0.shape), v0, params, store_h=False)
        ctx.save_for_backward(x, weight, bias, v0)
        ctx.meta = (bn.eps, t_steps, params)
        return spikes, v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v):
        x, weight, bias, v0 = ctx.saved_tensors
        eps, t_steps, params = ctx.meta
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        gy, carry = _kernel_backward(grad_spikes, grad_v, params, x=y.view(t_steps, *v0.shape), v0=v0)
        mask = list(ctx.needs_input_grad[:3])
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy.view(x.shape), x, weight, None, None, mean, invstd, True, eps, mask
        )
        return gx, gw, gb, carry.reshape(v0.shape), None, None, None


def _hooked(*modules: nn.Module) -> bool:
    return recompute.user_hooks(*modules)  # the memory engine's own hooks do not count


def bn_lif_ok(bn: nn.Module, neuron: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`bn_lif` covers ``neuron(bn(x))`` for ``x [T, B, C, H, W]``: a training-mode
    affine ``nn.BatchNorm2d``, a fused-kernel LIF (CPU float32, see ``LIFNode._fused_ok``), no
    module hooks on either (they would not see the fused call), gradients wanted, no autocast."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.affine
        and isinstance(neuron, LIFNode)
        and x.dim() == 5
        and x.is_contiguous()
        and neuron._fused_ok(x)
        and not (_hooked(bn) or _hooked(neuron))
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and (x.requires_grad or bn.weight.requires_grad or bn.bias.requires_grad)
    )


def bn_lif(bn: nn.BatchNorm2d, neuron: LIFNode, x: torch.Tensor) -> torch.Tensor | None:
    """``neuron(bn(x))`` for ``x [T, B, C, H, W]`` (see the module docstring; check
    :func:`bn_lif_ok` first), or None, having done nothing, when the neuron's state cannot start
    the kernel. Updates the neuron's membrane state as its own forward does."""
    t_steps = x.shape[0]
    v0 = neuron.initial_membrane(x, scalar_ok=True)
    if v0 is None:
        return None
    params = (float(neuron.tau), bool(neuron.decay_input), float(neuron.v_threshold),
              None if neuron.v_reset is None else float(neuron.v_reset), _surrogate_constants(neuron.surrogate_function))  # fmt: skip
    spikes, v_last = _BatchNormLIF.apply(x.flatten(0, 1), bn.weight, bn.bias, v0, bn, t_steps, params)
    neuron._memories["v"] = v_last
    neuron.v_seq = None
    return spikes
