"""Checkpoint files: reading every supported format into a state dict, remapping foreign keys,
naming the architecture of a state dict, and writing safetensors.

Formats read by [`read_checkpoint`][i2e_train.models.checkpoint.read_checkpoint]:

* official ``*.pth.tar`` files: ``{'epoch', 'state_dict', 'best_acc1'}``, saved from a
  ``DataParallel`` wrapper (keys start with ``module.``); models trained with the converter
  inside also carry ``module.i2e.weight`` [8, 1, 3, 3], the kernels of the last forward (not a
  learned weight: dropped by `remap_state_dict`);
* Lightning ``.ckpt`` files of our own runs: ``state_dict`` keys start with ``model.`` (the
  ``SNNClassifier`` keeps the network as ``self.model``); other entries of the LightningModule
  (loss, converter, metrics) are ignored and reported;
* ``.safetensors`` files (see [`export_safetensors`][i2e_train.models.checkpoint.export_safetensors]);
* raw state dicts (``.pt`` / ``.pth``), optionally ``module.`` / ``_orig_mod.`` prefixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from i2e_train.files import atomic_write_bytes
from i2e_train.models.errors import CheckpointDamagedError, CheckpointFormatError
from i2e_train.models.released import RELEASED_WEIGHTS
from i2e_train.schema import StoredConfigError, check_stored_config

__all__ = ["Checkpoint", "read_checkpoint", "load_torch_file", "remap_state_dict", "infer_architecture", "describe_architecture",
           "export_safetensors", "state_digest"]


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    format: str
    epoch: Optional[int] = None
    best_acc1: Optional[float] = None
    metadata: dict[str, str] = field(default_factory=dict)


def _as_number(value: Any, kind: type) -> Any:
    if value is None:
        return None
    try:
        if isinstance(value, torch.Tensor):
            value = value.item()
        return kind(value)
    except (TypeError, ValueError):
        return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _safe_globals() -> list:
    """The only non-tensor globals a checkpoint may name: numpy scalars and their dtypes (an
    official ``best_acc1`` may be one). Rebuilding them makes a number, never calls code."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)
    return [scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]


_CONVERT = (
    "If you trust the file, convert it once where running its code is acceptable: "
    "`sd = torch.load(path, weights_only=False)['state_dict']` (or the model's state_dict()), then "
    "`safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'weights.safetensors')` "
    "or `torch.save(sd, 'weights.pth')`, and pass the new file"
)


