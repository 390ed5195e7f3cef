"""MS-ResNet (membrane-shortcut spiking ResNet), the variant used by I2E.

The layout and the attribute names follow the networks behind the released I2E weights, so their
state dicts load strictly (see ``i2e_train.models.loading``):

* stem: ``conv1`` 7x7/2 (no bias) -> ``bn1`` -> ``maxpool`` 3x3/2; no neuron in the stem;
* stages ``layer1`` .. ``layer4`` (strides 1, 2, 2, 2) of `BasicBlock` (expansion 1) or
  `Bottleneck` (expansion 4). Every block fires first and convolves second
  (``sn -> conv -> bn``) and adds its residual to the *membrane input* (pre-spike values):
  ``out = bn2(conv2(sn2(bn1(conv1(sn1(x)))))) + identity``;
* ``downsample`` = ``Sequential(LIF, conv1x1/s no bias, BN)``, hence the keys
  ``downsample.1.weight`` and ``downsample.2.*``;
* head: adaptive average pool -> ``sn1`` (LIF) -> flatten -> ``fc`` -> mean over time.

Tensors are kept time first, ``[T, B, C, H, W]``, between layers. Convolutions, batch norms and
pooling are plain ``torch.nn`` layers applied to the flattened ``[T*B, C, H, W]`` view, which is
what SpikingJelly's ``SeqToANNContainer`` does, without the extra container level in the keys.
Neurons are SpikingJelly ``LIFNode`` in multi-step mode (``step_mode='m'``); with SpikingJelly
2.0 the kernel is chosen from the tensor device (pure torch on CPU).

Every forward starts by resetting all neuron states (``functional.reset_net``), so two calls on
the same input give the same output and callers never need to reset by hand; it resets them
again when it ends, so no membrane tensor keeps a reference to the autograd graph (which would
make ``copy.deepcopy`` of the model fail).

The network is plain PyTorch + SpikingJelly: what training keeps for the backward pass is
decided from outside, for any network, by `i2e_train.models.memory.set_memory`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence, Type, Union

import torch
from spikingjelly.activation_based import functional, surrogate
from torch import nn

from .lif import LIFNode
from .registry import register_model

__all__ = [
    "SURROGATES",
    "NeuronConfig",
    "BasicBlock",
    "Bottleneck",
    "MSResNet",
    "make_surrogate",
    "ms_resnet18",
    "ms_resnet34",
    "ms_resnet50",
    "ms_resnet101",
    "ms_resnet152",
    "ms_resnet_tiny",
    "per_frame",
]

# Surrogate-gradient names accepted by ``surrogate=`` (all take an ``alpha`` argument).
SURROGATES: dict[str, type] = {
    "atan": surrogate.ATan,
    "sigmoid": surrogate.Sigmoid,
    "erf": surrogate.Erf,
    "soft_sign": surrogate.SoftSign,
    "piecewise_quadratic": surrogate.PiecewiseQuadratic,
    "piecewise_exp": surrogate.PiecewiseExp,
    "q_pseudo_spike": surrogate.QPseudoSpike,
    "rect": surrogate.Rect,
}


def make_surrogate(name: Union[str, nn.Module], alpha: float | None = None) -> nn.Module:
    """Build a SpikingJelly surrogate function from its name (``'atan'``, ``'sigmoid'``, ...).

    An ``nn.Module`` instance is returned unchanged. ``alpha=None`` keeps the class default.
    """
    if isinstance(name, nn.Module):
        return name
    key = str(name).lower().replace("-", "_")
    if key not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; expected one of {sorted(SURROGATES)}")
    cls = SURROGATES[key]
    return cls() if alpha is None else cls(alpha=alpha)


@dataclass(frozen=True)
class NeuronConfig:
    """Parameters of every LIF neuron of the network (defaults = the I2E settings).

    ``v_reset=None`` gives a soft reset (subtract the threshold); ``surrogate`` is a name of
    `SURROGATES` and ``surrogate_alpha`` its sharpness.
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = False
    detach_reset: bool = True
    surrogate: str = "atan"
    surrogate_alpha: float | None = 2.0

    def __post_init__(self) -> None:
        """Numbers given as ints (``model.tau=3``) become floats; SpikingJelly asserts a float tau > 1."""
        for name in ("tau", "v_threshold", "v_reset", "surrogate_alpha"):
            value = getattr(self, name)
            if value is None and name in ("v_reset", "surrogate_alpha"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"model.{name}={value!r}: expected a number")
            object.__setattr__(self, name, float(value))
        if not self.tau > 1.0:
            raise ValueError(f"model.tau={self.tau}: the LIF time constant must be > 1 (the I2E setting is 2.0)")

    def build(self) -> nn.Module:
        """A fresh multi-step `LIFNode` (SpikingJelly's LIF with the
        fused CPU kernel; input ``[T, ...]``, output spikes of the same shape)."""
        return LIFNode(
            tau=self.tau,
            decay_input=self.decay_input,
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            surrogate_function=make_surrogate(self.surrogate, self.surrogate_alpha),
            detach_reset=self.detach_reset,
            step_mode="m",
        )


