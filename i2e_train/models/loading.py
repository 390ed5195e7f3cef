"""Loading weights into a model: strict key check after remapping, head replacement, a report.

[`load_checkpoint`][i2e_train.models.loading.load_checkpoint] takes a checkpoint path in any format `i2e_train.models.checkpoint`
reads, a released-weight name (found under ``cache_dir`` or downloaded,
`i2e_train.models.hub`), or an in-memory state dict. After remapping, keys and shapes are
checked strictly; a mismatch raises [`CheckpointMismatchError`][i2e_train.models.loading.CheckpointMismatchError] naming the file and every
missing, unexpected and mis-shaped key. ``replace_head=True`` loads the backbone and
re-initialises only the classifier ``fc``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from i2e_train.models.checkpoint import (
    Checkpoint,
    describe_architecture,
    infer_architecture,
    read_checkpoint,
    remap_state_dict,
)
from i2e_train.models.errors import CheckpointError
from i2e_train.models.hub import resolve_released
from i2e_train.models.released import ReleasedWeight, find_released

__all__ = ["LoadReport", "CheckpointMismatchError", "load_checkpoint", "replace_head"]


@dataclass
class LoadReport:
    """What [`load_checkpoint`][i2e_train.models.loading.load_checkpoint] did.

    ``ignored_keys`` were present in the file and deliberately not loaded (converter kernels,
    other LightningModule parts, a replaced head); ``missing_keys`` / ``unexpected_keys`` /
    ``mismatched_keys`` are only non-empty with ``strict=False`` (or, for the head, when it was
    replaced). ``mismatched_keys`` holds ``(key, checkpoint shape, model shape)``.
    """

    source: str
    format: str
    loaded_keys: int = 0
    ignored_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    head_replaced: bool = False
    epoch: Optional[int] = None
    best_acc1: Optional[float] = None
    released: Optional[ReleasedWeight] = None
    metadata: dict[str, str] = field(default_factory=dict)


_MAX_LISTED = 25


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's keys or shapes do not match the model (after remapping).

    Attributes: ``source``, ``missing`` (model keys absent from the checkpoint), ``unexpected``
    (checkpoint keys the model lacks), ``mismatched`` (``(key, checkpoint shape, model shape)``),
    ``head_only`` (only the classifier differs: another class count) and ``checkpoint_info``
    (`infer_architecture` of the checkpoint).
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        model_sd: Mapping[str, torch.Tensor],
        ckpt_sd: Mapping[str, torch.Tensor],
        model_desc: str,
        head_name: str,
    ):
        self.source, self.missing, self.unexpected, self.mismatched = source, missing, unexpected, mismatched
        self.checkpoint_info = infer_architecture(ckpt_sd)

        def listing(title: str, lines: list[str]) -> list[str]:
            if not lines:
                return []
            more = len(lines) - _MAX_LISTED
            body = [f"    {line}" for line in lines[:_MAX_LISTED]]
            if more > 0:
                body.append(f"    ... and {more} more (see the exception's attributes)")
            return [f"  {title} ({len(lines)}):", *body]

        lines = [f"checkpoint {source} does not match the model ({model_desc}):"]
        lines += listing("missing from the checkpoint", [f"{k} {_shape(model_sd[k])}" for k in missing])
        lines += listing("unexpected in the checkpoint", [f"{k} {_shape(ckpt_sd[k])}" for k in unexpected])
        lines += listing(
            "shape mismatch", [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in mismatched]
        )
        lines.append(f"  the checkpoint looks like: {describe_architecture(self.checkpoint_info)}")
        bad = set(missing) | set(unexpected) | {k for k, _, _ in mismatched}
        self.head_only = bool(bad) and all(k.startswith(head_name + ".") for k in bad)
        if self.head_only:
            lines.append(
                f"  only the classifier '{head_name}' differs: pass replace_head=True to load the backbone and "
                f"re-initialise '{head_name}' for the model's class count"
            )
        super().__init__("\n".join(lines))


def _head_name(model: nn.Module) -> str:
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    return "fc"


def _model_desc(model: nn.Module) -> str:
    info = getattr(model, "model_info", None)
    if isinstance(info, Mapping) and "architecture" in info:
        return (
            f"{info['architecture']}: {info.get('block')} layers {info.get('layers')} widths {info.get('widths')}, "
            f"{info.get('in_channels')} input channels, {info.get('num_classes')} classes"
        )
    return type(model).__name__


def replace_head(model: nn.Module, num_classes: Optional[int] = None) -> nn.Module:
    """Re-initialise the classifier; with ``num_classes`` (and ``reset_classifier``) also resize it."""
    if num_classes is not None and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return model
    head = model.get_submodule(_head_name(model))
    if num_classes is not None and getattr(head, "out_features", num_classes) != num_classes:
        raise ValueError(f"{type(model).__name__} cannot resize its classifier to {num_classes} classes")
    head.reset_parameters()
    return model


def _resolve_source(source: Union[str, os.PathLike], cache_dir: Union[str, os.PathLike]
                    ) -> tuple[Path, Optional[ReleasedWeight]]:
    released = find_released(source)
    if released is not None:
        return resolve_released(released.name, cache_dir=cache_dir, repo_id=released.repo_id), released
    return Path(source), None


def _read(source, map_location: Any, cache_dir, trusted_config: Any = None
          ) -> tuple[Checkpoint, str, Optional[ReleasedWeight]]:
    """The checkpoint a source names, its label for messages and its released-table row."""
    if isinstance(source, Mapping):
        return Checkpoint(dict(source), "state_dict"), "<in-memory state dict>", None
    path, released = _resolve_source(source, cache_dir)
    ckpt = read_checkpoint(path, map_location=map_location, trusted_config=trusted_config)
    return ckpt, str(path), released


@dataclass
class _KeyCheck:
    """The remapped state dict against the model's: what loads and what does not."""

    state_dict: dict[str, torch.Tensor]
    ignored: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]


