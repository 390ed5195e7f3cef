"""The memory engine for any network: what autograd saves for the backward, kept small.

Applied by :func:`i2e_train.models.memory.set_memory` to any ``nn.Module`` (our MS-ResNet family,
SpikingJelly's zoo, a user's own network). It changes no layer and no result: during the
network's forward it watches what autograd saves (``torch.autograd.graph.saved_tensors_hooks``)
and keeps, instead of the tensor,

* **bits** for a spike tensor: the output of a binary spiking neuron (SpikingJelly's IF / LIF /
  parametric LIF and their subclasses, with a Heaviside forward), or any view of it; 1 bit per
  element, unpacked in the backward (:mod:`i2e_train.models.bitpack`, tensor operations, no host
  synchronisation);
* **a recipe** for the output of a layer that can run again exactly (convolution, linear, batch
  norm, pooling, flatten, and SpikingJelly's multi-step wrappers of them) when the layer's input
  is itself spikes, a recipe or the network's input: the backward runs the layer again from that
  input (a batch norm in training mode with throw-away copies of its running statistics, so the
  output is the same and the statistics move once);
* **a recipe** for the half-precision copy of a convolution's or linear layer's weight that
  autocast makes (cast again in the backward), and, under autocast, a spike input of such a
  layer is cast by the engine first (exact: spikes are 0 and 1 in any float type) and kept as
  bits, instead of the copy autocast would make and keep.

Our :class:`~i2e_train.models.lif.LIFNode` on this path runs as a recomputed region
(:func:`~i2e_train.models.memory.checkpointed`): it keeps only its input (often itself a recipe),
and its membranes are computed again in the backward by the same operations. Every saved tensor
comes back bit for bit, so losses and gradients equal those of ``none``
(``tests/test_memory_any_net.py`` checks it with ``torch.equal``).

What is not recognised is kept as autograd keeps it (e.g. a residual sum fed to a neuron). The
engine is off under ``torch.no_grad`` and inside ``torch.compile`` (the plain forward runs).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.base import MemoryModule
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from . import bitpack

__all__ = ["RECOMPUTABLE", "active", "checkpointed", "is_binary_neuron", "kept_bytes", "paused", "start", "stop", "user_hooks"]

# Layers whose output is a deterministic function of their one input (batch norm: in training mode
# of the batch itself, recomputed with throw-away running statistics).
RECOMPUTABLE: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Flatten, sj_layer.SeqToANNContainer,
)  # fmt: skip
_CASTING = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # layers autocast runs in half precision
_BINARY_NEURONS = (sj_neuron.IFNode, sj_neuron.LIFNode, sj_neuron.ParametricLIFNode)

_local = threading.local()  # .tape: the _Tape of the forward in progress; .paused: recomputing


def is_binary_neuron(m: nn.Module) -> bool:
    """A SpikingJelly IF / LIF / parametric LIF (or subclass) whose forward is a Heaviside step:
    its output holds only 0 and 1."""
    return isinstance(m, _BINARY_NEURONS) and bool(getattr(m.surrogate_function, "spiking", False))


def _storage_view(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of ``t`` as a flat tensor of its dtype."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return t.new_empty(0).set_(t.untyped_storage(), 0, (n,), (1,))


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

    def __enter__(self) -> _Recompute:
        self.paused = paused()
        self.paused.__enter__()
        self.states = [dict(m._memories) for m in self.neurons]
        self.buffers = [dict(m._buffers) for m in self.norms]
        for m, states in zip(self.neurons, self.at_forward):
            m._memories.update(states)
        for m in self.norms:
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.clone()
        return self

    def __exit__(self, *exc: object) -> None:
        for m, states in zip(self.neurons, self.states):
            m._memories.update(states)
        for m, buffers in zip(self.norms, self.buffers):
            m._buffers.update(buffers)
        self.paused.__exit__(*exc)


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
        fn, *args, use_reentrant=False, preserve_rng_state=False, context_fn=lambda: (paused(), recompute)
    )



class _Node(abc.ABC):
    """How to get a storage's content back in the backward: ``value()`` -> a flat tensor over the
    whole storage (the saved tensor is then a view of it at its own size, stride and offset)."""

    @abc.abstractmethod
    def value(self) -> torch.Tensor: ...


class _Held(_Node):
    """A tensor the step holds anyway (the network's input): referenced, not copied."""

    def __init__(self, t: torch.Tensor):
        self.flat = _storage_view(t)

    def value(self) -> torch.Tensor:
        return self.flat


class _Bits(_Node):
    """Spikes: packed when first needed (1 bit per element)."""

    def __init__(self) -> None:
        self.packed: tuple | None = None

    def pack(self, t: torch.Tensor) -> bool:
        if self.packed is None:
            self.packed = bitpack.pack_spikes(_storage_view(t), trusted=True)
        return self.packed is not None

    def value(self) -> torch.Tensor:
        return bitpack.unpack_spikes(*self.packed)


class _Layer(_Node):
    """The output of ``layer`` run on its input (a node, seen through ``geometry``), recomputed."""

    def __init__(self, layer: nn.Module, source: _Node, geometry: tuple, autocast: tuple):
        self.layer, self.source, self.geometry, self.autocast = layer, source, geometry, autocast

    def value(self) -> torch.Tensor:
        x = self.source.value().as_strided(*self.geometry)
        device, dtype, enabled = self.autocast
        with torch.no_grad(), _Recompute([self.layer]), torch.autocast(device, dtype, enabled=enabled):
            return _storage_view(self.layer(x))


class _Sum(_Node):
    """``a + b`` of two cheap nodes (spikes, sums of spikes, the input): e.g. SEW-ResNet's ADD
    connection, whose values (0, 1, 2, ...) are not bits; recomputed by the same addition."""

    def __init__(self, a: _Node, a_geometry: tuple, b: _Node, b_geometry: tuple):
        self.a, self.a_geometry, self.b, self.b_geometry = a, a_geometry, b, b_geometry

    def value(self) -> torch.Tensor:
        return _storage_view(self.a.value().as_strided(*self.a_geometry) + self.b.value().as_strided(*self.b_geometry))


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten)  # fmt: skip


