"""Drop-in ``Conv2d`` and ``MaxPool2d`` that are faster on CPU and give bit-identical results.

Both are subclasses of the ``torch.nn`` layers (same arguments, parameters and state-dict keys);
off CPU, with ``fast = False``, or for settings not listed below, they are exactly the parent
layer. :func:`set_fast_kernels` switches these two and the fused LIF
(:class:`i2e_train.models.lif.LIFNode`) of a whole network on or off: off gives the plain
``torch.nn`` / SpikingJelly network, the baseline of ``benchmarks/run.py``.

* :class:`Conv2d`: the forward is the same ``F.conv2d`` call. In the backward the input gradient
  comes from the same oneDNN primitive, and for small outputs (``H_out * W_out <= 4``: the last
  stage of MS-ResNet at 64x64 input and the strided convolution entering it) the weight gradient
  is one im2col + GEMM, faster there than oneDNN's kernel, which for these shapes falls back to
  the same GEMM formulation (README, Measured). Whether the two agree to the bit is not assumed: the
  first backward of every shape computes both and compares them, and a shape whose results differ
  keeps oneDNN's (the decision is cached per shape, :func:`gemm_weight_grad_decisions`).
* :class:`MaxPool2d`: on CPU a numba kernel that does what PyTorch's NCHW kernel does, element
  for element (window clipped to the input, first maximum in row-major order kept, NaN wins;
  ties are common after a batch norm of sparse events), with 32-bit argmax indices, and a
  backward that adds the output gradients at the argmax in PyTorch's order. Values and
  gradients are the same.

Both also save less for the backward when :func:`i2e_train.models.memory.set_memory` asks them
to, on any device and with the fast paths on or off: ``Conv2d.pack_input`` keeps a spike input
as bits (:mod:`i2e_train.models.bitpack`), ``MaxPool2d.compact_indices`` keeps only the argmax
(int8 window offsets in the numba kernel, int32 indices otherwise) instead of the input and
int64 indices. Gradients stay the same to the bit.

The numba kernels (:mod:`i2e_train.kernels.pooling`) are compiled on first use and cached on disk;
when numba cannot be imported the layers log a warning once and run the parent layers.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

from i2e_train import kernels

from . import bitpack

__all__ = ["Conv2d", "MaxPool2d", "fast_conv_backward", "gemm_weight_grad_decisions", "maxpool_backward",
           "maxpool_forward", "per_frame", "set_fast_kernels"]

log = logging.getLogger(__name__)
_GEMM_MAX_OUTPUT_PIXELS = 4
_decisions: dict[tuple, bool] = {}  # shape key -> GEMM weight gradient equals oneDNN's
_lock = threading.Lock()


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame layer to a sequence: ``[T, B, ...] -> [T*B, ...] -> [T, B, ...]``."""
    t, b = x.shape[0], x.shape[1]
    y = module(x.flatten(0, 1))
    return y.reshape(t, b, *y.shape[1:])


def gemm_weight_grad_decisions() -> dict[tuple, bool]:
    """Per convolution shape, whether the GEMM weight gradient was found bit-identical (a copy)."""
    with _lock:
        return dict(_decisions)


def _gemm_weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """dL/dW of a conv2d as one GEMM: grad [Co, N*L] @ im2col(x) [N*L, Ci*kh*kw]."""
    co, ci, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [N, Ci*kh*kw, L]
    g = grad.flatten(2).transpose(0, 1).reshape(co, -1)  # [Co, N*L]
    return (g @ cols.transpose(0, 1).reshape(ci * kh * kw, -1).t()).reshape(co, ci, kh, kw)


