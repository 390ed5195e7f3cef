"""Spiking networks for I2E events: the MS-ResNet family, a timm-style registry and weight loading.

    >>> from i2e_train.models import create_model, load_checkpoint
    >>> model = create_model("ms_resnet18", num_classes=10)       # [T, B, 2, H, W] -> [B, 10]
    >>> report = load_checkpoint(model, "released:cifar10_baseline")  # cache or Hugging Face
"""

from .ms_resnet import BasicBlock, Bottleneck, MSResNet, NeuronConfig
from .pretrained import (
    RELEASED_WEIGHTS,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    LoadReport,
    ReleasedWeight,
    ReleasedWeightsUnavailable,
    export_safetensors,
    load_checkpoint,
    replace_head,
    resolve_released,
)
from .registry import create_model, is_model, list_models, register_model

__all__ = [
    "MSResNet",
    "BasicBlock",
    "Bottleneck",
    "NeuronConfig",
    "create_model",
    "register_model",
    "list_models",
    "is_model",
    "load_checkpoint",
    "replace_head",
    "RELEASED_WEIGHTS",
    "ReleasedWeight",
    "resolve_released",
    "export_safetensors",
    "LoadReport",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ReleasedWeightsUnavailable",
]