def _cheap(node: _Node | None) -> bool:
    """A node whose value costs no convolution or batch norm to recompute (spikes, the input,
    their sums and poolings)."""
    if isinstance(node, _Layer):
        return isinstance(node.layer, _POOLS) and _cheap(node.source)
    return isinstance(node, (_Bits, _Held, _Sum)) and (not isinstance(node, _Bits) or node.packed is not None)


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


class _Sums(torch.overrides.TorchFunctionMode):
    """Watches the forward's additions: the sum of two cheap nodes becomes a :class:`_Sum`."""

    def __init__(self, tape: _Tape):
        super().__init__()
        self.tape = tape

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ADDS and not kwargs and len(args) == 2 and active() is self.tape:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(out, torch.Tensor):
                self.tape.add_sum(a, b, out)
        return out


class _Cast(_Node):
    """A half-precision copy of a tensor the step holds anyway (a parameter, the input)."""

    def __init__(self, held: torch.Tensor, dtype: torch.dtype):
        self.held, self.dtype = held, dtype

    def value(self) -> torch.Tensor:
        return _storage_view(self.held.detach().to(self.dtype))


class _Saved:
    """What the pack hook keeps for one saved tensor: its node and its view geometry."""

    __slots__ = ("geometry", "node")

    def __init__(self, node: _Node, t: torch.Tensor):
        self.node, self.geometry = node, _geometry(t)