def _conv_backward(grad, x, weight, stride, padding, mask_x: bool, mask_w: bool):
    """``convolution_backward`` exactly as autograd calls it for ``F.conv2d`` without bias (oneDNN
    on CPU, cuDNN on CUDA)."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [mask_x, mask_w, False]
    )


def fast_conv_backward(grad, x, weight, stride, padding, need_x: bool, need_w: bool):
    """The CPU backward of a conv2d without bias, ``(grad_input, grad_weight)`` (None where not
    needed): oneDNN, or for small outputs the GEMM weight gradient when it was found bit-identical
    for this shape (decided on first use)."""
    grad = grad.contiguous()
    small = grad.shape[2] * grad.shape[3] <= _GEMM_MAX_OUTPUT_PIXELS
    if not need_w or not small:
        gx, gw, _ = _conv_backward(grad, x, weight, stride, padding, need_x, need_w)
        return gx, gw
    gx = _conv_backward(grad, x, weight, stride, padding, True, False)[0] if need_x else None
    key = (tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), x.dtype)
    with _lock:
        decided = _decisions.get(key)
    if decided is False:
        return gx, _conv_backward(grad, x, weight, stride, padding, False, True)[1]
    gw = _gemm_weight_grad(x, grad, weight, stride, padding)
    if decided is None:  # first time for this shape: keep the GEMM only if it is the same to the bit
        reference = _conv_backward(grad, x, weight, stride, padding, False, True)[1]
        same = torch.equal(gw, reference)
        with _lock:
            _decisions[key] = same
        gw = gw if same else reference
    return gx, gw


class _Conv2dFn(torch.autograd.Function):
    """conv2d without bias whose backward is either the fast CPU one (``fast``) or autograd's own
    ``convolution_backward``; with ``pack`` ("spikes" or "events") the input is saved as bits
    (:mod:`i2e_train.models.bitpack`) when it holds only 0 and 1, and rebuilt in the backward."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, fast=True, pack=None):
        packed = bitpack.pack_spikes(x, trusted=pack == "spikes") if pack else None
        if packed is None:
            ctx.save_for_backward(x, weight)
            ctx.layout = None
        else:
            ctx.save_for_backward(packed[0], weight)
            ctx.layout = packed[1]
        ctx.conv = (stride, padding)
        ctx.fast = fast
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        saved, weight = ctx.saved_tensors
        x = saved if ctx.layout is None else bitpack.unpack_spikes(saved, ctx.layout)
        stride, padding = ctx.conv
        if ctx.fast:
            gx, gw = fast_conv_backward(grad, x, weight, stride, padding, *ctx.needs_input_grad[:2])
        else:
            gx, gw, _ = _conv_backward(grad, x, weight, stride, padding, *ctx.needs_input_grad[:2])
        return gx, gw, None, None, None, None


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a type autocast does not know, e.g.
    ``meta``, where ``torch.is_autocast_enabled`` raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _fast_input(layer: nn.Module, x: torch.Tensor) -> bool:
    """What both fast layers need: switched on, a contiguous CPU float32 [N, C, H, W] input, numba."""
    return (
        layer.fast
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous()
        and kernels.load("pooling") is not None
    )


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with the bit-identical faster CPU backward described in the module docstring.

    ``pack_input`` (set by :func:`i2e_train.models.memory.set_memory`): None keeps the input for
    the backward as it is; ``"spikes"`` (the input is the output of a spiking neuron) or
    ``"events"`` (it may be, e.g. the network input: checked) save it as bits when it holds only
    0 and 1, on any device.
    """

    fast: bool = True
    pack_input: str | None = None

    def _custom_ok(self, x: torch.Tensor) -> bool:
        """Settings the custom autograd function covers (the others run ``nn.Conv2d``)."""
        return not (
            self.bias is not None
            or self.groups != 1
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or not torch.is_grad_enabled()
            or _autocast_on(x.device.type)
            or not (x.requires_grad or self.weight.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._custom_ok(x):
            return super().forward(x)
        fast = _fast_input(self, x) and self.weight.is_contiguous()
        if not fast and self.pack_input is None:
            return super().forward(x)
        return _Conv2dFn.apply(x, self.weight, self.stride, self.padding, fast, self.pack_input)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def maxpool_forward(x: torch.Tensor, kernel, stride, padding, relative: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The numba max pooling of a contiguous CPU float32 ``x [N, C, H, W]``: ``(y [N, C, Ho, Wo],
    argmax [N, C, Ho, Wo], geometry)``, the argmax as int32 plane indices or (``relative``) int8
    window offsets; ``geometry`` is what :func:`maxpool_backward` needs besides them."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = kernels.empty((n, c, oh, ow), x.dtype)
    idx = kernels.empty((n, c, oh, ow), torch.int8 if relative else torch.int32)
    kernels.use_threads(torch.get_num_threads())
    kernels.load("pooling").maxpool_forward(x.reshape(n * c, h, w).numpy(), y.view(n * c, oh, ow).numpy(),
                                            idx.view(n * c, oh, ow).numpy(), kh, kw, sh, sw, ph, pw, relative)  # fmt: skip
    return y, idx, (h, w, kw, sh, sw, ph, pw, relative)


def maxpool_backward(grad: torch.Tensor, idx: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """The input gradient ``[N, C, H, W]`` of :func:`maxpool_forward` from the output gradient
    ``grad [N, C, Ho, Wo]`` and its argmax. Every ``[H, W]`` plane is computed on its own, so a
    slice of channels gives that slice of the whole, to the bit."""
    n, c, oh, ow = idx.shape
    h, w, *window = geometry
    grad = grad.to(torch.float32).contiguous()
    gx = kernels.empty((n, c, h, w), torch.float32)
    kernels.use_threads(torch.get_num_threads())
    kernels.load("pooling").maxpool_backward(grad.view(n * c, oh, ow).numpy(), idx.view(n * c, oh, ow).numpy(),
                                             gx.view(n * c, h, w).numpy(), *window)  # fmt: skip
    return gx


class _MaxPoolFn(torch.autograd.Function):
    """The numba max pooling; argmax saved as int32 plane indices or (``relative``) int8 window offsets."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, relative=False):
        y, idx, ctx.geometry = maxpool_forward(x, kernel, stride, padding, relative)
        ctx.save_for_backward(idx)
        return y

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return maxpool_backward(grad, idx, ctx.geometry), None, None, None, None