NeuronFactory = Callable[[], nn.Module]


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame layer to a sequence: ``[T, B, ...] -> [T*B, ...] -> [T, B, ...]``."""
    t, b = x.shape[0], x.shape[1]
    y = module(x.flatten(0, 1))
    return y.reshape(t, b, *y.shape[1:])


_seq = per_frame


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _Downsample(nn.Sequential):
    """``Sequential(LIF, conv1x1/stride, BN)`` on ``[T, B, C, H, W]`` -> ``[T, B, C', H', W']``.

    A ``Sequential`` subclass so that the keys stay ``downsample.1.*`` / ``downsample.2.*``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, make_neuron: NeuronFactory):
        super().__init__(make_neuron(), conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)  # spikes           [T, B, C, H, W]
        x = _seq(self[1], x)  # conv 1x1/s  [T, B, C', H', W']
        return _seq(self[2], x)  # BN       [T, B, C', H', W']


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a membrane shortcut (expansion 1).

    ``[T, B, inplanes, H, W] -> [T, B, planes, H/stride, W/stride]``.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        make_neuron: NeuronFactory = NeuronConfig().build,
    ):
        super().__init__()
        self.sn1 = make_neuron()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.sn2 = make_neuron()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # [T, B, planes, H', W']
        out = _seq(self.conv1, self.sn1(x))  # [T, B, planes, H', W']
        out = self.sn2(_seq(self.bn1, out))  # spikes [T, B, planes, H', W']
        out = _seq(self.bn2, _seq(self.conv2, out))  # [T, B, planes, H', W']
        return out + identity  # membrane shortcut: pre-spike values are added


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 convolutions with a membrane shortcut (expansion 4).

    ``[T, B, inplanes, H, W] -> [T, B, 4*planes, H/stride, W/stride]``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        make_neuron: NeuronFactory = NeuronConfig().build,
    ):
        super().__init__()
        self.sn1 = make_neuron()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.sn2 = make_neuron()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.sn3 = make_neuron()
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # [T, B, 4p, H', W']
        out = _seq(self.conv1, self.sn1(x))  # [T, B, p, H, W]
        out = _seq(self.conv2, self.sn2(_seq(self.bn1, out)))  # [T, B, p, H', W']
        out = _seq(self.conv3, self.sn3(_seq(self.bn2, out)))  # [T, B, 4p, H', W']
        return _seq(self.bn3, out) + identity


Block = Type[Union[BasicBlock, Bottleneck]]


