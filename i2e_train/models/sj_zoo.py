"""SpikingJelly's model zoo by name: ``create_model("sj/<name>")`` / ``model=sj/<name>``.

Every classification network of ``spikingjelly.activation_based.model`` that can take event
frames is registered here as ``sj/<name>``, built by SpikingJelly's own builder or class (no code
of theirs is copied) and adapted to the contract of the zoo:

* input events ``[T, B, C, H, W]`` (C = ``in_channels``, 2 for events), output logits ``[B, K]``
  (the mean over T where the network returns ``[T, B, K]``);
* every call resets the neuron states before and after (``functional.reset_net``), every layer
  runs in multi-step mode;
* the class count, input channels, resolution and T come from the data (the model configs read
  ``${data.num_classes}``, ``${data.resolution}``, ``${data.timesteps}``). Networks whose builder
  has no ``in_channels`` argument get their stem convolution replaced by one of the same shape
  with ``in_channels`` inputs;
* the classifier is ``get_classifier()`` (``reset_classifier(K)`` makes a new one), which is what
  [`i2e_train.models.loading.load_checkpoint`][i2e_train.models.loading.load_checkpoint] replaces with ``replace_head=True``.

The wrapper keeps the SpikingJelly network as ``net`` (state-dict keys ``net.<their keys>``).
Neurons: ``neurons="paper"`` keeps the neurons each paper's builder chooses (networks that have
them: MS-ResNet, Att-MS-ResNet, MA-SNN and the transformers); ``neurons="lif"`` builds every
neuron as `i2e_train.models.lif.LIFNode` (SpikingJelly's LIF, with our fused CPU kernel)
from the run's neuron config (``configs/neuron/lif.yaml``). The networks without paper neurons
(SEW-ResNet, Spiking ResNet / VGG) always use ``lif``.

Not registered (`NOT_APPLICABLE` says why): OTTT's VGG (online training through time:
single-step neurons trained per time step, not multi-step BPTT), SNASNet and Spike-DHS (searched
architectures that need the search's arguments), the parametric-LIF nets (one fixed layout per
data set: classifier sized for one sensor, class count fixed by a voting layer),
``spikformer_cifar10`` (a fixed 3-channel, 32x32 builder: use ``sj/spikformer`` with its CIFAR
settings).

Registered but without a small layout (`NO_SMALL_LAYOUT` says why): the spiking VGGs, whose
builders fix torchvision's 120 M-parameter classifier; they train like the others, at their size.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from spikingjelly.activation_based import functional, layer
from torch import nn

from .lif import LIFNode
from .registry import register_model

__all__ = ["SJNet", "ZOO", "NOT_APPLICABLE", "NO_SMALL_LAYOUT", "ZooEntry"]

_PKG = "spikingjelly.activation_based.model."
NEURON_KEYS = ("tau", "v_threshold", "v_reset", "decay_input", "detach_reset", "surrogate", "surrogate_alpha")


@dataclass(frozen=True)
class ZooEntry:
    """One registered network: where SpikingJelly keeps it and how it is adapted."""

    module: str  # file of spikingjelly.activation_based.model
    builder: str  # function or class there
    kind: str  # "native": takes in_channels, multi-step; "legacy": torchvision-style, stem replaced
    head: str  # the classifier's name inside the SpikingJelly network
    paper_neurons: bool = True
    fixed: dict[str, Any] = field(default_factory=dict)  # builder arguments the wrapper sets
    note: str = ""


def _native(module: str, builder: str, head: str = "head", **fixed: Any) -> ZooEntry:
    return ZooEntry(module, builder, "native", head, True, fixed)


def _legacy(module: str, builder: str, head: str = "fc", **fixed: Any) -> ZooEntry:
    return ZooEntry(module, builder, "legacy", head, False, fixed)


_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
            "wide_resnet50_2", "wide_resnet101_2")
ZOO: dict[str, ZooEntry] = {
    # Membrane-shortcut ResNets (Hu et al. 2024) and Max-ResNet; the classes take every layout argument.
    "ms_resnet": _native("ms_resnet", "MSResNet"),
    "ms_resnet18": _native("ms_resnet", "ms_resnet18"),
    "ms_resnet34": _native("ms_resnet", "ms_resnet34"),
    "max_resnet": _native("ms_resnet", "MaxResNet"),
    "max_resnet18": _native("ms_resnet", "max_resnet18"),
    # Attention-based MS-ResNet and MA-SNN (Yao et al. 2023), multi-dimensional attention.
    "att_ms_resnet": _native("masnn", "AttMSResNet"),
    "att_ms_resnet18": _native("masnn", "att_ms_resnet18"),
    "masnn": _native("masnn", "MASNN", head="fc_blocks.1"),
    "masnn_dvs128_gesture": _native("masnn", "masnn_dvs128_gesture", head="fc_blocks.1"),
    # Spiking transformers: Spikformer (Zhou et al. 2023), QKFormer (Zhou et al. 2024),
    # Spike-driven Transformer (Yao et al. 2023), Max-Former (2025).
    "spikformer": _native("spikformer", "Spikformer"),
    "spikformer_ti": _native("spikformer", "spikformer_ti"),
    "spikformer_s": _native("spikformer", "spikformer_s"),
    "qkformer": _native("qkformer", "QKFormer"),
    "qkformer_10_384": _native("qkformer", "qkformer_10_384"),
    "spike_driven_transformer": _native("spike_driven_transformer", "SpikeDrivenTransformer"),
    "sdt_8_384": _native("spike_driven_transformer", "sdt_8_384"),
    "maxformer": _native("maxformer", "MaxFormer"),
    "maxformer_10_384": _native("maxformer", "maxformer_10_384"),
    "maxformer_cifar": _native("maxformer", "maxformer_cifar"),
    # SEW-ResNet (Fang et al. 2021) and spiking ResNets / VGGs: torchvision layouts, 3-channel stems.
    "sew_resnet": _legacy("sew_resnet", "SEWResNet", cnf="ADD"),
    **{f"sew_{s}": _legacy("sew_resnet", f"sew_{s}", cnf="ADD") for s in _RESNETS},
    "spiking_resnet": _legacy("spiking_resnet", "SpikingResNet"),
    **{f"spiking_{s}": _legacy("spiking_resnet", f"spiking_{s}") for s in _RESNETS},
    **{f"spiking_vgg{d}{bn}": _legacy("spiking_vgg", f"spiking_vgg{d}{bn}", head="classifier.6")
       for d in (11, 13, 16, 19) for bn in ("", "_bn")},
}

NOT_APPLICABLE: dict[str, str] = {
    "spiking_vggws_ottt.*": "OTTT (online training through time) trains single-step neurons one time step at a "
                            "time with its own loop; the zoo's contract is multi-step BPTT over [T, B, C, H, W]",
    "snas_net.SNASNet": "a searched cell architecture: needs the search's argument object and connection matrix",
    "spike_dhs.*": "Spike-DHS search space (cells, searched layout, a fixed 100-class classifier), not a network",
    "parametric_lif_net.*": "fixed layouts for one data set each: the first fully connected layer is sized for "
                            "that sensor's resolution (34x34 or 128x128, not the twins' 32x32), the class count is "
                            "fixed by a 100-neuron voting layer (10 classes), MNISTNet / CIFAR10Net take 1 or 3 "
                            "channels; adapting them means rewriting their classifier (not done)",
    "spikformer.spikformer_cifar10": "fixed 3 input channels and 32x32 in the builder: sj/spikformer with "
                            "++model.patch_size=4 ++model.embed_dims=384 ++model.num_heads=12 is the same network "
                            "for events",
}


# Registered networks without a small layout: they train like the others, but no width argument
# makes them CPU-test sized (tests/test_sj_zoo.py runs every other family through a pipeline).
NO_SMALL_LAYOUT: dict[str, str] = {
    "spiking_vgg": "the builders fix torchvision's classifier (512*7*7 -> 4096 -> 4096 -> K after a 7x7 adaptive "
                   "pool: 120 M of the 129 M parameters of sj/spiking_vgg11, whatever the input size); the tests "
                   "run the smallest forward / backward with a strict reload, not a whole pipeline",
}


def _lif_kwargs(neuron_cfg: dict[str, Any]) -> dict[str, Any]:
    from .ms_resnet import make_surrogate

    cfg = dict(neuron_cfg)
    out = {k: cfg[k] for k in ("tau", "v_threshold", "v_reset", "decay_input", "detach_reset") if k in cfg}
    out["surrogate_function"] = make_surrogate(cfg.get("surrogate", "atan"), cfg.get("surrogate_alpha", 2.0))
    out["step_mode"] = "m"
    return out


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def _native_args(fn: Callable, in_channels: int, size: tuple[int, int], timesteps: int) -> dict[str, Any]:
    """The data's facts in the argument names the builder has."""
    facts = {"T": timesteps, "in_channels": in_channels, "img_size_h": size[0], "img_size_w": size[1],
             "input_size": tuple(size)}
    return {k: v for k, v in facts.items() if _accepts(fn, k)}