def _check_keys(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor], head: str,
                replace: bool) -> _KeyCheck:
    sd, ignored = remap_state_dict(ckpt_sd, set(model_sd))
    is_head = lambda k: k.startswith(head + ".")  # noqa: E731
    if replace:
        ignored += [k for k in sd if is_head(k)]
        sd = {k: v for k, v in sd.items() if not is_head(k)}
    missing = [k for k in model_sd if k not in sd and not (replace and is_head(k))]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [(k, tuple(sd[k].shape), tuple(model_sd[k].shape))
                  for k in sd if k in model_sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    return _KeyCheck(sd, ignored, missing, unexpected, mismatched)


def _load(model: nn.Module, check: _KeyCheck, head: str, replace: bool, label: str) -> dict[str, torch.Tensor]:
    """Load the tensors that match; re-initialise the head when replaced. Returns what was loaded."""
    bad = set(check.unexpected) | {k for k, _, _ in check.mismatched}
    to_load = {k: v for k, v in check.state_dict.items() if k not in bad}
    result = model.load_state_dict(to_load, strict=False)
    leftover = [k for k in result.missing_keys if not (replace and k.startswith(head + "."))]
    expected_leftover = check.missing + [k for k, _, _ in check.mismatched]
    if sorted(leftover) != sorted(expected_leftover) or result.unexpected_keys:  # pragma: no cover - defensive
        raise CheckpointError(f"{label}: load_state_dict disagreed with the key check ({result})")
    if replace:
        for m in model.get_submodule(head).modules():  # a Linear, or a block around one (SpikingJelly's MA-SNN)
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    return to_load


def load_checkpoint(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    replace_head: bool = False,
    strict: bool = True,
    map_location: Any = "cpu",
    cache_dir: Union[str, os.PathLike] = "checkpoints",
    trusted_config: Any = None,
) -> LoadReport:
    """Load weights into ``model`` after remapping foreign keys; strict by default.

    Args:
        model: the network (e.g. from [`i2e_train.models.create_model`][i2e_train.models.registry.create_model]).
        source: a checkpoint path (official ``.pth.tar``, Lightning ``.ckpt``, ``.safetensors``,
            raw state dict), a released-weight name (``'released:<name>'`` or the bare name),
            or an in-memory state dict.
        replace_head: ignore the checkpoint's classifier ``fc`` and re-initialise the model's
            (its class count is the model's); every other tensor is loaded exactly.
        strict: raise [`CheckpointMismatchError`][i2e_train.models.loading.CheckpointMismatchError] on any missing, unexpected or
            mis-shaped key. With ``strict=False`` the matching tensors are loaded and the rest
            is reported.
        map_location: passed to ``torch.load`` (device for safetensors).
        cache_dir: where released weights are looked for / downloaded to.
        trusted_config: the config of the run loading the weights; the run config an
            ``i2e-train`` checkpoint stores may hold what it holds (its command line's additions),
            besides what our config groups define (`check_stored_config`).

    Nothing in a file is ever run: torch files are read with ``weights_only=True`` (tensors,
    containers, numbers); a file that holds any other Python object is refused with
    `CheckpointFormatError`, which says how to convert it.

    Returns:
        a [`LoadReport`][i2e_train.models.loading.LoadReport].
    """
    ckpt, label, released = _read(source, map_location, cache_dir, trusted_config)
    model_sd = model.state_dict()
    head = _head_name(model)
    check = _check_keys(model_sd, ckpt.state_dict, head, replace_head)
    if strict and (check.missing or check.unexpected or check.mismatched):
        raise CheckpointMismatchError(label, check.missing, check.unexpected, check.mismatched, model_sd,
                                      check.state_dict, _model_desc(model), head)
    loaded = _load(model, check, head, replace_head, label)
    return LoadReport(
        source=label, format=ckpt.format, loaded_keys=len(loaded), ignored_keys=check.ignored,
        missing_keys=check.missing, unexpected_keys=check.unexpected, mismatched_keys=check.mismatched,
        head_replaced=replace_head, epoch=ckpt.epoch, best_acc1=ckpt.best_acc1, released=released,
        metadata=ckpt.metadata,
    )