def load_torch_file(path: Union[str, os.PathLike], map_location: Any = "cpu", trusted_config: Any = None) -> Any:
    """The object a torch file holds, read as [`read_checkpoint`][i2e_train.models.checkpoint.read_checkpoint]
    reads it (``weights_only=True`` plus numpy scalars; nothing in the file runs; ``trusted_config``
    as there). `CheckpointFormatError` names the file when it is missing, not a checkpoint,
    truncated or refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint {path} does not exist or is not a file")
    return _torch_load(path, map_location, trusted_config)


def _torch_load(path: Path, map_location: Any, trusted_config: Any = None) -> Any:
    """``torch.load(weights_only=True)``, always: tensors, plain containers and numpy scalars only
    (the safe globals are allowed for this call alone, `torch.serialization.safe_globals`).
    A file that names any other Python object is refused, never unpickled: unpickling can run code.
    Corrupt or truncated files are named with the reason (without torch's advice to unpickle). The
    run config an ``i2e-train`` checkpoint stores (``i2e_config``) must pass
    `check_stored_config` (``trusted_config``: the config of the run
    reading it), or the file is refused naming the key."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names a global outside its allow-list ("Unsupported global: GLOBAL x") and one of a
        # module it blocks outright ("unsupported GLOBAL posix.system whose module posix is blocked")
        found = re.search(r"unsupported global(?::\s*GLOBAL)?\s+([\w.]+)", str(exc), re.I)
        if found or "unsupported global" in str(exc).lower():
            what = f"'{found.group(1)}'" if found else "an object that is not a tensor"
            raise CheckpointFormatError(
                f"{path}: refused: it holds the Python object {what}, not only tensors and numbers, and "
                f"loading it would run code stored in the file. {_CONVERT}."
            ) from exc
        operand = re.search(r"Unsupported operand (\d+)", str(exc))
        reason = (f"pickle opcode {operand.group(1)} is not one a torch checkpoint uses: a text file, another "
                  "format, or a pickle of arbitrary objects (refused, never run)") if operand else _reason(exc)
        error = CheckpointDamagedError if operand is None else CheckpointFormatError
        raise error(f"{path}: not a readable torch checkpoint ({reason}); {_REFETCH}") from exc
    except Exception as exc:
        raise CheckpointDamagedError(f"{path}: not a readable torch checkpoint ({_reason(exc)}); {_REFETCH}") from exc
    if isinstance(obj, Mapping) and "i2e_config" in obj:  # the run config i2e-train stores: data, checked
        try:
            check_stored_config(obj["i2e_config"], str(path), trusted=trusted_config)
        except StoredConfigError as exc:
            raise CheckpointFormatError(str(exc)) from None
    return obj


_REFETCH = "the file is truncated, corrupt or not a checkpoint: copy or download it again"


def _reason(exc: BaseException) -> str:
    """The first sentence of a loading error, without torch's advice to unpickle the file."""
    text = str(exc).strip().split("\n")[0]
    text = text.split(". ")[0] if ". " in text else text
    if not text or isinstance(exc, KeyError):
        text = {EOFError: "the file ends early", KeyError: "not a zip archive nor a pickle"}.get(type(exc), text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_checkpoint(
    path: Union[str, os.PathLike],
    map_location: Any = "cpu",
    trusted_config: Any = None,
) -> Checkpoint:
    """Read a checkpoint file into its state dict plus epoch / best_acc1 / metadata.

    Nothing in the file is run: torch files are read with ``weights_only=True`` (a file that needs
    more is refused, `CheckpointFormatError` says how to convert it), safetensors hold
    tensors only. The run config an ``i2e-train`` checkpoint stores is checked against our config
    groups (`check_stored_config`); ``trusted_config`` is the config of the
    run reading the file, whose own additions (``+callbacks.x=...``) it may hold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (released weights are named like "
            f"'released:cifar10_baseline'; known: {', '.join(RELEASED_WEIGHTS)})"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            sd = load_file(str(path), device=device)
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as exc:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        return Checkpoint(
            sd, "safetensors", _as_number(meta.get("epoch"), int), _as_number(meta.get("best_acc1"), float), meta
        )

    obj = _torch_load(path, map_location, trusted_config)
    if isinstance(obj, nn.Module):
        return Checkpoint(dict(obj.state_dict()), "module")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd = dict(obj["state_dict"])
        lightning = "pytorch-lightning_version" in obj or path.suffix == ".ckpt"
        return Checkpoint(
            sd,
            "lightning" if lightning else "official",
            _as_number(obj.get("epoch"), int),
            _as_number(obj.get("best_acc1"), float),
        )
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        return Checkpoint(dict(obj["model"]), "wrapped", _as_number(obj.get("epoch"), int))
    if _is_state_dict(obj):
        return Checkpoint(dict(obj), "state_dict")
    top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointFormatError(
        f"{path}: no state dict found; expected a dict with 'state_dict', a Lightning checkpoint or a "
        f"mapping of tensors, got {top}"
    )


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def remap_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_keys: Optional[set[str]] = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map foreign keys onto the bare network's keys; returns ``(state_dict, ignored_keys)``.

    * ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are removed;
    * when keys carry the ``model.`` prefix of our LightningModule (and the network itself has
      no ``model.`` keys), those keys are kept without it and every other key is ignored;
    * ``i2e.*`` (kernels of the converter's last forward in official files) is ignored.

    Ignored keys are returned with their original names.
    """
    model_keys = model_keys or set()
    items = [(k, _strip_wrappers(k), v) for k, v in state_dict.items()]
    lightning = any(s.startswith("model.") for _, s, _ in items) and not any(
        m.startswith("model.") for m in model_keys
    )
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for original, key, value in items:
        if lightning:
            if not key.startswith("model."):
                ignored.append(original)
                continue
            key = _strip_wrappers(key[len("model.") :])
        if key.split(".", 1)[0] == "i2e" and key not in model_keys:
            ignored.append(original)
            continue
        if key in out:
            raise CheckpointFormatError(f"two checkpoint keys map to {key!r} after removing wrapper prefixes")
        out[key] = value
    return out, ignored


_STD_WIDTHS = (64, 128, 256, 512)
# (block, layers, widths) -> registered name, to name the architecture of a foreign checkpoint
_KNOWN_ARCHS = {
    ("BasicBlock", (2, 2, 2, 2), _STD_WIDTHS): "ms_resnet18",
    ("BasicBlock", (3, 4, 6, 3), _STD_WIDTHS): "ms_resnet34",
    ("Bottleneck", (3, 4, 6, 3), _STD_WIDTHS): "ms_resnet50",
    ("Bottleneck", (3, 4, 23, 3), _STD_WIDTHS): "ms_resnet101",
    ("Bottleneck", (3, 8, 36, 3), _STD_WIDTHS): "ms_resnet152",
    ("BasicBlock", (1, 1, 1, 1), (16, 32, 64, 128)): "ms_resnet_tiny",
}


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Guess block type, depths, widths, input channels and classes of an MS-ResNet state dict."""
    info: dict[str, Any] = {}
    block_ids = {}
    for key in state_dict:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            stage, idx = int(m.group(1)), int(m.group(2))
            block_ids[stage] = max(block_ids.get(stage, -1), idx)
    if block_ids:
        info["block"] = "Bottleneck" if any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in state_dict) else "BasicBlock"
        info["layers"] = tuple(block_ids.get(s, -1) + 1 for s in range(1, 5))
        widths = tuple(
            int(state_dict[f"layer{s}.0.conv1.weight"].shape[0]) if f"layer{s}.0.conv1.weight" in state_dict else None
            for s in range(1, 5)
        )
        info["widths"] = widths
        arch = _KNOWN_ARCHS.get((info["block"], info["layers"], widths))
        if arch:
            info["architecture"] = arch
    if "conv1.weight" in state_dict:
        info["in_channels"] = int(state_dict["conv1.weight"].shape[1])
    if "fc.weight" in state_dict:
        info["num_classes"] = int(state_dict["fc.weight"].shape[0])
    return info


def describe_architecture(info: Mapping[str, Any]) -> str:
    parts = []
    if "architecture" in info:
        parts.append(info["architecture"])
    if "block" in info:
        parts.append(f"{info['block']} layers {list(info['layers'])} widths {list(info['widths'])}")
    if "in_channels" in info:
        parts.append(f"{info['in_channels']} input channels")
    if "num_classes" in info:
        parts.append(f"{info['num_classes']} classes")
    return ", ".join(parts) or "unknown layout"


def export_safetensors(
    model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``model.state_dict()`` to a ``.safetensors`` file (CPU, contiguous tensors).

    ``metadata`` values are stored as strings (mappings and lists as JSON); the model's
    ``model_info`` architecture and class count are added when present. The file is written
    next to its destination and moved into place, so an existing file is never half-written.
    Read it back with [`load_checkpoint`][i2e_train.models.loading.load_checkpoint].
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta: dict[str, str] = {"format": "pt"}
    info = getattr(model, "model_info", None)
    if isinstance(info, Mapping):
        for k in ("architecture", "num_classes", "in_channels"):
            if k in info:
                meta[k] = str(info[k])
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (Mapping, list, tuple)) else str(v)
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes and bytes of a state dict's tensors (order independent):
    proves which weights a run started from."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(str(v.dtype).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
