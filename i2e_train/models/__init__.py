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

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "ms_resnet": ["MSResNet", "BasicBlock", "Bottleneck", "NeuronConfig"],
    "registry": ["create_model", "register_model", "list_models", "is_model"],
    "loading": ["load_checkpoint", "replace_head", "LoadReport", "CheckpointMismatchError"],
    "checkpoint": ["read_checkpoint", "state_digest", "export_safetensors"],
    "released": ["RELEASED_WEIGHTS", "ReleasedWeight", "find_released", "get_released"],
    "hub": ["resolve_released"],
    "errors": ["CheckpointError", "CheckpointFormatError", "ReleasedWeightsUnavailable"],
})
