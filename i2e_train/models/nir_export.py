"""NIR export of an MS-ResNet: batch norms folded, residual sums as graph edges, one file.

NIR (the Neuromorphic Intermediate Representation, package ``nir``) is what neuromorphic
simulators (SpikingJelly, snnTorch, Norse, Sinabs, Rockpool, Lava-DL, ...) and chips (SpiNNaker2,
Xylo, Speck, Loihi through Lava) import. `export_nir` writes the network in eval mode as one
time step of a graph, run by the importer once per time step on one I2E frame ``[2, H, W]``:

* every batch norm (running statistics) is folded into the convolution before it
  (`fold_batch_norm`, computed in float64, stored float32): ``Conv2d`` with a bias;
* the stem's average pooling and the head's adaptive average pooling become ``AvgPool2d`` (the
  head's kernel is the feature map, fixed by the input size);
* every LIF neuron becomes a NIR ``LIF`` (`DT`, the mapping in `export_nir`);
* the membrane shortcut ``out + identity`` is no node: both sources have an edge into every layer
  that reads the sum, and NIR importers sum the inputs of a node (``nirtorch`` does);
* ``fc`` becomes a 1x1 ``Conv2d`` on the pooled ``[F, 1, 1]`` (the same weights: NIR's ``Flatten``
  is read differently by the importers); the graph's output is the per-step ``fc`` output
  ``[K, 1, 1]``, and the logits are its mean over the T steps (NIR has no time average that the
  importers run; the file says so in its metadata).

The graph is traced and its layers mapped by SpikingJelly's own exporter
(``spikingjelly.activation_based.nir_exchange.export_to_nir``) from a single-step copy of the
network made of plain layers (`DeployGraph`); that copy is also what the tests run against
the importers. What NIR cannot express is refused with one line naming the layer
(`NIRExportError`): max pooling (the standard stem; train ``deploy/<name>``), a subtractive
(soft) reset, a batch norm without running statistics, other neurons or layers, and the I2E converter.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from i2e_train.files import atomic_write_bytes

__all__ = ["DT", "NIRExportError", "DeployGraph", "fold_batch_norm", "deploy_graph", "export_nir", "read_nir",
           "nir_metadata", "run_steps", "run_spikingjelly", "run_snntorch"]

# Seconds per time step written into the file: the step SpikingJelly's, snnTorch's and Norse's NIR
# code assume (snnTorch's importer takes no other). Only the ratios tau/DT and r enter the dynamics.
DT = 1e-4
_INSTALL = 'the NIR export needs the "nir" extra: pip install -e ".[nir]"'


class NIRExportError(ValueError):
    """A network (or one of its layers) that NIR cannot express; the message names the layer and
    the alternative."""


def _need_nir():
    try:
        import nir  # noqa: F401
        import nirtorch  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{_INSTALL} ({err})") from None


def _lif_class():
    from spikingjelly.activation_based import neuron

    return neuron.LIFNode


def fold_batch_norm(layer: nn.Module, bn: nn.Module | None, where: str = "layer") -> nn.Module:
    """A new ``nn.Conv2d`` / ``nn.Linear`` with a bias equal to ``bn(layer(x))`` in eval mode.

    ``W' = W * g``, ``b' = (b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)``, computed in
    float64 and stored in the layer's dtype (float32: one rounding of each weight). ``bn=None`` copies
    the layer with a bias (zero if it had none). A batch norm without running statistics (it normalises
    each batch by itself, also in eval mode) cannot be folded and is refused.
    """
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise NIRExportError(f"{where} is {type(layer).__name__}: the export folds batch norms into Conv2d or Linear only")
    w = layer.weight.detach().to(torch.float64)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            raise NIRExportError(f"{where}: {type(bn).__name__} without running statistics cannot be folded into a "
                                 "weight; NIR has no batch norm (use nn.BatchNorm2d with track_running_stats=True)")
        g = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
        if bn.affine:
            g = g * bn.weight.detach().to(torch.float64)
        b = (b - bn.running_mean.detach().to(torch.float64)) * g
        if bn.affine:
            b = b + bn.bias.detach().to(torch.float64)
        w = w * g.reshape(-1, *([1] * (w.dim() - 1)))
    if isinstance(layer, nn.Linear):
        out: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=True)
    else:
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise NIRExportError(f"{where}: a convolution with groups={layer.groups}, padding={layer.padding!r}, "
                                 f"padding_mode={layer.padding_mode!r}; NIR's Conv2d takes groups=1 and numeric zero padding")
        out = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, bias=True)
    dtype, device = layer.weight.dtype, layer.weight.device
    out = out.to(device=device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        out.bias.copy_(b.to(dtype))
    return out.eval()


def _neuron(module: nn.Module, where: str) -> nn.Module:
    """A single-step SpikingJelly ``LIFNode`` with the parameters of ``module`` (a LIF)."""
    lif = _lif_class()
    if not isinstance(module, lif) or type(module).__name__ not in ("LIFNode",):
        raise NIRExportError(f"{where} is {type(module).__name__}: the export maps SpikingJelly's LIFNode (NIR LIF) "
                             "only; use the zoo's LIF neuron (configs/neuron/lif.yaml)")
    if module.v_reset is None:
        raise NIRExportError(f"{where} resets by subtraction (v_reset=None): NIR's LIF resets to a value; "
                             "train with model.v_reset=0.0")
    return lif(tau=float(module.tau), decay_input=bool(module.decay_input), v_threshold=float(module.v_threshold),
               v_reset=float(module.v_reset), step_mode="s")


def _pool(module: nn.Module, where: str, arch: str) -> nn.Module | None:
    """The stem's pooling as an ``nn.AvgPool2d`` (None for ``nn.Identity``); max pooling is refused."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
        k = getattr(module, "kernel_size", getattr(module, "output_size", "?"))
        alt = f"model={_deploy_name(arch)}" if arch else "a deploy/<name> model"
        raise NIRExportError(f"{where} is max pooling ({type(module).__name__}, kernel {k}): NIR has no max pooling; "
                             f"train the deployable variant {alt} (average-pooling stem, same weight keys) and export it")
    if type(module) is nn.AvgPool2d:
        if module.ceil_mode or module.divisor_override is not None or (module.padding and not module.count_include_pad):
            raise NIRExportError(f"{where}: AvgPool2d with ceil_mode / divisor_override / padding not counted has no "
                                 "NIR equivalent; use nn.AvgPool2d(k, s) without them")
        return nn.AvgPool2d(_pair(module.kernel_size), _pair(module.stride), _pair(module.padding))
    raise NIRExportError(f"{where} is {type(module).__name__}: the export maps average pooling (nn.AvgPool2d) only")


