"""A timm-style model registry.

Entry points are small functions ``fn(num_classes=1000, **kwargs) -> nn.Module`` decorated with
[`register_model`][i2e_train.models.registry.register_model]; [`create_model`][i2e_train.models.registry.create_model] builds a model by name and can load weights
(a checkpoint path or a released-weight name) in the same call.

    >>> from i2e_train.models import create_model, list_models
    >>> list_models("ms_resnet*")
    ['ms_resnet101', 'ms_resnet152', 'ms_resnet18', 'ms_resnet34', 'ms_resnet50', 'ms_resnet_tiny']
    >>> model = create_model("ms_resnet18", num_classes=10)   # events [T, B, 2, H, W] -> [B, 10]
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Callable, Iterable, TypeVar, Union

from torch import nn

from i2e_train.naming import unknown_name

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entrypoint"]

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
# The modules whose entry points register themselves when imported (the package imports its
# names lazily, so the registry imports them before it is read).
_ZOO = ("i2e_train.models.ms_resnet", "i2e_train.models.sj_zoo", "i2e_train.models.ms_resnet_deploy")


def _load_zoo() -> None:
    import importlib

    for module in _ZOO:
        importlib.import_module(module)

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register ``fn`` under its ``__name__``; use as a decorator on an entry-point function.

    Registering a second, different function under a taken name raises ``ValueError``.
    """
    name = fn.__name__
    existing = _model_entrypoints.get(name)
    if existing is not None and existing is not fn and (
        existing.__module__,
        existing.__qualname__,
    ) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    _model_entrypoints[name] = fn
    return fn


def list_models(pattern: Union[str, Iterable[str]] = "*") -> list[str]:
    """Sorted names of the registered models matching an fnmatch ``pattern`` (or any of several)."""
    _load_zoo()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return sorted(n for n in _model_entrypoints if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    _load_zoo()
    return name in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entry-point function of ``name``; unknown names raise ``ValueError`` with suggestions."""
    _load_zoo()
    try:
        return _model_entrypoints[name]
    except KeyError:
        raise unknown_name("model", name, list_models(), listed="Available models") from None


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    replace_head: bool = False,
    cache_dir: str | os.PathLike = "checkpoints",
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model and optionally load weights into it.

    Args:
        name: a registered model name (see [`list_models`][i2e_train.models.registry.list_models]).
        num_classes: classifier size. ``None`` means 1000, or the class count of the released
            weight when ``pretrained`` names one (e.g. ``'released:cifar10_baseline'`` -> 10).
        pretrained: ``None``, a checkpoint path (official ``.pth.tar``, Lightning ``.ckpt``,
            ``.safetensors``, raw state dict) or a released-weight name (``'released:<name>'``
            or the bare name), loaded strictly by
            [`i2e_train.models.loading.load_checkpoint`][i2e_train.models.loading.load_checkpoint].
        replace_head: load the backbone only and re-initialise ``fc`` for ``num_classes``
            (fine-tuning on another label set).
        cache_dir: where released weights are looked for and downloaded to.
        **kwargs: passed to the entry point (``in_channels``, ``widths``, neuron parameters ...).

    Returns:
        the model (training mode, on CPU); registered models carry a ``model_info`` dict.
    """
    entry = model_entrypoint(name)
    if num_classes is None:
        num_classes = 1000
        if pretrained is not None:
            from .released import find_released

            released = find_released(str(pretrained))
            if released is not None and not replace_head:
                num_classes = released.num_classes
    model = entry(num_classes=num_classes, **kwargs)
    if pretrained is not None:
        from .loading import load_checkpoint

        model.load_report = load_checkpoint(model, pretrained, replace_head=replace_head, cache_dir=cache_dir)
    return model