class MSResNet(nn.Module):
    """Membrane-shortcut spiking ResNet: events ``[T, B, C, H, W]`` -> logits ``[B, classes]``.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: number of blocks in each of the four stages.
        num_classes: size of the classifier ``fc``.
        in_channels: input channels (2 = ON/OFF polarities).
        widths: base width of each stage (the output is ``width * block.expansion``).
        zero_init_residual: set the last BN weight of every block to 0 (each block starts as
            an identity on the membrane path).
        tau: membrane time constant of every LIF neuron (> 1; see `NeuronConfig`).
        v_threshold: firing threshold.
        v_reset: reset potential (None: soft reset, the threshold is subtracted).
        decay_input: whether the input decays with the membrane.
        detach_reset: cut the reset out of the backward (the I2E setting).
        surrogate: surrogate-gradient name (`SURROGATES`).
        surrogate_alpha: its sharpness (None: the class default).

    Any number of timesteps T is accepted; the logits are the mean of the per-step ``fc``
    outputs. Neuron states are reset at the start of every forward.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 2,
        widths: Sequence[int] = (64, 128, 256, 512),
        zero_init_residual: bool = False,
        *,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = False,
        detach_reset: bool = True,
        surrogate: str = "atan",
        surrogate_alpha: float | None = 2.0,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 entries each, got {list(layers)} and {list(widths)}")
        if any(int(n) < 1 for n in layers):
            raise ValueError(f"every stage needs at least one block, got layers={list(layers)}")
        self.neuron_cfg = NeuronConfig(
            tau=tau,
            v_threshold=v_threshold,
            v_reset=v_reset,
            decay_input=decay_input,
            detach_reset=detach_reset,
            surrogate=surrogate,
            surrogate_alpha=surrogate_alpha,
        )
        make_surrogate(surrogate, surrogate_alpha)  # fail early on a bad surrogate name
        self.block = block
        self.layers_cfg = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)

        self.inplanes = self.widths[0]
        # stem: [T*B, C_in, H, W] -> [T*B, w0, H/4, W/4]
        self.conv1 = nn.Conv2d(self.in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, self.widths[0], self.layers_cfg[0], stride=1)
        self.layer2 = self._make_layer(block, self.widths[1], self.layers_cfg[1], stride=2)
        self.layer3 = self._make_layer(block, self.widths[2], self.layers_cfg[2], stride=2)
        self.layer4 = self._make_layer(block, self.widths[3], self.layers_cfg[3], stride=2)
        # head: [T*B, F, h, w] -> [T*B, F, 1, 1] -> LIF -> [T, B, F] -> fc -> mean over T
        self.num_features = self.widths[3] * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.sn1 = self.neuron_cfg.build()
        self.fc = nn.Linear(self.num_features, self.num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """Kaiming-normal convolutions (fan_in, relu), BN weight 1 and bias 0; optionally the last
        BN of every block 0 (each block then starts as an identity on the membrane path)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0.0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0.0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _Downsample(self.inplanes, planes * block.expansion, stride, self.neuron_cfg.build)
        modules = [block(self.inplanes, planes, stride, downsample, self.neuron_cfg.build)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            modules.append(block(self.inplanes, planes, 1, None, self.neuron_cfg.build))
        return nn.Sequential(*modules)

    def reset_state(self) -> None:
        """Reset the membrane potential of every neuron (done at the start of each forward)."""
        functional.reset_net(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Events ``[T, B, C, H, W]`` -> membrane features ``[T, B, F, H/32, W/32]``.

        Resets the neuron states first.
        """
        if x.dim() != 5:
            raise ValueError(f"expected events [T, B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels at dim 2 of [T, B, C, H, W], got shape {tuple(x.shape)}"
            )
        self.reset_state()
        x = self._stem(x)  # [T, B, w0, H/4, W/4]
        x = self.layer1(x)  # [T, B, F1, H/4, W/4]
        x = self.layer2(x)  # [T, B, F2, H/8, W/8]
        x = self.layer3(x)  # [T, B, F3, H/16, W/16]
        return self.layer4(x)  # [T, B, F4, H/32, W/32]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> maxpool: ``[T, B, C_in, H, W] -> [T, B, w0, H/4, W/4]``."""
        return _seq(self.maxpool, _seq(self.bn1, _seq(self.conv1, x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features ``[T, B, F, h, w]`` -> logits ``[B, classes]`` (or spikes ``[T, B, F]``)."""
        x = _seq(self.avgpool, x)  # [T, B, F, 1, 1]
        x = self.sn1(x)  # spikes [T, B, F, 1, 1]
        x = torch.flatten(x, 2)  # [T, B, F]
        if pre_logits:
            return x
        x = self.fc(x)  # [T, B, classes]
        return x.mean(0)  # [B, classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Events ``[T, B, C, H, W]`` -> logits ``[B, classes]`` averaged over T.

        States are reset before the first step and again after the last one, so no membrane
        tensor (nor the autograd graph it points to) outlives the call: the model can be
        deep-copied (EMA, SWA) or pickled at any time.
        """
        try:
            return self.forward_head(self.forward_features(x))
        finally:
            self.reset_state()

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` by a freshly initialised ``Linear(num_features, num_classes)``."""
        device, dtype = self.fc.weight.device, self.fc.weight.dtype
        self.fc = nn.Linear(self.num_features, int(num_classes), device=device, dtype=dtype)
        self.num_classes = int(num_classes)
        if isinstance(getattr(self, "model_info", None), dict):
            self.model_info["num_classes"] = self.num_classes
        functional.invalidate_reset_cache(self)  # the module tree changed

    def extra_repr(self) -> str:
        return (
            f"block={self.block.__name__}, layers={list(self.layers_cfg)}, widths={list(self.widths)}, "
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, neuron={asdict(self.neuron_cfg)}"
        )


def _describe(model: MSResNet, arch: str) -> dict[str, Any]:
    """The ``model_info`` dict attached to registered models."""
    return {
        "architecture": arch,
        "block": model.block.__name__,
        "layers": list(model.layers_cfg),
        "widths": list(model.widths),
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "neuron": asdict(model.neuron_cfg),
    }


def _create(arch: str, block: Block, layers: Sequence[int], num_classes: int, **kwargs: Any) -> MSResNet:
    model = MSResNet(block, layers, num_classes=num_classes, **kwargs)
    model.model_info = _describe(model, arch)
    return model


# ---------------------------------------------------------------------------------------------
# registered entry points: fn(num_classes=1000, **kwargs) -> MSResNet
# kwargs go to MSResNet (in_channels, widths, zero_init_residual, neuron parameters)
# ---------------------------------------------------------------------------------------------


@register_model
def ms_resnet18(num_classes: int = 1000, **kwargs: Any) -> MSResNet:
    """MS-ResNet-18: BasicBlock, layers [2, 2, 2, 2] (the released CIFAR/ImageNet/DVS models)."""
    return _create("ms_resnet18", BasicBlock, (2, 2, 2, 2), num_classes, **kwargs)


@register_model
def ms_resnet34(num_classes: int = 1000, **kwargs: Any) -> MSResNet:
    """MS-ResNet-34: BasicBlock, layers [3, 4, 6, 3] (released: imagenet_augmentation_34)."""
    return _create("ms_resnet34", BasicBlock, (3, 4, 6, 3), num_classes, **kwargs)


@register_model
def ms_resnet50(num_classes: int = 1000, **kwargs: Any) -> MSResNet:
    """MS-ResNet-50: Bottleneck, layers [3, 4, 6, 3]."""
    return _create("ms_resnet50", Bottleneck, (3, 4, 6, 3), num_classes, **kwargs)


@register_model
def ms_resnet101(num_classes: int = 1000, **kwargs: Any) -> MSResNet:
    """MS-ResNet-101: Bottleneck, layers [3, 4, 23, 3]."""
    return _create("ms_resnet101", Bottleneck, (3, 4, 23, 3), num_classes, **kwargs)


@register_model
def ms_resnet152(num_classes: int = 1000, **kwargs: Any) -> MSResNet:
    """MS-ResNet-152: Bottleneck, layers [3, 8, 36, 3]."""
    return _create("ms_resnet152", Bottleneck, (3, 8, 36, 3), num_classes, **kwargs)


@register_model
def ms_resnet_tiny(
    num_classes: int = 1000,
    layers: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (16, 32, 64, 128),
    **kwargs: Any,
) -> MSResNet:
    """Small MS-ResNet for the offline demo and tests: BasicBlock, one block per stage,
    widths (16, 32, 64, 128); ``layers`` and ``widths`` may be overridden."""
    return _create("ms_resnet_tiny", BasicBlock, layers, num_classes, widths=widths, **kwargs)
