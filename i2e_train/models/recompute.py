"""The memory engine for any network: what autograd saves for the backward, kept small.

Applied by `i2e_train.models.memory.set_memory` to any ``nn.Module`` (our MS-ResNet family,
SpikingJelly's zoo, a user's own network). It changes no layer and no result: during the
network's forward it watches what autograd saves (``torch.autograd.graph.saved_tensors_hooks``)
and knows where each tensor came from (a *node*):

* the network's input (held by the step anyway);
* the output of a spiking neuron: for our `LIFNode` ``H >= V_th``
  of its charged membrane ``H``, for any other binary neuron (SpikingJelly's IF / LIF /
  parametric LIF with a Heaviside forward) 1 bit per element (`i2e_train.models.bitpack`);
* the charged membrane ``H`` of our LIF: its recurrence run again on the neuron's input;
* the output of a layer that can run again exactly (convolution, linear, batch norm, pooling,
  flatten, SpikingJelly's multi-step wrappers of them) on an input the engine knows (a batch
  norm in training mode with throw-away copies of its running statistics, so the output is the
  same and the statistics move once), the sum of two known tensors (SEW-ResNet's ADD
  connection, a residual sum), autocast's half-precision copy of a weight;
* the input of a max pooling, whose backward reads its shape only.

Then, per saved tensor, the network's memory *rung* (`Rung`) decides whether it is kept
as it is or as its node, whose value the backward computes again (each value once: it stays
cached until the last saved tensor that needs it has been unpacked):

* ``bits``: only what is free: spikes from the ``H`` the neuron keeps anyway (two tensor
  operations in the backward instead of a float copy of the spikes), other neurons' spikes as
  bits, max-pooling inputs as their shape, autocast's weight copies cast again. No
  convolution or batch norm runs twice.
* ``recompute``: besides, spikes as bits, every node without convolution or matrix work (batch
  norms, poolings, sums, the LIF recurrence ``H``), and the outputs of convolutions / linear
  layers that cost at most `CHEAP_FLOPS_PER_ELEMENT` FLOPs per output element (a 7x7 stem on
  two event channels, 1x1 convolutions, 3x3 ones of up to 64 channels): the rest of the
  network's convolution outputs are kept.
* ``least``: every node, spikes as bits, every convolution output recomputed from them.

In ``recompute`` and ``least`` a training-mode batch norm whose output goes straight into a 2-d
pooling or our LIF becomes one autograd node (`_NormSegment`) whose backward runs both again a
few channels at a time, where the activations are largest (a ResNet's stem and first stage). The
batch norm's output must have no other reader (as in every network here): a second reader would
get its gradient through the batch norm's own node, summed in another order.

A tensor whose recomputation would need a chain longer than the rung allows is kept as it is;
a neuron input that deep is kept itself (pinned) so that ``H`` stays one step away. Every saved
tensor comes back bit for bit, so losses and gradients equal those of ``none``
(``tests/test_memory_any_net.py`` checks it with ``torch.equal``). Tensor operations only: no
host synchronisation. The engine is off under ``torch.no_grad`` and inside ``torch.compile``.
"""

from __future__ import annotations

import abc
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.base import MemoryModule
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from . import bitpack

__all__ = ["CHEAP_FLOPS_PER_ELEMENT", "RECOMPUTABLE", "RUNGS", "Rung", "active", "is_binary_neuron", "kept_bytes",
           "paused", "start", "stop"]

# Layers whose output is a deterministic function of their one input (batch norm: in training mode
# of the batch itself, recomputed with throw-away running statistics).
RECOMPUTABLE: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Flatten, sj_layer.SeqToANNContainer,
)  # fmt: skip
_MATMUL = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # layers whose work is FLOPs (autocast casts them too)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_BINARY_NEURONS = (sj_neuron.IFNode, sj_neuron.LIFNode, sj_neuron.ParametricLIFNode)
# ``recompute`` runs a convolution / linear layer again when one output element costs at most this
# many FLOPs (2 * in_channels / groups * kernel volume): the 7x7 stem on two event channels (196),
# 1x1 convolutions of up to 576 channels, 3x3 ones of up to 64 (1152): the layers with the most
# memory per FLOP, where a ResNet's training peaks; not the 3x3 convolutions of the later stages.
CHEAP_FLOPS_PER_ELEMENT = 1152

