"""Training memory of the spiking networks: what is kept for the backward pass, and how.

One switch per network, :func:`set_memory` (``SNNClassifier(memory=...)``, ``module.memory`` in
the configs), with three modes. Every mode gives the same losses and gradients, to the bit, as
``"none"`` (``tests/test_memory.py`` compares them with ``torch.equal``); they trade memory for
recomputation:

* ``"none"``: what autograd keeps by default (each LIF's charged membrane H, each convolution's
  input spikes as float32, each batch norm's input, max-pooling indices).
* ``"bits"`` (the default of ``SNNClassifier``):
  - the input of every convolution fed by a neuron, and of the classifier, is saved as bits
    (:mod:`i2e_train.models.bitpack`, 1 bit per spike instead of 32), the network input too
    when it holds only 0 and 1 (events); unpacked in the backward;
  - a downsampling block's first neuron and its downsampling neuron, which read the same input,
    keep that input once instead of one H each (:class:`~i2e_train.models.lif.LIFNode`
    ``save_input``); their backward recomputes H in cache;
  - ``bn -> LIF`` inside a block keeps only the batch norm's input (:func:`bn_fire`): its output
    (the LIF input) is recomputed in the backward by the very same batch-norm call, running
    statistics untouched;
  - max pooling keeps only its argmax, as int8 window offsets;
  - the stem on events keeps only the events as bits and its pooling argmax: its convolution and
    batch norm run again in the backward, which never holds the whole gradient of the batch
    norm's output (:mod:`i2e_train.models.event_stem`, CPU fast path).
* ``"bits+checkpoint"``: ``"bits"``, and every residual block keeps only its input: its forward
  runs again in the backward (:func:`checkpointed`), as does the stem's convolution and batch
  norm from the bit-packed events where the fused stem does not run (CUDA, plain layers). About
  one more forward pass per step.

Recomputed regions use PyTorch's non-reentrant checkpointing, so the backward graph is the one
of the plain network (the same gradient accumulation order); a region's batch-norm running
statistics and neuron states are put back after its recomputation (:class:`_Recompute`), and it
starts from the neuron states its forward started from. Forward hooks of the modules in a region
run again when it is recomputed. Under ``torch.no_grad`` and ``torch.compile`` every mode runs
the plain forward; under autocast, convolution inputs are kept as autocast keeps them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
from spikingjelly.activation_based.base import MemoryModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import bitpack
from .bn_lif import bn_lif, bn_lif_ok
from .layers import Conv2d, MaxPool2d, per_frame
from .lif import LIFNode

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
    """Put every layer of ``model`` in memory mode ``mode`` (see the module docstring).

    Convolutions fed by a spiking neuron (the pairs a block lists in ``fire_conv_pairs()``) pack
    their input unchecked on GPUs; every other :class:`~i2e_train.models.layers.Conv2d` packs its
    input only when a check finds spikes. Neurons that read one shared tensor (a block's
    ``shared_input_neurons()``: its first neuron and the downsampling one) keep that tensor,
    once, instead of one H each; the others keep H (recomputing it from the input costs more than
    reading it). Returns how many layers were switched.
    """
    mode = check_memory_mode(mode)
    on = mode != "none"
    count = 0
    for m in model.modules():
        if isinstance(m, LIFNode):
            m.save_input = False  # H, unless the neuron shares its input (below)
        elif isinstance(m, MaxPool2d):
            m.compact_indices = on
        elif isinstance(m, Conv2d):
            m.pack_input = "events" if on else None
        elif isinstance(m, MemoryModeMixin):
            m.memory = mode
        else:
            continue
        count += 1
    for m in model.modules():
        if not (on and isinstance(m, MemoryModeMixin)):
            continue
        for neuron, conv in m.fire_conv_pairs():
            if isinstance(conv, Conv2d) and is_spiking(neuron):
                conv.pack_input = "spikes"
        for neuron in m.shared_input_neurons():
            if isinstance(neuron, LIFNode):
                neuron.save_input = True
    return count


def _plain(regions_needed: bool) -> bool:
    """True when nothing is saved for a backward anyway, or the code is being compiled."""
    return not regions_needed or not torch.is_grad_enabled() or torch.compiler.is_compiling()


class _Recompute:
    """The recomputation context of a region: its neurons start from the states they had when the
    region's forward ran, and its batch norms update throw-away copies of their running
    statistics; afterwards the neuron states and the original buffers (never written, so their
    version counters do not move) are put back: a recomputation leaves no trace."""

    def __init__(self, modules: Iterable[nn.Module]):
        modules = list(modules)
        self.neurons = [m for m in modules if isinstance(m, MemoryModule)]
        self.norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.at_forward = [dict(m._memories) for m in self.neurons]

    def __enter__(self) -> "_Recompute":
        self.states = [dict(m._memories) for m in self.neurons]
        self.buffers = [dict(m._buffers) for m in self.norms]
        for m, states in zip(self.neurons, self.at_forward):
            m._memories.update(states)
        for m in self.norms:
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.clone()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, states in zip(self.neurons, self.states):
            m._memories.update(states)
        for m, buffers in zip(self.norms, self.buffers):
            m._buffers.update(buffers)


def _states_are_reset(modules: Iterable[nn.Module]) -> bool:
    """Every neuron state is a plain number (reset), so a recomputation can start from it."""
    return all(
        not isinstance(v, torch.Tensor) for m in modules if isinstance(m, MemoryModule) for v in m._memories.values()
    )


def checkpointed(fn: Callable[..., torch.Tensor], args: tuple, modules: Iterable[nn.Module]) -> torch.Tensor:
    """``fn(*args)`` keeping only ``args`` for the backward, where ``fn`` runs again.

    ``modules``: the layers ``fn`` uses (their neuron states and batch-norm statistics are handled
    by :class:`_Recompute`). Runs ``fn`` plainly when there is nothing to save, or when a neuron
    carries a state tensor from an earlier call (a recomputation could not start from it).
    """
    modules = list(modules)
    if _plain(True) or not _states_are_reset(modules):
        return fn(*args)
    recompute = _Recompute(modules)
    return checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=False, context_fn=lambda: (nullcontext(), recompute)
    )


def bn_fire(bn: nn.Module, neuron: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``neuron(bn(x))`` for a convolution output ``x [T, B, C, H, W]`` -> spikes ``[T, B, C, H, W]``.

    In the ``bits`` modes only ``x`` (the batch norm's own saved input) is kept, not the batch
    norm's output that the neuron would keep: on the CPU fast path one autograd function that
    recomputes the batch norm in its backward (:mod:`i2e_train.models.bn_lif`), elsewhere (CUDA,
    plain layers, hooks) a recomputed region.
    """
    if mode == "none" or _plain(x.requires_grad or any(p.requires_grad for p in bn.parameters())):
        return neuron(per_frame(bn, x))
    spikes = bn_lif(bn, neuron, x) if bn_lif_ok(bn, neuron, x) else None
    if spikes is not None:
        return spikes
    return checkpointed(lambda c: neuron(per_frame(bn, c)), (x,), (bn, neuron))


def linear_on_spikes(fc: nn.Linear, spikes: torch.Tensor, mode: str, trusted: bool) -> torch.Tensor:
    """``fc(spikes)`` with the saved copy of ``spikes`` (the classifier's input) kept as bits;
    ``trusted``: the input comes from a spiking neuron (see :func:`bitpack.pack_spikes`)."""
    if mode == "none" or _plain(True):
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
