"""The stem ``conv -> batch norm -> max pooling`` on events, keeping only the events (as bits)
and the pooling argmax for the backward.

:func:`event_stem` computes ``pool(bn(conv(x)))`` for events ``x [T*B, C_in, H, W]`` (values 0
and 1) in one autograd function, the CPU fast path of the stem in the ``bits`` memory modes
(:mod:`i2e_train.models.memory`). What the plain layers keep for the backward, the convolution's
output (the batch norm's input, ``[T*B, w0, H/2, W/2]`` float32: the largest activation of the
network), is recomputed instead: the forward keeps the events as bits
(:mod:`i2e_train.models.bitpack`), the pooling argmax (int8 window offsets) and the parameters.

The backward runs the convolution again (the same ``F.conv2d`` call, so the same output), the
batch-norm statistics with the same ATen call (``native_batch_norm`` in training mode, as
:mod:`i2e_train.models.bn_lif` does), then the pooling and batch-norm backward a few channels at a
time, and the convolution's weight gradient (:func:`~i2e_train.models.layers.fast_conv_backward`,
what the plain convolution's backward calls). Chunking over channels changes no bit: the numba
pooling backward computes every ``[H, W]`` plane on its own, and PyTorch's CPU batch-norm backward
(contiguous input) reduces each channel on its own (over batch and pixels, in the same order
whatever the number of channels); so the gradients are those of the plain layers, while the
gradient of the batch norm's output, ``[T*B, w0, H/2, W/2]``, never exists whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bitpack, recompute
from .layers import Conv2d, MaxPool2d, _fast_input, _pair, fast_conv_backward, maxpool_backward, maxpool_forward

__all__ = ["event_stem", "event_stem_ok"]

CHUNK_BYTES = 2 << 20  # per chunk of channels, of each [T*B, chunk, H/2, W/2] tensor in the backward


class _EventStemFn(torch.autograd.Function):
    """events x [N, C_in, H, W] -> pooled [N, C, Ho, Wo] (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, conv_weight, bn_weight, bn_bias, bits, layout, conv, bn, pool):
        c = F.conv2d(x, conv_weight, None, conv.stride, conv.padding)  # [N, C, H/2, W/2]
        y = bn(c)  # the module's own forward (grad is off here): running statistics move as usual
        del c
        out, idx, geometry = maxpool_forward(y, *pool, True)
        ctx.save_for_backward(bits, conv_weight, bn_weight, bn_bias, idx)
        ctx.meta = (layout, conv.stride, conv.padding, bn.eps, geometry)
        return out

    @staticmethod
    def backward(ctx, grad):
        bits, conv_weight, bn_weight, bn_bias, idx = ctx.saved_tensors
        layout, stride, padding, eps, geometry = ctx.meta
        need_w, need_bw, need_bb = ctx.needs_input_grad[1:4]
        x = bitpack.unpack_spikes(bits, layout)
        c = F.conv2d(x, conv_weight, None, stride, padding)  # [N, C, H/2, W/2], as in the forward
        mean, invstd = torch.ops.aten.native_batch_norm(c, bn_weight, bn_bias, None, None, True, 0.0, eps)[1:]
        grad = grad.contiguous()
        n, channels = c.shape[:2]
        gc = torch.empty_like(c)  # dL/dc
        g_bw, g_bb = torch.empty_like(bn_weight), torch.empty_like(bn_bias)
        per_channel = c[:, :1].numel() * c.element_size()
        step = max(1, CHUNK_BYTES // per_channel)  # channels per chunk
        for c0 in range(0, channels, step):
            part = slice(c0, min(channels, c0 + step))
            gy = maxpool_backward(grad[:, part], idx[:, part].contiguous(), geometry)  # dL/dbn(c), this part
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gy, c[:, part].contiguous(), bn_weight[part], None, None, mean[part], invstd[part], True, eps,
                [True, need_bw, need_bb],
            )
            del gy
            gc[:, part] = gx
            if need_bw:
                g_bw[part] = gw
            if need_bb:
                g_bb[part] = gb
        del c
        g_conv = fast_conv_backward(gc, x, conv_weight, stride, padding, False, True)[1] if need_w else None
        return (None, g_conv, g_bw if need_bw else None, g_bb if need_bb else None, None, None, None, None, None)


def _hooked(*modules: nn.Module) -> bool:
    return recompute.user_hooks(*modules)  # the memory engine's own hooks do not count


def event_stem_ok(conv: nn.Module, bn: nn.Module, pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`event_stem` covers ``pool(bn(conv(x)))`` for ``x [N, C_in, H, W]``: the fast
    CPU layers (:class:`~i2e_train.models.layers.Conv2d` without bias, groups or dilation, a
    training-mode affine ``nn.BatchNorm2d``, :class:`~i2e_train.models.layers.MaxPool2d` with its
    numba kernel and window offsets), no module hooks, gradients wanted for the parameters and
    not for ``x``, not being compiled, no autocast."""
    return (
        type(conv) is Conv2d
        and type(bn) is nn.BatchNorm2d
        and type(pool) is MaxPool2d
        and _fast_input(conv, x)
        and conv.weight.is_contiguous()
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and bn.training
        and bn.affine
        and pool.fast
        and not pool.return_indices
        and not pool.ceil_mode
        and _pair(pool.dilation) == (1, 1)
        and _pair(pool.kernel_size)[0] * _pair(pool.kernel_size)[1] <= 127
        and not _hooked(conv, bn, pool)
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and not x.requires_grad
        and (conv.weight.requires_grad or bn.weight.requires_grad or bn.bias.requires_grad)
    )


def event_stem(conv: Conv2d, bn: nn.BatchNorm2d, pool: MaxPool2d, x: torch.Tensor) -> torch.Tensor | None:
    """``pool(bn(conv(x)))`` for events ``x [N, C_in, H, W]`` keeping only the events as bits and
    the pooling argmax (check :func:`event_stem_ok` first); None, having done nothing, when ``x``
    holds values other than 0 and 1 (then the plain layers must run)."""
    packed = bitpack.pack_spikes(x)
    if packed is None:
        return None
    kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return _EventStemFn.apply(x, conv.weight, bn.weight, bn.bias, packed[0], packed[1], conv, bn,
                              (kernel, stride, padding))  # fmt: skip
