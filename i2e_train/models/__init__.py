"""Spiking networks for I2E events: the MS-ResNet family, a timm-style registry and weights.

    >>> from i2e_train.models import create_model, load_checkpoint
    >>> model = create_model("ms_resnet18", num_classes=10)       # [T, B, 2, H, W] -> [B, 10]
    >>> report = load_checkpoint(model, "released:cifar10_baseline")  # cache or Hugging Face

Files: ``ms_resnet`` (the networks), ``ms_resnet_deploy`` (``deploy/<name>``: the same with an
average-pooling stem), ``nir_export`` (NIR graphs of them), ``registry`` (names -> entry points),
``lif`` (the LIF operator), ``memory`` / ``recompute`` / ``memory_plan`` (training memory),
``released`` (the released-weights table),
``hub`` (downloading a released file), ``checkpoint`` (reading, remapping and writing checkpoint
files), ``loading`` (strict loading into a model), ``errors``.

Names are imported on first use (as in `i2e_train.data`), so that ``released`` (the table,
facts only) can be read without importing torch: the entry points' ``--help`` lists its names.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MSResNet": "ms_resnet", "BasicBlock": "ms_resnet", "Bottleneck": "ms_resnet", "NeuronConfig": "ms_resnet",
    "create_model": "registry", "register_model": "registry", "list_models": "registry", "is_model": "registry",
    "load_checkpoint": "loading", "replace_head": "loading", "LoadReport": "loading",
    "CheckpointMismatchError": "loading",
    "read_checkpoint": "checkpoint", "state_digest": "checkpoint", "export_safetensors": "checkpoint",
    "RELEASED_WEIGHTS": "released", "ReleasedWeight": "released", "find_released": "released",
    "get_released": "released",
    "resolve_released": "hub",
    "CheckpointError": "errors", "CheckpointFormatError": "errors", "ReleasedWeightsUnavailable": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