_local = threading.local()  # .tape: the _Tape of the forward in progress; .paused: recomputing; .log


@dataclass(frozen=True)
class Rung:
    """What a memory rung lets the backward compute again (see the module docstring)."""

    name: str
    recipes: bool  # batch norms, poolings, sums, H: nodes without matrix work
    matmul: str  # "none" | "cheap" | "all": convolution / linear outputs
    depth: int  # the longest chain of recomputations behind one saved tensor
    spikes: str  # "charge" (H >= V_th) | "bits": our LIF's spikes


RUNGS = {
    "bits": Rung("bits", recipes=False, matmul="none", depth=1, spikes="charge"),
    "recompute": Rung("recompute", recipes=True, matmul="cheap", depth=4, spikes="bits"),
    "least": Rung("least", recipes=True, matmul="all", depth=5, spikes="bits"),
}


def is_binary_neuron(m: nn.Module) -> bool:
    """A SpikingJelly IF / LIF / parametric LIF (or subclass) whose forward is a Heaviside step:
    its output holds only 0 and 1."""
    return isinstance(m, _BINARY_NEURONS) and bool(getattr(m.surrogate_function, "spiking", False))


def _storage_view(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of ``t`` as a flat tensor of its dtype."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return t.new_empty(0).set_(t.untyped_storage(), 0, (n,), (1,))


def _geometry(t: torch.Tensor) -> tuple:
    return t.size(), t.stride(), t.storage_offset()


def _exact_storage(t: torch.Tensor) -> bool:
    """``t`` is contiguous and fills its storage exactly (a fresh operator output)."""
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _flops_per_element(m: nn.Module) -> float:
    """FLOPs of one output element of a convolution / linear layer."""
    if isinstance(m, nn.Linear):
        return 2.0 * m.in_features
    w = m.weight
    return 2.0 * w[0].numel()  # in_channels / groups * kernel volume


class _Recompute:
    """The recomputation context of a layer: its batch norms update throw-away copies of their
    running statistics and its neurons keep their states; afterwards the original buffers (never
    written, so their version counters do not move) are put back: a recomputation leaves no trace."""

    def __init__(self, modules: Iterable[nn.Module]):
        modules = list(modules)
        self.neurons = [m for m in modules if isinstance(m, MemoryModule)]
        self.norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> _Recompute:
        self.paused = paused()
        self.paused.__enter__()
        self.states = [dict(m._memories) for m in self.neurons]
        self.buffers = [dict(m._buffers) for m in self.norms]
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


# --------------------------------------------------------------------------- nodes
class _Cache:
    """Values computed in the backward, kept while saved tensors that need them are still packed."""

    def __init__(self) -> None:
        self.values: dict[_Node, torch.Tensor] = {}
        self.uses: Counter[_Node] = Counter()


class _Node(abc.ABC):
    """How to get a storage's content back in the backward: ``value()`` -> a flat tensor over the
    whole storage (a saved tensor is then a view of it at its own size, stride and offset).
    ``depth``: recomputations behind it (0: nothing to run); ``matmul``: a convolution or linear
    layer runs among them; ``cost``: FLOPs per element of the most expensive of those."""

    depth = 0
    matmul = False
    cost = 0.0
    cache: _Cache | None = None
    keep = False  # cache the value while saved tensors still need it (worth it for costly nodes only)

    def sources(self) -> tuple[_Node, ...]:
        return ()

    @abc.abstractmethod
    def compute(self) -> torch.Tensor: ...

    def value(self) -> torch.Tensor:
        if self.cache is None or not self.keep:
            return self.compute()
        hit = self.cache.values.get(self)
        if hit is None:
            hit = self.compute()
            if self.cache.uses.get(self, 0) > 0:
                self.cache.values[self] = hit
        return hit

    def _chain(self, cache: _Cache, sources: Iterable[_Node]) -> None:
        """Set depth / matmul / cost from the sources (call at the end of ``__init__``)."""
        sources = tuple(sources)
        self.cache = cache
        self.depth = 1 + max((s.depth for s in sources), default=0)
        self.matmul = self.matmul or any(s.matmul for s in sources)
        self.cost = max([self.cost, *(s.cost for s in sources)])


def _recipes(node: _Node) -> list[_Node]:
    """``node`` and the nodes behind it that are computed (depth > 0)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        if n.depth > 0 and n not in out:
            out.append(n)
            todo.extend(n.sources())
    return out


class _Held(_Node):
    """A tensor kept as it is (the network's input, or a neuron input kept on purpose): referenced."""

    def __init__(self, t: torch.Tensor):
        self.flat = _storage_view(t)

    def compute(self) -> torch.Tensor:
        return self.flat


class _Bits(_Node):
    """Spikes: packed when first needed (1 bit per element)."""

    def __init__(self) -> None:
        self.packed: tuple | None = None

    def pack(self, t: torch.Tensor) -> bool:
        if self.packed is None:
            self.packed = bitpack.pack_spikes(_storage_view(t), trusted=True)
        return self.packed is not None

    def compute(self) -> torch.Tensor:
        return bitpack.unpack_spikes(*self.packed)


class _Shape(_Node):
    """The input of a max pooling, whose backward reads its shape, dtype and strides only: an
    uninitialised storage of the same size."""

    def __init__(self, t: torch.Tensor):
        self.numel, self.dtype, self.device = t.untyped_storage().nbytes() // t.element_size(), t.dtype, t.device

    def compute(self) -> torch.Tensor:
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)


class _Layer(_Node):
    """The output of ``layer`` run on its input (a node, seen through ``geometry``), recomputed."""

    def __init__(self, cache: _Cache, layer: nn.Module, source: _Node, geometry: tuple, autocast: tuple):
        self.layer, self.source, self.geometry, self.autocast = layer, source, geometry, autocast
        if isinstance(layer, _MATMUL):
            self.matmul, self.cost, self.keep = True, _flops_per_element(layer), True
        self._chain(cache, (source,))

    def sources(self) -> tuple[_Node, ...]:
        return (self.source,)

    def compute(self) -> torch.Tensor:
        x = self.source.value().as_strided(*self.geometry)
        device, dtype, enabled = self.autocast
        with torch.no_grad(), _Recompute([self.layer]), torch.autocast(device, dtype, enabled=enabled):
            return _storage_view(self.layer(x))


class _Sum(_Node):
    """``a + b`` of two known tensors (a residual sum, SEW-ResNet's ADD connection), recomputed by
    the same addition."""

    def __init__(self, cache: _Cache, a: _Node, a_geometry: tuple, b: _Node, b_geometry: tuple):
        self.a, self.a_geometry, self.b, self.b_geometry = a, a_geometry, b, b_geometry
        self._chain(cache, (a, b))

    def sources(self) -> tuple[_Node, ...]:
        return (self.a, self.b)

    def compute(self) -> torch.Tensor:
        return _storage_view(self.a.value().as_strided(*self.a_geometry) + self.b.value().as_strided(*self.b_geometry))


class _Cast(_Node):
    """A half-precision copy of a tensor the step holds anyway (a parameter, the input)."""

    def __init__(self, held: torch.Tensor, dtype: torch.dtype):
        self.held, self.dtype = held, dtype

    def compute(self) -> torch.Tensor:
        return _storage_view(self.held.detach().to(self.dtype))


class _Charge(_Node):
    """The charged membrane ``H [T, ...]`` of our LIF, its recurrence run again on the neuron's
    input (a node, seen through ``geometry``) from the same initial membrane."""

    keep = True

    def __init__(self, cache: _Cache, charge: Callable, source: _Node, geometry: tuple, v0: torch.Tensor):
        self.charge, self.source, self.geometry = charge, source, geometry
        one = _one_value(v0)
        self.v0 = v0.detach() if one is None else one
        self.v0_shape = v0.shape
        self._chain(cache, (source,))

    def sources(self) -> tuple[_Node, ...]:
        return (self.source,)

    def compute(self) -> torch.Tensor:
        x = self.source.value().as_strided(*self.geometry)
        v0 = self.v0.expand(self.v0_shape) if self.v0.dim() == 0 else self.v0
        with torch.no_grad():
            return _storage_view(self.charge(x, v0))


def _one_value(v0: torch.Tensor) -> torch.Tensor | None:
    """The value of a reset membrane (one value expanded over the neurons) as a 0-d tensor, else None."""
    if v0.dim() > 0 and v0.stride() == (0,) * v0.dim():
        return v0[(0,) * v0.dim()].detach().clone()
    return None


class _SpikesOf(_Node):
    """The spikes of our LIF from its charged membrane: ``(H >= V_th)`` in the spikes' dtype."""

    def __init__(self, cache: _Cache, charge: _Node, threshold: float, dtype: torch.dtype):
        self.charge, self.threshold, self.dtype = charge, threshold, dtype
        self._chain(cache, (charge,))

    def sources(self) -> tuple[_Node, ...]:
        return (self.charge,)

    def compute(self) -> torch.Tensor:
        return self.charge.value().ge(self.threshold).to(self.dtype)


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


class _Sums(torch.overrides.TorchFunctionMode):
    """Watches the forward's additions: the sum of two known tensors becomes a `_Sum`."""

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


class _Saved:
    """What the pack hook keeps for one saved tensor: its node and its view geometry."""

    __slots__ = ("geometry", "node")

    def __init__(self, node: _Node, t: torch.Tensor):
        self.node, self.geometry = node, _geometry(t)


# --------------------------------------------------------------------------- the tape
class _Tape:
    """The engine's book of one forward: storage -> node, the layers running now, the hooks, the
    watch on additions and the cache the backward fills."""

    def __init__(self, owner: nn.Module, rung: Rung) -> None:
        self.owner, self.rung = owner, rung  # the network whose forward this is; what it may recompute
        self.nodes: dict[StorageWeakRef, tuple[StorageWeakRef, _Node, int]] = {}  # + version when added
        self.layers: list[tuple[nn.Module, torch.dtype | None, Any]] = []  # running now, autocast dtype, input
        self.cache = _Cache()
        self.norm: tuple | None = None  # (batch norm, its input, its output) of the layer that just ran
        self.largest_norm = 0  # elements of the largest batch-norm input of this forward so far
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.sums = _Sums(self)

    def find(self, t: Any) -> _Node | None:
        if not isinstance(t, torch.Tensor) or t.is_sparse:
            return None
        hit = self.nodes.get(StorageWeakRef(t.untyped_storage()))
        if hit is None or hit[0].expired():  # a freed storage whose address came back
            return None
        if t._version != hit[2]:  # written in place since: the node no longer describes it
            return None
        return hit[1]

    def add(self, t: torch.Tensor, node: _Node) -> None:
        ref = StorageWeakRef(t.untyped_storage())
        if self.find(t) is None:  # the first (innermost) layer that made a storage describes it
            self.nodes[ref] = (ref, node, t._version)

    def allows(self, node: _Node) -> bool:
        """Whether a saved tensor may be kept as ``node`` in this rung."""
        if node.depth == 0:
            return True
        rung = self.rung
        if not rung.recipes:  # bits: spikes from the kept H only
            return isinstance(node, _SpikesOf) and node.depth == 1
        if node.depth > rung.depth:
            return False
        return not node.matmul or rung.matmul == "all" or (rung.matmul == "cheap" and node.cost <= CHEAP_FLOPS_PER_ELEMENT)

    # ----------------------------------------------------------------- what the forward reports
    def add_sum(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        if not self.rung.recipes or not out.is_floating_point() or self.find(out) is not None:
            return
        na, nb = self.find(a), self.find(b)
        for node, t in ((na, a), (nb, b)):
            if isinstance(node, _Bits) and node.packed is None:
                node.pack(t)
        if na is not None and nb is not None and not (isinstance(na, _Bits) and na.packed is None) \
                and not (isinstance(nb, _Bits) and nb.packed is None):  # fmt: skip
            self.add(out, _Sum(self.cache, na, _geometry(a), nb, _geometry(b)))

    def add_lif(self, x: torch.Tensor, v0: torch.Tensor, h: torch.Tensor, spikes: torch.Tensor, threshold: float,
                charge: Callable) -> None:  # fmt: skip
        """Our LIF ran on ``x`` from ``v0``: its ``h`` and ``spikes`` are known (see `_Charge`)."""
        if not (_exact_storage(h) and _exact_storage(spikes)):
            return
        if self.rung.recipes:
            source = self.find(x)
            if source is None or not self.allows(source) or source.depth > self.rung.depth - 2:
                source = _Held(x)  # the input kept itself: H one recomputation away
            h_node: _Node = _Charge(self.cache, charge, source, _geometry(x), v0)
        else:
            h_node = _Held(h)  # kept by the neuron anyway
        self.add(h, h_node)
        self.add(spikes, _Bits() if self.rung.spikes == "bits" else _SpikesOf(self.cache, h_node, threshold, spikes.dtype))

    # ----------------------------------------------------------------- saved tensors
    def pack(self, t: torch.Tensor) -> Any:
        node = self._layer_input(t) if self.layers and t.is_floating_point() else None
        if node is None or (isinstance(node, _Cast) and self.find(t) is not None):
            node = self.find(t) or node
        if node is not None and isinstance(node, _Bits) and not node.pack(t):
            node = None
        saved = t if node is None or not self.allows(node) else _Saved(node, t)
        if isinstance(saved, _Saved):
            for n in _recipes(node):
                self.cache.uses[n] += 1
        log = getattr(_local, "log", None)
        return saved if log is None else log(saved)

    def unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        node = saved.node
        value = node.value().as_strided(*saved.geometry)
        for n in _recipes(node):
            self.cache.uses[n] -= 1
            if self.cache.uses[n] <= 0:  # its last saved tensor: forget the node (and what it holds)
                del self.cache.uses[n]
                self.cache.values.pop(n, None)
        return value

    def _layer_input(self, t: torch.Tensor) -> _Node | None:
        """A saved tensor the running layer made or got: autocast's copy of a convolution's or
        linear layer's weight, or the input of a max pooling (only its shape is read)."""
        layer, dtype, x = self.layers[-1]
        if isinstance(layer, _MAX_POOLS) and isinstance(x, torch.Tensor) and t.untyped_storage()._cdata == x.untyped_storage()._cdata:
            return _Shape(t)
        weight = getattr(layer, "weight", None)
        if dtype is None or not isinstance(weight, torch.Tensor) or weight.dtype == dtype:
            return None
        if t.dtype == dtype and t.numel() == weight.numel() and weight.is_contiguous():
            return _Cast(weight, dtype)  # the weight, or its transpose (linear)
        return None


_NORMS_2D = (nn.BatchNorm2d,)
_POOLS_2D = (nn.MaxPool2d, nn.AvgPool2d)
_SEGMENT_CHUNKS = 16  # channel slices of a segment's backward (at least one channel each)
# A batch norm becomes a segment when its input is at least 1/_SEGMENT_SHARE of the largest batch-norm
# input of the forward so far (a ResNet's stem and first stage): where the peak is, and not in the later
# stages, whose small slices would only add kernel launches.
_SEGMENT_SHARE = 4


@dataclass
class _Segment:
    """A training-mode ``BatchNorm2d`` and what reads its output ``y`` channel by channel: a 2-d
    pooling (``pool``, ``pool_args``) or our LIF (``lif``: its charge and backward functions)."""

    norm: nn.Module
    node: _Node | None  # the batch norm's input as a recipe (computed in the backward), else kept
    geometry: tuple  # of the batch norm's input c [N, C, H, W]
    pool: nn.Module | None = None
    pool_args: tuple = ()
    lif: tuple | None = None  # (charge(x, v0), backward(gs, gv, h), v0 value, time steps)


class _NormSegment(torch.autograd.Function):
    """``pool(bn(c))`` or ``lif(bn(c))`` whose backward runs a few channels at a time.

    The forward's outputs are the ones the layers made (passed in); the backward computes the
    batch norm's input ``c`` (from its node when the engine knows it, else kept), then, per slice
    of channels, the batch norm and the layer after it again and their backward with the same ATen
    calls autograd makes (``_batch_norm_impl_index`` and its backward, the pooling's own backward,
    the LIF operator's), and writes the slice of ``dL/dc`` into ``c``'s own storage when the
    backward made ``c`` itself. Batch norm, pooling and the LIF compute every channel on its own,
    so the slices give the whole to the bit, while the batch norm's output, the layer's state and
    their gradients, each as large as ``c``, never exist whole.
    """

    @staticmethod
    def forward(ctx, c, weight, bias, seg, *outs):
        ctx.seg = seg
        ctx.save_for_backward(*(() if seg.node is not None else (c,)), weight, bias)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        seg = ctx.seg
        *kept, weight, bias = ctx.saved_tensors
        if seg.node is not None:
            c = seg.node.compute().as_strided(*seg.geometry)  # made here: its storage becomes dL/dc
            gc = c if _exact_storage(c) else torch.empty_like(c)
        else:
            c = kept[0]
            gc = torch.empty_like(c)
        c4, gc4 = c.reshape(-1, *c.shape[-3:]), gc.view(-1, *c.shape[-3:])  # [N, C, H, W] ([T, B, ...] flattened)
        gw, gb = [], []
        step = -(-c4.shape[1] // _SEGMENT_CHUNKS)
        for lo in range(0, c4.shape[1], step):
            sl = slice(lo, min(lo + step, c4.shape[1]))
            g = _segment_slice(seg, c4, grads, weight, bias, sl)
            gc4[:, sl].copy_(g[0])
            gw.append(g[1])
            gb.append(g[2])
        cat = (lambda parts: torch.cat(parts) if parts[0] is not None else None)
        return (gc, cat(gw), cat(gb), None, *(None for _ in grads))


def _segment_slice(seg: _Segment, c: torch.Tensor, grads: tuple, weight, bias, sl: slice) -> tuple:
    """dL/dc, dL/dweight, dL/dbias of the channels ``sl`` of a `_NormSegment`."""
    bn = seg.norm
    c_k = c[:, sl].contiguous()
    w_k = None if weight is None else weight[sl]
    b_k = None if bias is None else bias[sl]
    rm = None if bn.running_mean is None else bn.running_mean[sl].clone()  # throw-away statistics
    rv = None if bn.running_var is None else bn.running_var[sl].clone()
    with torch.no_grad():
        y, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            c_k, w_k, b_k, rm, rv, True, 0.0, bn.eps, torch.backends.cudnn.enabled)
        gy = _after_norm_backward(seg, y, grads, sl)
        mask = [True, weight is not None and weight.requires_grad, bias is not None and bias.requires_grad]
        return torch.ops.aten._batch_norm_impl_index_backward(impl, c_k, gy, w_k, rm, rv, mean, invstd, True, bn.eps,
                                                              mask, reserve)


def _after_norm_backward(seg: _Segment, y: torch.Tensor, grads: tuple, sl: slice) -> torch.Tensor:
    """dL/dy of the channels ``sl`` of the batch norm's output ``y`` [N, k, H, W], through the layer after it."""
    if seg.lif is not None:
        charge, backward, v0, t = seg.lif
        x = y.view(t, y.shape[0] // t, *y.shape[1:])  # [T, B, k, H, W]
        v = v0.expand(x.shape[1:])
        gs = torch.zeros_like(x) if grads[0] is None else grads[0][:, :, sl].contiguous()
        gv = None if len(grads) < 2 or grads[1] is None else grads[1][:, sl].contiguous()
        return backward(gs, gv, charge(x, v))[0].reshape(y.shape)
    g = grads[0].reshape(-1, *grads[0].shape[-3:])[:, sl].contiguous()  # [N, k, Ho, Wo]
    if isinstance(seg.pool, nn.MaxPool2d):
        _, idx = torch.ops.aten.max_pool2d_with_indices(y, *seg.pool_args)
        return torch.ops.aten.max_pool2d_with_indices_backward(g, y, *seg.pool_args, idx)
    return torch.ops.aten.avg_pool2d_backward(g, y, *seg.pool_args)


def _pool_args(pool: nn.Module) -> tuple | None:
    """The positional ATen arguments after the input of ``pool``'s 2-d kernel, or None."""
    pair = torch.nn.modules.utils._pair
    stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if isinstance(pool, nn.MaxPool2d):
        if pool.return_indices:
            return None
        return pair(pool.kernel_size), stride, pair(pool.padding), pair(pool.dilation), pool.ceil_mode
    if pool.divisor_override is not None:
        return None
    return pair(pool.kernel_size), stride, pair(pool.padding), pool.ceil_mode, pool.count_include_pad, None


def _norm_before(tape: _Tape, x: torch.Tensor) -> tuple | None:
    """(batch norm, its input ``c``) when ``x`` is exactly the output of the training-mode batch
    norm that ran just before, all contiguous ``[N, C, H, W]`` or ``[T, B, C, H, W]`` (channels-last:
    a batch norm may sum channels in blocks); the stash is used up."""
    norm, tape.norm = tape.norm, None
    if norm is None:
        return None
    bn, c, y = norm
    if c.dim() not in (4, 5) or c.shape != y.shape:  # [N, C, H, W], or a multi-step layer's [T, B, C, H, W]
        return None
    if y.untyped_storage()._cdata != x.untyped_storage()._cdata or x.storage_offset() != y.storage_offset():
        return None
    if not (c.is_contiguous() and y.is_contiguous() and x.is_contiguous() and x.numel() == y.numel()):
        return None
    if x.dim() not in (4, 5) or x.shape[-3:] != y.shape[-3:]:
        return None
    return bn, c


def _segment_node(tape: _Tape, c: torch.Tensor) -> _Node | None:
    node = tape.find(c)
    return node if node is not None and node.depth > 0 and tape.allows(node) else None


def _pool_segment(tape: _Tape, pool: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """``out`` of ``pool`` as a `_NormSegment` when its input ``x`` is the batch norm's output."""
    found = _norm_before(tape, x) if isinstance(pool, _POOLS_2D) else None
    args = _pool_args(pool) if found is not None and out.is_floating_point() else None
    if args is None:
        return None
    bn, c = found
    seg = _Segment(bn, _segment_node(tape, c), _geometry(c), pool=pool, pool_args=args)
    return _NormSegment.apply(c, bn.weight, bn.bias, seg, out.detach())


def lif_segment(x: torch.Tensor, v0: torch.Tensor, spikes: torch.Tensor, v_last: torch.Tensor, charge: Callable,
                backward: Callable) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """Our LIF's outputs as a `_NormSegment` when the engine runs a recomputing rung and its input
    ``x [T, B, C, H, W]`` is the output of the batch norm that ran just before, from a reset
    membrane (one value); else None."""
    tape = active()
    if tape is None or not tape.rung.recipes or x.dim() != 5:
        return None
    found = _norm_before(tape, x)
    one = _one_value(v0)
    if found is None or one is None:
        return None
    bn, c = found
    lif = (charge, backward, one, x.shape[0])
    seg = _Segment(bn, _segment_node(tape, c), _geometry(c), lif=lif)
    return _NormSegment.apply(c, bn.weight, bn.bias, seg, spikes.detach(), v_last.detach())


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


def start(x: Any, owner: nn.Module, rung: Rung) -> bool:
    """Start the engine for one forward of network ``owner`` on input ``x`` (its first argument);
    False when it is already running (``owner`` is inside another network) or has nothing to do."""
    if getattr(_local, "tape", None) is not None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    tape = _Tape(owner, rung)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        tape.add(x, _Held(x))
    _local.tape = tape
    tape.hooks.__enter__()
    tape.sums.__enter__()
    return True


def stop(owner: nn.Module) -> None:
    """Stop the engine if ``owner``'s forward started it (the nodes stay with the saved tensors)."""
    tape = getattr(_local, "tape", None)
    if tape is not None and tape.owner is owner:
        _local.tape = None
        tape.nodes.clear()
        tape.layers.clear()
        tape.norm = None
        tape.sums.__exit__(None, None, None)
        tape.hooks.__exit__(None, None, None)


# --------------------------------------------------------------------------- layer hooks
def layer_pre(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a recomputable layer: note it as running (with the dtype autocast
    will run it in); under autocast give a half-precision layer its spike (or held) input
    already cast: kept as spikes or as a recipe, not as autocast's copy."""
    tape = active()
    if tape is None:
        return None
    x = args[0] if args else None
    if tape.norm is not None and not isinstance(module, _POOLS_2D):
        tape.norm = None
    device = x.device.type if isinstance(x, torch.Tensor) else None
    dtype = None
    if isinstance(module, _MATMUL) and device is not None and _autocast_state(device)[2]:
        dtype = torch.get_autocast_dtype(device)
    tape.layers.append((module, dtype, x))
    source = tape.find(x) if dtype is not None and x.is_floating_point() and x.dtype != dtype else None
    cast = None
    if isinstance(source, _SpikesOf):
        cast = x.to(dtype)  # exact for 0 / 1
        tape.add(cast, _SpikesOf(tape.cache, source.charge, source.threshold, dtype))
    elif isinstance(source, _Bits):
        cast = x.to(dtype)
        tape.add(cast, _Bits())
    elif isinstance(source, _Held):
        cast = x.to(dtype)
        tape.add(cast, _Cast(x, dtype))
    return None if cast is None else (cast, *args[1:])


def _autocast_state(device: str) -> tuple:
    """(device, dtype, enabled) of autocast for a device type (off where autocast has none, e.g. meta)."""
    try:
        return device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
    except RuntimeError:
        return "cpu", torch.get_autocast_dtype("cpu"), False


def layer_post(module: nn.Module, args: tuple, out: Any) -> Any:
    """Forward hook of a recomputable layer: its output becomes a recipe when its input is known;
    a pooling of the batch norm that ran just before becomes a `_NormSegment`."""
    tape = active()
    if tape is None:
        return None
    if tape.layers and tape.layers[-1][0] is module:
        tape.layers.pop()
    if not tape.rung.recipes:
        return None
    x = args[0] if len(args) == 1 else None
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and out.is_floating_point()):
        return None
    if isinstance(module, _POOLS_2D):
        seg = _pool_segment(tape, module, x, out)
        if seg is not None:
            return seg
    if isinstance(module, _NORMS_2D) and module.training and torch.is_grad_enabled():
        tape.largest_norm = max(tape.largest_norm, x.numel())
        if x.numel() * _SEGMENT_SHARE >= tape.largest_norm:  # where the activations are largest
            tape.norm = (module, x, out)
    source = tape.find(x)
    if source is None or (isinstance(source, _Bits) and source.packed is None and not source.pack(x)):
        return None
    if StorageWeakRef(out.untyped_storage()) == StorageWeakRef(x.untyped_storage()):
        return None  # in place / a view of the input: not a new storage
    node: _Node = _Layer(tape.cache, module, source, _geometry(x), _autocast_state(x.device.type))
    if node.matmul and not tape.allows(node):
        node = _Held(out)  # a convolution output this rung keeps: what is computed from it starts here
    tape.add(out, node)
    return None


def neuron_post(module: nn.Module, args: tuple, out: Any) -> None:
    """Forward hook of a binary spiking neuron: its output is spikes (unless our LIF told more)."""
    tape = active()
    if tape is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
        tape.add(out, _Bits())


def kept_bytes(fn, exclude: set[int] | None = None) -> int:
    """Bytes autograd keeps for the backward of ``fn()`` (run here), each storage once, whatever
    the engine made of them (bits count as bits, recipes and shapes as nothing, kept tensors as
    themselves); ``exclude``: storage ids (``untyped_storage()._cdata``) not to count, e.g. the
    parameters'."""
    seen: set[int] = set(exclude or ())
    total = 0

    def count(t: Any) -> Any:
        nonlocal total
        held = [t] if isinstance(t, torch.Tensor) else []
        if isinstance(t, _Saved):  # what the node and the nodes behind it keep: tensors, bits
            todo, held = [t.node], []
            while todo:
                node = todo.pop()
                todo.extend(node.sources())
                if isinstance(node, _Bits):
                    held.append(node.packed[0])
                elif isinstance(node, _Held):
                    held.append(node.flat)
        for h in held:
            if h.untyped_storage()._cdata not in seen:
                seen.add(h.untyped_storage()._cdata)
                total += h.untyped_storage().nbytes()
        return t

    _local.log = count
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            fn()
    finally:
        _local.log = None
    return total
