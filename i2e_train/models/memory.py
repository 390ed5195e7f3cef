"""Training memory of any spiking network: what is kept for the backward pass, and how.

One switch per network, :func:`set_memory` (``SNNClassifier(memory=...)``, ``module.memory`` in
the configs), for any ``nn.Module``, with three modes. Every mode gives the same losses and
gradients, to the bit, as ``"none"`` (``tests/test_memory.py``, ``tests/test_memory_any_net.py``
compare them with ``torch.equal``); they trade memory for recomputation:

* ``"none"``: what autograd keeps by default.
* ``"bits"`` (the default of ``SNNClassifier``): the memory engine
  (:mod:`i2e_train.models.recompute`) keeps spikes as bits, recomputes in the backward the
  outputs of layers fed by spikes (convolution, linear, batch norm, pooling), and our LIF from its
  input; under autocast it casts spike inputs and weights itself, so nothing is lost there.
* ``"bits+checkpoint"``: ``"bits"``, and every residual block of the MS-ResNet family keeps only
  its input: its forward runs again in the backward (:func:`checkpointed`). About one more
  forward pass per step. Other networks: as ``"bits"``.

On CPU, in float32, the MS-ResNet family runs its **CPU layer** instead of the engine: its blocks
(:class:`MemoryModeMixin`) use fused numba paths that keep the same kind of things (the input
of every convolution fed by a neuron as bits, ``bn -> LIF`` keeping only the batch norm's input,
:func:`bn_fire`; int8 max-pooling offsets; the event stem keeping only the events as bits and the
pooling argmax, :mod:`i2e_train.models.event_stem`) faster there. ``bitpack.FORCE_TORCH = True``
runs the engine on CPU too.

Recomputed regions use PyTorch's non-reentrant checkpointing, so the backward graph is the one
of the plain network (the same gradient accumulation order); a region's batch-norm running
statistics and neuron states are put back after its recomputation, and it starts from the neuron
states its forward started from. Forward hooks of the modules in a region run again when it is
recomputed. Under ``torch.no_grad`` and ``torch.compile`` every mode runs the plain forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import bitpack, recompute
from .bn_lif import bn_lif, bn_lif_ok
from .layers import Conv2d, MaxPool2d, per_frame
from .lif import LIFNode
from .recompute import _plain, checkpointed

__all__ = [
    "MEMORY_MODES",
    "MemoryModeMixin",
    "bn_fire",
    "check_memory_mode",
    "checkpointed",
    "is_spiking",
    "linear_on_spikes",
    "set_memory",
]

MEMORY_MODES = ("none", "bits", "bits+checkpoint")


class MemoryModeMixin:
    """A network or block whose forward follows its ``memory`` mode (set by :func:`set_memory`)."""

    memory: str = "none"

    def fire_conv_pairs(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        """The (neuron, convolution) pairs in which the convolution's input is the neuron's output."""
        return ()

    def shared_input_neurons(self) -> tuple[nn.Module, ...]:
        """Neurons that read one and the same input tensor (kept once if they keep their input)."""
        return ()


def check_memory_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MEMORY_MODES`, else a ``ValueError`` naming them."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}; expected one of {', '.join(map(repr, MEMORY_MODES))}")
    return mode


def is_spiking(neuron: nn.Module) -> bool:
    """Whether the neuron's output holds only 0 and 1 (a Heaviside step in the forward)."""
    return isinstance(neuron, LIFNode) and bool(getattr(neuron.surrogate_function, "spiking", False))


def set_memory(model: nn.Module, mode: str) -> int:
    """Put ``model`` (any network) in memory mode ``mode`` (see the module docstring).

    Installs, once, the forward hooks of the engine (:mod:`i2e_train.models.recompute`) on the
    network, its recomputable layers and its binary spiking neurons; ``"none"`` leaves them
    idle. Blocks of our own family (:class:`MemoryModeMixin`) run their CPU layer when the input
    is on CPU (float32: not under autocast, and :data:`bitpack.FORCE_TORCH` off), the engine
    elsewhere. Returns how many
    layers take part.
    """
    mode = check_memory_mode(mode)
    model._i2e_memory = mode
    model._i2e_cpu_layer = any(isinstance(m, MemoryModeMixin) for m in model.modules())
    _set_internal(model, mode if model._i2e_cpu_layer else "none")
    _install(model.register_forward_pre_hook, _root_pre, model)
    _install(model.register_forward_hook, _root_post, model, always_call=True)
    count = 0
    for m in model.modules():
        if isinstance(m, recompute.RECOMPUTABLE) and m is not model:
            _install(m.register_forward_pre_hook, recompute.layer_pre, m)
            _install(m.register_forward_hook, recompute.layer_post, m)
        elif recompute.is_binary_neuron(m):
            _install(m.register_forward_hook, recompute.neuron_post, m)
        else:
            continue
        count += 1
    return count