class _MaxPoolIndicesFn(torch.autograd.Function):
    """``max_pool2d_with_indices`` on any device, saving only its argmax, as int32 (autograd saves
    the input and int64 indices); the backward is the same ATen kernel, which reads the input's
    shape, dtype and memory format only, so it gets an uninitialised tensor of that kind."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(idx.to(torch.int32))
        ctx.pool = (kernel, stride, padding, dilation, ceil_mode)
        fmt = torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) else None
        ctx.input = (x.shape, x.dtype, x.device, fmt or torch.contiguous_format)
        return y

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        shape, dtype, device, fmt = ctx.input
        placeholder = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad, placeholder, *ctx.pool, idx.to(torch.int64))
        return gx, None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with the bit-identical numba kernel on CPU (see the module docstring).

    ``compact_indices`` (set by :func:`i2e_train.models.memory.set_memory`): keep only the argmax
    for the backward, as int8 window offsets (numba path) or int32 indices (any device), never the
    input; same gradients.
    """

    fast: bool = True
    compact_indices: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, padding, dilation = _pair(self.kernel_size), _pair(self.padding), _pair(self.dilation)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        if self.return_indices:
            return super().forward(x)
        if _fast_input(self, x) and not self.ceil_mode and dilation == (1, 1):
            relative = self.compact_indices and kernel[0] * kernel[1] <= 127
            return _MaxPoolFn.apply(x, kernel, stride, padding, relative)
        if self.compact_indices and torch.is_grad_enabled() and x.requires_grad and x.dim() == 4:
            return _MaxPoolIndicesFn.apply(x, kernel, stride, padding, dilation, self.ceil_mode)
        return super().forward(x)


def set_fast_kernels(model: nn.Module, enabled: bool) -> int:
    """Turn the bit-identical fast paths of every :class:`Conv2d`, :class:`MaxPool2d` and
    :class:`~i2e_train.models.lif.LIFNode` in ``model`` on or off; returns how many layers."""
    from .lif import LIFNode

    count = 0
    for m in model.modules():
        if isinstance(m, (Conv2d, MaxPool2d, LIFNode)):
            m.fast = bool(enabled)
            count += 1
    return count