def _pair(v) -> tuple[int, int]:
    """(h, w) of an int or pair: importers read pooling sizes as arrays of two."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _deploy_name(arch: str) -> str:
    from .ms_resnet_deploy import deploy_name

    return arch if arch.startswith("deploy/") else deploy_name(arch)


class _Block(nn.Module):
    """One residual block on one time step: ``conv_i(sn_i(.))`` for i = 1..n, plus the identity or
    ``downsample`` (LIF -> folded conv); the sum is the block's membrane output ``[B, C', H', W']``."""

    def __init__(self, block: nn.Module, where: str):
        super().__init__()
        self.depth = 3 if hasattr(block, "conv3") else 2
        for i in range(1, self.depth + 1):
            setattr(self, f"sn{i}", _neuron(getattr(block, f"sn{i}"), f"{where}.sn{i}"))
            setattr(self, f"conv{i}", fold_batch_norm(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"),
                                                      f"{where}.conv{i}"))
        down = block.downsample
        self.downsample = None
        if down is not None:
            if not (isinstance(down, nn.Sequential) and len(down) == 3):
                raise NIRExportError(f"{where}.downsample is {type(down).__name__}: expected Sequential(LIF, conv, BN)")
            self.downsample = nn.Sequential(_neuron(down[0], f"{where}.downsample.0"),
                                            fold_batch_norm(down[1], down[2], f"{where}.downsample.1"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for i in range(1, self.depth + 1):
            out = getattr(self, f"conv{i}")(getattr(self, f"sn{i}")(out))
        return out + identity  # the membrane shortcut: two edges into each reader of the sum


class DeployGraph(nn.Module):
    """The exported network on ONE time step: events ``[B, C, H, W]`` -> per-step ``fc`` output ``[B, K, 1, 1]``.

    Plain layers only (folded ``nn.Conv2d``, ``nn.AvgPool2d``, single-step SpikingJelly
    ``LIFNode``, ``fc`` as a 1x1 ``nn.Conv2d``), so that SpikingJelly's NIR exporter traces it. Its
    neurons keep their membranes between calls: `run` resets them and steps through a
    sequence; the logits are the mean over the steps.
    """

    def __init__(self, model: nn.Module, feature_size: Sequence[int], arch: str = ""):
        super().__init__()
        self.conv1 = fold_batch_norm(model.conv1, model.bn1, "model.conv1")
        self.maxpool = _pool(model.maxpool, "model.maxpool", arch)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, nn.Sequential(*(_Block(b, f"model.{name}.{i}") for i, b in enumerate(getattr(model, name)))))
        pool = model.avgpool
        if not (isinstance(pool, nn.AdaptiveAvgPool2d) and _pair(pool.output_size) == (1, 1)):
            raise NIRExportError(f"model.avgpool is {pool}: the export maps a global average pooling "
                                 "(AdaptiveAvgPool2d((1, 1))) only")
        kernel = tuple(int(s) for s in feature_size)  # global: the whole feature map
        self.avgpool = nn.AvgPool2d(kernel, kernel, (0, 0))
        head = model.sn1
        # a non-spiking head (nn.Identity): the pooled membranes go to fc as they are, as in the network
        self.sn1 = None if isinstance(head, nn.Identity) else _neuron(head, "model.sn1")
        if not isinstance(model.fc, nn.Linear):
            raise NIRExportError(f"model.fc is {type(model.fc).__name__}: the export maps nn.Linear")
        self.fc = _linear_as_conv(model.fc)

    def forward(self, events: torch.Tensor) -> torch.Tensor:  # events of one step [B, C, H, W]
        x = self.conv1(events)  # [B, w0, H/2, W/2]
        if self.maxpool is not None:
            x = self.maxpool(x)  # [B, w0, H/4, W/4] membrane input of layer1
        x = self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))  # [B, F, 1, 1]
        if self.sn1 is not None:
            x = self.sn1(x)  # spikes [B, F, 1, 1]
        return self.fc(x)  # [B, K, 1, 1] this step's fc output

    def strict_threshold(self) -> "DeployGraph":
        """A copy whose neurons fire at ``H > v_threshold`` (NIR's rule, which snnTorch follows) instead
        of SpikingJelly's ``H >= v_threshold``: every threshold raised to the next float32 above it,
        the same test for every float32 membrane. The two differ only where a membrane equals its
        threshold exactly."""
        import numpy as np

        strict = copy.deepcopy(self)
        for m in strict.modules():
            if isinstance(m, _lif_class()):
                m.v_threshold = float(np.nextafter(np.float32(m.v_threshold), np.float32(np.inf)))
        return strict

    @torch.no_grad()
    def run(self, events: torch.Tensor) -> torch.Tensor:
        """Events ``[T, B, C, H, W]`` -> logits ``[B, K]``: the mean of the T per-step outputs."""
        from spikingjelly.activation_based import functional

        functional.reset_net(self)
        try:
            return run_steps(self, events)
        finally:
            functional.reset_net(self)


def _linear_as_conv(fc: nn.Linear) -> nn.Conv2d:
    """``fc`` as a 1x1 convolution on the pooled ``[B, F, 1, 1]`` (the same weights and bias): NIR's
    ``Flatten`` is read differently by the importers (snnTorch flattens the batch dimension too), a
    1x1 ``Conv2d`` the same by all."""
    conv = nn.Conv2d(fc.in_features, fc.out_features, 1, bias=True).to(fc.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(fc.weight.detach().reshape(*fc.weight.shape, 1, 1))
        conv.bias.copy_(fc.bias.detach() if fc.bias is not None else torch.zeros(fc.out_features))
    return conv.eval()


def _check_family(model: nn.Module) -> str:
    """The architecture name of an exportable MS-ResNet; any other network is refused naming why."""
    from .ms_resnet import MSResNet

    for name, m in model.named_modules():
        if type(m).__name__ == "I2E" and type(m).__module__.startswith("i2e_train."):
            raise NIRExportError(f"model.{name} is the I2E converter (images -> events): NIR cannot express it; export "
                                 "the network without it and give it events (i2e-convert, or i2e_train.i2e.I2E on the host)")
    if not isinstance(model, MSResNet):
        pools = [n for n, m in model.named_modules() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))]
        detail = f" (and model.{pools[0]} is max pooling, which NIR has no node for)" if pools else ""
        raise NIRExportError(f"{type(model).__name__} is not an MS-ResNet{detail}: the NIR export takes the MS-ResNet "
                             "family; train a deploy/<name> model (e.g. model=deploy/ms_resnet18) and export it")
    info = getattr(model, "model_info", None)
    return str(info.get("architecture", "")) if isinstance(info, Mapping) else ""


def deploy_graph(model: nn.Module, resolution: Sequence[int]) -> DeployGraph:
    """The single-step, BN-folded copy of ``model`` (eval mode) for events of ``resolution`` (H, W);
    raises `NIRExportError` for what NIR cannot express."""
    arch = _check_family(model)
    model = copy.deepcopy(model).cpu().float().eval()
    c = int(getattr(model, "in_channels", model.conv1.in_channels))
    with torch.no_grad():  # the feature map size at layer4 (the head's pooling kernel)
        x = torch.zeros(1, 1, c, *(int(r) for r in resolution))
        feat = model.forward_features(x)
        model.reset_state()
    return DeployGraph(model, feat.shape[-2:], arch).eval()


def nir_metadata(model: nn.Module, resolution: Sequence[int], timesteps: int,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a deployer needs beyond the graph, stored flat in the file's metadata (strings and numbers)."""
    from i2e_train import __version__

    info = getattr(model, "model_info", None) or {}
    c = int(getattr(model, "in_channels", 2))
    meta: dict[str, Any] = {
        "producer": f"i2e-train {__version__}",
        "architecture": str(info.get("architecture", type(model).__name__)),
        "input_shape": [c, int(resolution[0]), int(resolution[1])],
        "input": "I2E events, one [C=2 (ON, OFF), H, W] frame per time step, values 0 or 1",
        "timesteps": int(timesteps),
        "dt": DT,
        "readout": "logits = mean of the output node over the T time steps; states reset before each sample",
        "neuron": "SpikingJelly LIF: H = V - (V - v_reset)/tau + X (decay_input=False; X/tau with decay_input=True), "
                  "spike if H >= v_threshold, then V = v_reset (hard reset); as NIR LIF: tau = tau_steps*dt, "
                  "r = tau_steps (1 with decay_input), v_leak = v_reset, forward Euler with step dt",
        "batch_norm": "folded into the preceding convolution with its running statistics (eval mode)",
        "residual": "membrane shortcut: both sources have an edge into each reader of the sum (inputs are summed)",
    }
    for k, v in (extra or {}).items():
        if v is not None:
            meta[str(k)] = v if isinstance(v, (int, float, str)) else str(v)
    return meta


def export_nir(model: nn.Module, path: str | os.PathLike, resolution: Sequence[int], timesteps: int,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (an MS-ResNet, taken in eval mode; the model itself is not changed) to the NIR
    file ``path`` for events ``[T, B, C, H, W]`` of ``resolution`` (H, W) and ``timesteps`` T.

    The graph is traced and mapped by SpikingJelly's ``export_to_nir`` from `deploy_graph`:
    ``Conv2d`` (folded BN, bias; ``fc`` as 1x1), ``AvgPool2d``, ``LIF``. A LIF with time
    constant ``tau`` (in steps), ``decay_input=False`` and hard reset to ``v_reset`` updates
    ``H = V - (V - v_reset)/tau + X``; NIR's ``tau dv/dt = (v_leak - v) + r I`` integrated by forward
    Euler with step ``dt`` is ``v + (dt/tau_nir)(v_leak - v) + (dt/tau_nir) r I``, so
    ``tau_nir = tau * dt``, ``r = tau``, ``v_leak = v_reset`` (``r = 1`` with ``decay_input=True``),
    with ``dt`` = `DT`. NIR defines a spike as ``v > v_threshold``; SpikingJelly fires at
    ``>=`` (they differ only when the membrane equals the threshold exactly).

    The file is written whole or not at all (a temporary name, then renamed into place).
    """
    _need_nir()
    import nir
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    graph_model = deploy_graph(model, resolution)
    example = torch.zeros(1, int(graph_model.conv1.in_channels), *(int(r) for r in resolution))
    with contextlib.redirect_stdout(io.StringIO()):
        graph = export_to_nir(graph_model, example, dt=DT)
    graph.metadata = nir_metadata(model, resolution, timesteps, metadata)
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def read_nir(path: str | os.PathLike):
    """The ``nir.NIRGraph`` of a ``.nir`` file (HDF5 read by ``nir.read``: arrays and strings, no
    code) and its metadata with strings decoded."""
    _need_nir()
    import nir

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NIR file")
    graph = nir.read(str(path))
    graph.metadata = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in dict(graph.metadata or {}).items()}
    return graph


def run_steps(step: Callable[[torch.Tensor], torch.Tensor], events: torch.Tensor) -> torch.Tensor:
    """Events ``[T, B, C, H, W]`` through a per-step function (output ``[B, K, ...]``) -> the mean of
    its T outputs, flattened: logits ``[B, K]``."""
    out = torch.stack([step(events[t]) for t in range(events.shape[0])]).mean(0)
    return out.reshape(out.shape[0], -1)


@torch.no_grad()
def run_spikingjelly(graph_or_path, events: torch.Tensor) -> torch.Tensor:
    """A NIR graph imported by SpikingJelly's ``import_from_nir`` (single-step, its explicit state
    passed from step to step, fresh per call) on events ``[T, B, C, H, W]`` -> logits ``[B, K]``."""
    _need_nir()
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    graph = read_nir(graph_or_path) if isinstance(graph_or_path, (str, os.PathLike)) else graph_or_path
    with contextlib.redirect_stdout(io.StringIO()):
        net = import_from_nir(graph, dt=DT, step_mode="s")
    state: dict | None = None

    def step(x: torch.Tensor) -> torch.Tensor:
        nonlocal state
        out, state = net(x, state)
        return out

    return run_steps(step, events.float())


@torch.no_grad()
def run_snntorch(graph_or_path, events: torch.Tensor) -> torch.Tensor:
    """A NIR graph imported by snnTorch's ``import_from_nir`` on events ``[T, B, C, H, W]`` -> logits
    ``[B, K]``. Its ``Leaky`` neurons keep their membranes in the modules: reset before the first step."""
    _need_nir()
    import snntorch
    from snntorch.import_nir import import_from_nir

    graph = read_nir(graph_or_path) if isinstance(graph_or_path, (str, os.PathLike)) else graph_or_path
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        net = import_from_nir(graph)
    for m in net.modules():
        if isinstance(m, snntorch.Leaky):
            m.reset_mem()
    return run_steps(lambda x: net(x)[0], events.float())
