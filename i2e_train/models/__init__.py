"""Spiking networks for I2E events: the MS-ResNet family, a timm-style registry and weights.

    >>> from i2e_train.models import create_model, load_checkpoint
    >>> model = create_model("ms_resnet18", num_classes=10)       # [T, B, 2, H, W] -> [B, 10]
    >>> report = load_checkpoint(model, "released:cifar10_baseline")  # cache or Hugging Face

Files: ``ms_resnet`` (the networks), ``ms_resnet_deploy`` (``deploy/<name>``: the same with an
average-pooling stem), ``nir_export`` (NIR graphs of them), ``registry`` (names -> entry points), ``lif`` / ``layers``
(neuron and layers with bit-identical fast CPU paths), ``released`` (the released-weights table),
``hub`` (downloading a released file), ``checkpoint`` (reading, remapping and writing checkpoint
files), ``loading`` (strict loading into a model), ``errors``.
"""

from .checkpoint import export_safetensors, read_checkpoint, state_digest
from .errors import CheckpointError, CheckpointFormatError, ReleasedWeightsUnavailable
from .hub import resolve_released
from .loading import CheckpointMismatchError, LoadReport, load_checkpoint, replace_head
from .ms_resnet import BasicBlock, Bottleneck, MSResNet, NeuronConfig
from . import sj_zoo  # noqa: F401  (registers sj/<name>: SpikingJelly's zoo)
from . import ms_resnet_deploy  # noqa: F401  (registers deploy/<name>: the NIR-exportable MS-ResNets)
from .registry import create_model, is_model, list_models, register_model
from .released import RELEASED_WEIGHTS, ReleasedWeight, find_released, get_released

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
    "read_checkpoint",
    "state_digest",
    "RELEASED_WEIGHTS",
    "ReleasedWeight",
    "find_released",
    "get_released",
    "resolve_released",
    "export_safetensors",
    "LoadReport",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ReleasedWeightsUnavailable",
]