def _install(register: Callable, hook: Callable, module: nn.Module, **kwargs: Any) -> None:
    """``register(hook)`` unless ``hook`` is already one of ``module``'s forward (pre-)hooks."""
    if not any(h is hook for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())):
        register(hook, **kwargs)


def _root_pre(model: nn.Module, args: tuple) -> None:
    """Before the network's forward: the CPU layer of our blocks (CPU input), else the engine."""
    mode = getattr(model, "_i2e_memory", "none")
    if mode == "none":
        return
    x = args[0] if args else None
    cpu_layer = (model._i2e_cpu_layer and isinstance(x, torch.Tensor) and x.device.type == "cpu"
                 and not bitpack.FORCE_TORCH and not torch.is_autocast_enabled("cpu"))  # fmt: skip
    if model._i2e_cpu_layer:
        _set_internal(model, mode if cpu_layer else ("checkpoint" if mode == "bits+checkpoint" else "engine"))
    if not cpu_layer:
        recompute.start(x, model)


def _root_post(model: nn.Module, args: tuple, out: Any) -> None:
    recompute.stop(model)


def _set_internal(model: nn.Module, mode: str) -> None:
    """The flags of our own layers and blocks for ``mode``: a memory mode (their CPU layer), or
    with the engine running ``"engine"`` (max pooling keeps int32 argmax, the engine does the
    rest) or ``"checkpoint"`` (the same, and blocks recomputed from their input)."""
    if getattr(model, "_i2e_internal", None) == mode:
        return
    model._i2e_internal = mode
    bits = mode in ("bits", "bits+checkpoint")
    for m in model.modules():
        if isinstance(m, LIFNode):
            m.save_input = False  # H, unless the neuron shares its input (below)
        elif isinstance(m, MaxPool2d):
            m.compact_indices = mode != "none"
        elif isinstance(m, Conv2d):
            m.pack_input = "events" if bits else None
        elif isinstance(m, MemoryModeMixin):
            m.memory = mode
    for m in model.modules():
        if not (bits and isinstance(m, MemoryModeMixin)):
            continue
        for neuron, conv in m.fire_conv_pairs():
            if isinstance(conv, Conv2d) and is_spiking(neuron):
                conv.pack_input = "spikes"
        for neuron in m.shared_input_neurons():
            if isinstance(neuron, LIFNode):
                neuron.save_input = True


def bn_fire(bn: nn.Module, neuron: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``neuron(bn(x))`` for a convolution output ``x [T, B, C, H, W]`` -> spikes ``[T, B, C, H, W]``.

    In the ``bits`` modes only ``x`` (the batch norm's own saved input) is kept, not the batch
    norm's output that the neuron would keep: on the CPU fast path one autograd function that
    recomputes the batch norm in its backward (:mod:`i2e_train.models.bn_lif`), elsewhere (CUDA,
    plain layers, hooks) a recomputed region.
    """
    if mode not in ("bits", "bits+checkpoint") or _plain(x.requires_grad or any(p.requires_grad for p in bn.parameters())):
        return neuron(per_frame(bn, x))
    spikes = bn_lif(bn, neuron, x) if bn_lif_ok(bn, neuron, x) else None
    if spikes is not None:
        return spikes
    return checkpointed(lambda c: neuron(per_frame(bn, c)), (x,), (bn, neuron))


def linear_on_spikes(fc: nn.Linear, spikes: torch.Tensor, mode: str, trusted: bool) -> torch.Tensor:
    """``fc(spikes)`` with the saved copy of ``spikes`` (the classifier's input) kept as bits;
    ``trusted``: the input comes from a spiking neuron (see :func:`bitpack.pack_spikes`)."""
    if mode not in ("bits", "bits+checkpoint") or _plain(True):
        return fc(spikes)
    storage = spikes.untyped_storage()._cdata  # the storage's identity (no data pointer read: fake tensors have none)

    def pack(t: torch.Tensor):
        if t.untyped_storage()._cdata == storage and t.dtype == spikes.dtype:
            packed = bitpack.pack_spikes(t, trusted=trusted)
            if packed is not None:
                return packed
        return t

    def unpack(saved):
        return saved if isinstance(saved, torch.Tensor) else bitpack.unpack_spikes(*saved)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fc(spikes)