def _swap_stem(net: nn.Module, in_channels: int) -> None:
    """The first convolution of ``net`` rebuilt with ``in_channels`` inputs (same shape otherwise)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return
            new = layer.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                               m.groups, m.bias is not None, step_mode="m")
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, new)
            return
    raise ValueError(f"{type(net).__name__}: no convolution found to take {in_channels} input channels")


class SJNet(nn.Module):
    """A SpikingJelly zoo network under the zoo's contract (see the module docstring).

    ``forward``: events [T, B, C, H, W] -> logits [B, K]; states reset before and after.
    ``factory(K)`` builds the same SpikingJelly network for K classes (a new classifier).
    """

    def __init__(self, factory: Callable[[int], nn.Module], num_classes: int, head: str, info: dict[str, Any]) -> None:
        super().__init__()
        self.net = factory(num_classes)
        self.head_name = head
        self.model_info = dict(info, num_classes=int(num_classes))
        object.__setattr__(self, "_factory", factory)  # not a submodule

    def get_classifier(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        """The classifier rebuilt for ``num_classes`` classes by the network's own builder; every
        other tensor keeps its value (transfer learning)."""
        new = self._factory(int(num_classes)).to(next(self.net.parameters()).device)
        prefix = self.head_name + "."
        kept = {k: v for k, v in self.net.state_dict().items() if not k.startswith(prefix)}
        missing, unexpected = new.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith(prefix) for k in missing):  # pragma: no cover - defensive
            raise RuntimeError(f"{self.model_info['architecture']}: the rebuilt network differs beyond its "
                               f"classifier ({missing}, {unexpected})")
        self.net = new
        self.model_info["num_classes"] = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.model_info["in_channels"]
        if x.dim() != 5 or x.shape[2] != c:
            raise ValueError(f"{self.model_info['architecture']}: expected events [T, B, {c}, H, W], got shape "
                             f"{tuple(x.shape)}")
        functional.reset_net(self.net)
        y = self.net(x)  # [B, K] or [T, B, K]
        functional.reset_net(self.net)  # no membrane keeps the graph alive
        return y.mean(0) if y.dim() == 3 else y


def _builder(entry: ZooEntry) -> Callable[..., nn.Module]:
    return getattr(importlib.import_module(_PKG + entry.module), entry.builder)


def _size(resolution: int | Sequence[int]) -> tuple[int, int]:
    size = (int(resolution),) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
    return size * 2 if len(size) == 1 else size  # type: ignore[return-value]


def _factory(entry: ZooEntry, in_channels: int, size: tuple[int, int], timesteps: int, lif: dict[str, Any] | None,
             args: dict[str, Any]) -> Callable[[int], nn.Module]:
    """num_classes -> the SpikingJelly network, adapted (multi-step, ``in_channels`` inputs)."""
    fn = _builder(entry)
    args = dict(entry.fixed, **args)
    if entry.kind == "native":
        args.update(_native_args(fn, in_channels, size, timesteps))
        if lif is not None:
            args["spiking_neuron"] = LIFNode
    elif entry.builder[0].isupper():  # the SEWResNet / SpikingResNet classes: block and depths from the config
        block = getattr(importlib.import_module(_PKG + entry.module), str(args.pop("block", "BasicBlock")))
        args = dict(block=block, layers=list(args.pop("layers", (1, 1, 1, 1))), spiking_neuron=LIFNode, **args)
    else:
        args["spiking_neuron"] = LIFNode

    def make(num_classes: int) -> nn.Module:
        net = fn(num_classes=num_classes, **args, **copy.deepcopy(lif or {}))
        if entry.kind == "legacy":
            _swap_stem(net, in_channels)
        functional.set_step_mode(net, "m")
        return net

    return make


def build(name: str, num_classes: int = 1000, in_channels: int = 2, resolution: int | Sequence[int] = 32,
          timesteps: int = 8, neurons: str = "paper", **kwargs: Any) -> SJNet:
    """Build ``sj/<name>`` for ``num_classes`` classes and events [T, B, in_channels, H, W].

    ``kwargs``: the neuron config (``tau``, ``v_threshold``, ...; used with ``neurons="lif"``) and
    any argument of the SpikingJelly builder or class (e.g. ``layers``, ``base_channels``,
    ``embed_dims``, ``depths``).
    """
    entry = ZOO[name]
    if neurons not in ("paper", "lif"):
        raise ValueError(f"sj/{name}: neurons must be 'paper' or 'lif', got {neurons!r}")
    neuron_cfg = {k: kwargs.pop(k) for k in NEURON_KEYS if k in kwargs}
    use_lif = neurons == "lif" or not entry.paper_neurons
    size = _size(resolution)
    factory = _factory(entry, int(in_channels), size, int(timesteps), _lif_kwargs(neuron_cfg) if use_lif else None,
                       kwargs)
    info = {"architecture": f"sj/{name}", "source": f"{_PKG}{entry.module}.{entry.builder}",
            "in_channels": int(in_channels), "resolution": list(size), "timesteps": int(timesteps),
            "neurons": "lif" if use_lif else "paper"}
    return SJNet(factory, num_classes, entry.head, info)


def _register(name: str) -> None:
    def entry_point(num_classes: int = 1000, **kwargs: Any) -> SJNet:
        return build(name, num_classes, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = f"sj/{name}"
    entry_point.__doc__ = f"SpikingJelly's {ZOO[name].builder} ({_PKG}{ZOO[name].module}) on events."
    register_model(entry_point)


for _name in ZOO:
    _register(_name)