class _Tape:
    """The engine's book of one forward: storage -> node, the layers running now, the hooks and
    the watch on additions."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner  # the network whose forward this is
        self.nodes: dict[StorageWeakRef, tuple[StorageWeakRef, _Node, int]] = {}  # + version when added
        self.layers: list[tuple[nn.Module, torch.dtype | None]] = []  # running now, autocast dtype
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)
        self.sums = _Sums(self)

    def find(self, t: torch.Tensor) -> _Node | None:
        if not isinstance(t, torch.Tensor) or t.is_sparse:
            return None
        ref = StorageWeakRef(t.untyped_storage())
        hit = self.nodes.get(ref)
        if hit is None or hit[0].expired():  # a freed storage whose address came back
            return None
        if t._version != hit[2]:  # written in place since: the node no longer describes it
            return None
        return hit[1]

    def add(self, t: torch.Tensor, node: _Node) -> None:
        ref = StorageWeakRef(t.untyped_storage())
        if self.find(t) is None:  # the first (innermost) layer that made a storage describes it
            self.nodes[ref] = (ref, node, t._version)

    def add_sum(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        na, nb = self.find(a), self.find(b)
        for node, t in ((na, a), (nb, b)):
            if isinstance(node, _Bits) and node.packed is None:
                node.pack(t)
        if _cheap(na) and _cheap(nb) and out.is_floating_point() and self.find(out) is None:
            self.add(out, _Sum(na, _geometry(a), nb, _geometry(b)))

    def pack(self, t: torch.Tensor) -> Any:
        node = self.find(t)
        if node is None and self.layers and t.is_floating_point():
            node = self._weight_cast(t)
        saved = t if node is None or (isinstance(node, _Bits) and not node.pack(t)) else _Saved(node, t)
        log = getattr(_local, "log", None)
        return saved if log is None else log(saved)

    def _weight_cast(self, t: torch.Tensor) -> _Node | None:
        """Autocast's copy of the running convolution's or linear layer's weight, else None
        (inside the layer autocast reads as off: its dtype was noted by :func:`layer_pre`)."""
        layer, dtype = self.layers[-1]
        weight = getattr(layer, "weight", None)
        if dtype is None or not isinstance(weight, torch.Tensor) or weight.dtype == dtype:
            return None
        if t.dtype == dtype and t.numel() == weight.numel() and weight.is_contiguous():
            return _Cast(weight, dtype)  # the weight, or its transpose (linear)
        return None


def _geometry(t: torch.Tensor) -> tuple:
    return t.size(), t.stride(), t.storage_offset()


def _unpack(saved: Any) -> torch.Tensor:
    if not isinstance(saved, _Saved):
        return saved
    return saved.node.value().as_strided(*saved.geometry)


def active() -> _Tape | None:
    """The tape of the forward in progress (None: the engine is not running here)."""
    if getattr(_local, "paused", False):
        return None
    return getattr(_local, "tape", None)


class paused:
    """No engine inside (the backward's recomputations)."""

    def __enter__(self) -> None:
        self.before = getattr(_local, "paused", False)
        _local.paused = True

    def __exit__(self, *exc: object) -> None:
        _local.paused = self.before


def start(x: Any, owner: nn.Module) -> bool:
    """Start the engine for one forward of network ``owner`` on input ``x`` (its first argument);
    False when it is already running (``owner`` is inside another network) or has nothing to do."""
    if getattr(_local, "tape", None) is not None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    tape = _Tape(owner)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        tape.add(x, _Held(x))
    _local.tape = tape
    tape.hooks.__enter__()
    tape.sums.__enter__()
    return True


def stop(owner: nn.Module) -> None:
    """Stop the engine if ``owner``'s forward started it."""
    tape = getattr(_local, "tape", None)
    if tape is not None and tape.owner is owner:
        _local.tape = None
        tape.sums.__exit__(None, None, None)
        tape.hooks.__exit__(None, None, None)


# --------------------------------------------------------------------------- layer hooks
def layer_pre(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a recomputable layer: note it as running (with the dtype autocast
    will run it in); under autocast give a half-precision layer its spike (or held) input
    already cast: kept as bits or as a recipe, not as autocast's copy."""
    tape = active()
    if tape is None:
        return None
    x = args[0] if args else None
    device = x.device.type if isinstance(x, torch.Tensor) else None
    dtype = None
    if isinstance(module, _CASTING) and device is not None and _autocast_state(device)[2]:
        dtype = torch.get_autocast_dtype(device)
    tape.layers.append((module, dtype))
    source = tape.find(x) if dtype is not None and x.is_floating_point() and x.dtype != dtype else None
    if isinstance(source, _Bits):
        cast = x.to(dtype)  # exact for 0 / 1
        tape.add(cast, _Bits())
        return (cast, *args[1:])
    if isinstance(source, _Held):
        cast = x.to(dtype)
        tape.add(cast, _Cast(x, dtype))
        return (cast, *args[1:])
    return None


def _autocast_state(device: str) -> tuple:
    """(device, dtype, enabled) of autocast for a device type (off where autocast has none, e.g. meta)."""
    try:
        return device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
    except RuntimeError:
        return "cpu", torch.get_autocast_dtype("cpu"), False


def layer_post(module: nn.Module, args: tuple, out: Any) -> None:
    """Forward hook of a recomputable layer: its output becomes a recipe when its input is known."""
    tape = active()
    if tape is None:
        return
    if tape.layers and tape.layers[-1][0] is module:
        tape.layers.pop()
    x = args[0] if len(args) == 1 else None
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and out.is_floating_point()):
        return
    source = tape.find(x)
    if source is None or (isinstance(source, _Bits) and source.packed is None and not source.pack(x)):
        return
    if StorageWeakRef(out.untyped_storage()) == StorageWeakRef(x.untyped_storage()):
        return  # in place / a view of the input: not a new storage
    autocast = _autocast_state(x.device.type)
    tape.add(out, _Layer(module, source, _geometry(x), autocast))


def user_hooks(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has forward or backward hooks other than the engine's own (a
    fused CPU path would skip them)."""
    own = (layer_pre, layer_post, neuron_post)
    return any(
        m._backward_hooks or any(h not in own for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
        for m in modules
    )


def neuron_post(module: nn.Module, args: tuple, out: Any) -> None:
    """Forward hook of a binary spiking neuron: its output is spikes."""
    tape = active()
    if tape is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
        tape.add(out, _Bits())


def kept_bytes(fn, exclude: set[int] | None = None) -> int:
    """Bytes autograd keeps for the backward of ``fn()`` (run here), each storage once, whatever
    the engine made of them (its bits count as bits, its recipes as nothing, the network's input
    as itself); ``exclude``: storage ids (``untyped_storage()._cdata``) not to count, e.g. the
    parameters'. Tensors saved inside a recomputed region are not kept, so not counted."""
    seen: set[int] = set(exclude or ())
    total = 0

    def count(t: Any) -> Any:
        nonlocal total
        held = t
        if isinstance(t, _Saved):
            node = t.node
            held = node.packed[0] if isinstance(node, _Bits) else getattr(node, "flat", None)
        if isinstance(held, torch.Tensor) and held.untyped_storage()._cdata not in seen:
            seen.add(held.untyped_storage()._cdata)
            total += held.untyped_storage().nbytes()
        return t

    _local.log = count
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            fn()
    finally:
        _local.log = None
    return total
