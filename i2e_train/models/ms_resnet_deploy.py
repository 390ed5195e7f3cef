"""The deployable MS-ResNet: the zoo's networks with an average-pooling stem, exportable to NIR.

NIR (the Neuromorphic Intermediate Representation that neuromorphic simulators and chips import)
has no max pooling, so the stem's ``maxpool`` 3x3/2 of `MSResNet` cannot
be exported. These variants replace it by an average pooling 2x2/2 (``nn.AvgPool2d``, no padding:
the same ``H/4`` output for even sizes, and nothing an importer could pad differently); every other
layer, the attribute names and so the state-dict keys are those of the standard network, so its
checkpoints load strictly (the pooling has no weights) and every recipe trains them through a model
override (``model=deploy/ms_resnet18``). The rest of the network is already NIR-expressible once its
batch norms are folded into the convolutions before them (`i2e_train.models.nir_export`).

The pooling stays at the attribute ``maxpool``, the name the forward of ``MSResNet`` calls; it holds
an ``nn.AvgPool2d``.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .ms_resnet import BasicBlock, Bottleneck, MSResNet
from .registry import register_model

__all__ = ["DeployMSResNet", "STEM_POOL", "deploy_name"]

STEM_POOL = {"kernel_size": 2, "stride": 2}  # the stem's average pooling (nn.AvgPool2d arguments)


def deploy_name(architecture: str) -> str:
    """The deployable variant's registered name of a standard MS-ResNet name (``ms_resnet18`` ->
    ``deploy/ms_resnet18``)."""
    return f"deploy/{architecture}"


class DeployMSResNet(MSResNet):
    """`MSResNet` with ``maxpool`` replaced by ``nn.AvgPool2d(2, 2)``:
    events ``[T, B, C, H, W]`` -> logits ``[B, classes]``, the same arguments as ``MSResNet``."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, **kwargs: Any):
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        self.maxpool = nn.AvgPool2d(**STEM_POOL)  # [T*B, w0, H/2, W/2] -> [T*B, w0, H/4, W/4]


def _create(arch: str, block, layers: Sequence[int], num_classes: int, **kwargs: Any) -> DeployMSResNet:
    model = DeployMSResNet(block, layers, num_classes=num_classes, **kwargs)
    model.model_info = {
        "architecture": deploy_name(arch),
        "block": block.__name__,
        "layers": [int(n) for n in layers],
        "widths": [int(w) for w in kwargs["widths"]],
        "in_channels": int(kwargs.get("in_channels", 2)),
        "num_classes": int(num_classes),
        "stem_pool": dict(STEM_POOL, kind="avg"),
    }
    return model


def _deploy(arch: str, block, layers: Sequence[int], widths: Sequence[int], doc: str) -> None:
    def entry_point(num_classes: int = 1000, layers: Sequence[int] = layers, widths: Sequence[int] = widths,
                    **kwargs: Any) -> DeployMSResNet:
        return _create(arch, block, layers, num_classes, widths=widths, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = deploy_name(arch)
    entry_point.__doc__ = f"{doc}; average-pooling stem (NIR-exportable); ``layers`` and ``widths`` may be overridden."
    register_model(entry_point)


_WIDE = (64, 128, 256, 512)
_deploy("ms_resnet18", BasicBlock, (2, 2, 2, 2), _WIDE, "MS-ResNet-18: BasicBlock, layers [2, 2, 2, 2]")
_deploy("ms_resnet34", BasicBlock, (3, 4, 6, 3), _WIDE, "MS-ResNet-34: BasicBlock, layers [3, 4, 6, 3]")
_deploy("ms_resnet50", Bottleneck, (3, 4, 6, 3), _WIDE, "MS-ResNet-50: Bottleneck, layers [3, 4, 6, 3]")
_deploy("ms_resnet101", Bottleneck, (3, 4, 23, 3), _WIDE, "MS-ResNet-101: Bottleneck, layers [3, 4, 23, 3]")
_deploy("ms_resnet152", Bottleneck, (3, 8, 36, 3), _WIDE, "MS-ResNet-152: Bottleneck, layers [3, 8, 36, 3]")
_deploy("ms_resnet_tiny", BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128),
        "Small MS-ResNet for the demo and tests: BasicBlock, one block per stage, widths (16, 32, 64, 128)")
