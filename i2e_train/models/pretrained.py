"""Released I2E weights and checkpoint loading (key remapping, strict checks, head replacement).

Sources understood by :func:`load_checkpoint`:

* official ``*.pth.tar`` files: ``{'epoch', 'state_dict', 'best_acc1'}``, saved from a
  ``DataParallel`` wrapper (keys start with ``module.``); models trained with the converter
  inside also carry ``module.i2e.weight`` [8, 1, 3, 3], the kernels of the last forward (not a
  learned weight: dropped);
* Lightning ``.ckpt`` files of our own runs: ``state_dict`` keys start with ``model.`` (the
  ``SNNClassifier`` keeps the network as ``self.model``); other entries of the LightningModule
  (loss, converter, metrics) are ignored and reported;
* ``.safetensors`` files (see :func:`export_safetensors`);
* raw state dicts (``.pt`` / ``.pth``), optionally ``module.`` / ``_orig_mod.`` prefixed;
* a released-weight name, ``'released:<name>'`` or the bare name (:data:`RELEASED_WEIGHTS`),
  found under ``cache_dir`` or downloaded from the Hugging Face repo ``Ruichen0424/I2E``.

After remapping, keys and shapes are checked strictly; a mismatch raises
:class:`CheckpointMismatchError` naming the file and every missing, unexpected and mis-shaped
key. ``replace_head=True`` loads the backbone and re-initialises only the classifier ``fc``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional, Union

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, list_repo_files
from torch import nn

from i2e_train.files import atomic_write_bytes
from i2e_train.naming import unknown_name

__all__ = [
    "HF_REPO_ID",
    "ReleasedWeight",
    "RELEASED_WEIGHTS",
    "LoadReport",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ReleasedWeightsUnavailable",
    "find_released",
    "resolve_released",
    "read_checkpoint",
    "remap_state_dict",
    "infer_architecture",
    "load_checkpoint",
    "replace_head",
    "export_safetensors",
]

HF_REPO_ID = "Ruichen0424/I2E"
RELEASED_PREFIX = "released:"
_SUFFIX = ".pth.tar"


# ---------------------------------------------------------------------------------------------
# released weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleasedWeight:
    """One released checkpoint of the I2E paper (MS-ResNet, T = 8).

    ``input_kind`` is ``'images'`` for models fed by the I2E converter (``ratio`` and ``order``
    are the converter settings) and ``'dvs'`` for models fed by CIFAR10-DVS frames (event
    counts; ``ratio`` and ``order`` are ``None``). ``top1`` is the paper's top-1 accuracy (%).
    """

    name: str
    model: str
    dataset: str
    method: str
    num_classes: int
    top1: float
    input_kind: str
    ratio: Optional[float]
    order: Optional[int]
    resolution: int
    timesteps: int = 8
    repo_id: str = HF_REPO_ID

    @property
    def filename(self) -> str:
        """File name in the Hugging Face repo, e.g. ``cifar10_baseline.pth.tar``."""
        return self.name + _SUFFIX

    @property
    def url(self) -> str:
        """Where to get the file by hand."""
        return f"https://huggingface.co/{self.repo_id}"


def _img(name: str, model: str, dataset: str, method: str, classes: int, top1: float) -> ReleasedWeight:
    imagenet = dataset == "I2E-ImageNet"
    return ReleasedWeight(
        name=name,
        model=model,
        dataset=dataset,
        method=method,
        num_classes=classes,
        top1=top1,
        input_kind="images",
        ratio=0.12 if imagenet else 0.07,
        order=4,
        resolution=224 if imagenet else 128,
    )


def _dvs(name: str, method: str, top1: float) -> ReleasedWeight:
    return ReleasedWeight(
        name=name,
        model="ms_resnet18",
        dataset="CIFAR10-DVS",
        method=method,
        num_classes=10,
        top1=top1,
        input_kind="dvs",
        ratio=None,
        order=None,
        resolution=128,
    )


# Paper Table (top-1, MS-ResNet, T = 8). Transfer-I on CIFAR10-DVS starts from I2E-ImageNet,
# Transfer-II from I2E-CIFAR10.
RELEASED_WEIGHTS: dict[str, ReleasedWeight] = {
    w.name: w
    for w in (
        _dvs("dvscifar10_baseline", "Baseline", 65.6),
        _dvs("dvscifar10_transferI", "Transfer-I", 83.1),
        _dvs("dvscifar10_transferII", "Transfer-II", 92.5),
        _img("cifar10_baseline", "ms_resnet18", "I2E-CIFAR10", "Baseline-I", 10, 85.07),
        _img("cifar10_augmentation", "ms_resnet18", "I2E-CIFAR10", "Baseline-II", 10, 89.23),
        _img("cifar10_transfer", "ms_resnet18", "I2E-CIFAR10", "Transfer-I", 10, 90.86),
        _img("cifar100_baseline", "ms_resnet18", "I2E-CIFAR100", "Baseline-I", 100, 51.32),
        _img("cifar100_augmentation", "ms_resnet18", "I2E-CIFAR100", "Baseline-II", 100, 60.68),
        _img("cifar100_transfer", "ms_resnet18", "I2E-CIFAR100", "Transfer-I", 100, 64.53),
        _img("imagenet_baseline_18", "ms_resnet18", "I2E-ImageNet", "Baseline-I", 1000, 48.30),
        _img("imagenet_augmentation_18", "ms_resnet18", "I2E-ImageNet", "Baseline-II", 1000, 57.97),
        _img("imagenet_finetune_18", "ms_resnet18", "I2E-ImageNet", "Transfer-I", 1000, 59.28),
        _img("imagenet_augmentation_34", "ms_resnet34", "I2E-ImageNet", "Baseline-II", 1000, 60.50),
    )
}


class CheckpointError(RuntimeError):
    """Base class of the errors raised while locating or reading weights."""


class CheckpointFormatError(CheckpointError, ValueError):
    """The file could not be read or holds no recognisable state dict."""


class ReleasedWeightsUnavailable(CheckpointError, FileNotFoundError):
    """A released weight is neither in the cache folder nor downloadable right now."""


def _released_key(name: str) -> str:
    name = name.strip()
    if name.startswith(RELEASED_PREFIX):
        name = name[len(RELEASED_PREFIX) :]
    name = PurePosixPath(name).name
    if name.endswith(_SUFFIX):
        name = name[: -len(_SUFFIX)]
    return name


def _unknown_released(name: str) -> ValueError:
    return unknown_name("released weight", name, RELEASED_WEIGHTS, key=_released_key(name), listed="Released")


def find_released(source: Union[str, os.PathLike]) -> Optional[ReleasedWeight]:
    """The :class:`ReleasedWeight` a source names, or ``None`` when it is a path.

    ``'released:<name>'`` must name a released weight (``ValueError`` otherwise); a bare name
    (``'cifar10_baseline'`` or ``'cifar10_baseline.pth.tar'``) counts only when no file of
    that name exists.
    """
    s = os.fspath(source)
    if s.startswith(RELEASED_PREFIX):
        key = _released_key(s)
        if key not in RELEASED_WEIGHTS:
            raise _unknown_released(s)
        return RELEASED_WEIGHTS[key]
    if os.path.exists(s) or os.sep in s or "/" in s:
        return None
    return RELEASED_WEIGHTS.get(_released_key(s))


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the hub library itself reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def resolve_released(
    name: str,
    cache_dir: Union[str, os.PathLike] = "checkpoints",
    repo_id: str = HF_REPO_ID,
    revision: Optional[str] = None,
) -> Path:
    """Local path of a released weight, downloading it when needed.

    1. ``cache_dir`` is searched recursively for the file name (``cifar10_baseline.pth.tar``);
    2. otherwise the repo's file list is read (the folder inside the repo is not documented),
       the entry whose base name equals the file name is downloaded into ``cache_dir``
       (the repo's sub-folders are kept) and its path returned.

    Raises:
        ValueError: ``name`` is not in :data:`RELEASED_WEIGHTS`.
        ReleasedWeightsUnavailable: not cached and the hub is offline, unreachable or does not
            list the file; the message says where to put a manual download.
    """
    key = _released_key(name)
    if key not in RELEASED_WEIGHTS:
        raise _unknown_released(name)
    filename = RELEASED_WEIGHTS[key].filename
    cache = Path(cache_dir)
    if cache.is_dir():
        hits = sorted((p for p in cache.rglob(filename) if p.is_file()), key=lambda p: (len(p.parts), str(p)))
        if hits:
            return hits[0]

    manual = (
        f"Download {filename} from https://huggingface.co/{repo_id} and place it at {cache / filename} "
        f"(any sub-folder of {cache} works)."
    )
    if _hub_offline():
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r} ({filename}) is not under {cache}/ and HF_HUB_OFFLINE is set, "
            f"so it cannot be downloaded. {manual}"
        )
    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # connection errors, offline mode, auth, missing repo ...
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r} ({filename}) is not under {cache}/ and the file list of the "
            f"Hugging Face repo {repo_id} could not be read ({type(exc).__name__}: {exc}). {manual}"
        ) from exc
    matches = sorted((f for f in files if PurePosixPath(f).name == filename), key=lambda f: (f.count("/"), f))
    if not matches:
        shown = ", ".join(sorted(files)[:20]) + (" ..." if len(files) > 20 else "")
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r}: no file named {filename} in the Hugging Face repo {repo_id} "
            f"(it lists: {shown or 'nothing'}). {manual}"
        )
    try:
        local = hf_hub_download(repo_id, filename=matches[0], revision=revision, local_dir=str(cache))
    except Exception as exc:
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r}: downloading {matches[0]} from the Hugging Face repo {repo_id} "
            f"into {cache}/ failed ({type(exc).__name__}: {exc}). {manual}"
        ) from exc
    return Path(local)


# ---------------------------------------------------------------------------------------------
# reading and remapping
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

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


@dataclass
class _Checkpoint:
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


def _torch_load(path: Path, map_location: Any, weights_only: Optional[bool], trusted: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` first. With ``weights_only=None``, files that
    need more (arbitrary pickled objects) are fully unpickled only when they are Lightning
    ``.ckpt`` files (our own runs, whose hyper-parameters may be any object) or ``trusted``
    (released weights of the table, as the official inference code loads them)."""
    safe_first = True if weights_only is None else weights_only
    try:
        return torch.load(path, map_location=map_location, weights_only=safe_first)
    except pickle.UnpicklingError as exc:
        if weights_only is None and (trusted or path.suffix == ".ckpt"):
            return torch.load(path, map_location=map_location, weights_only=False)
        raise CheckpointFormatError(
            f"{path}: cannot be unpickled with weights_only=True ({exc}). "
            "If you trust this file, pass weights_only=False."
        ) from exc
    except Exception as exc:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def read_checkpoint(
    path: Union[str, os.PathLike],
    map_location: Any = "cpu",
    weights_only: Optional[bool] = None,
    trusted: bool = False,
) -> _Checkpoint:
    """Read a checkpoint file into its state dict plus epoch / best_acc1 / metadata.

    ``weights_only`` / ``trusted``: see :func:`load_checkpoint`.
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
        return _Checkpoint(
            sd, "safetensors", _as_number(meta.get("epoch"), int), _as_number(meta.get("best_acc1"), float), meta
        )

    obj = _torch_load(path, map_location, weights_only, trusted)
    if isinstance(obj, nn.Module):
        return _Checkpoint(dict(obj.state_dict()), "module")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd = dict(obj["state_dict"])
        lightning = "pytorch-lightning_version" in obj or path.suffix == ".ckpt"
        return _Checkpoint(
            sd,
            "lightning" if lightning else "official",
            _as_number(obj.get("epoch"), int),
            _as_number(obj.get("best_acc1"), float),
        )
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        return _Checkpoint(dict(obj["model"]), "wrapped", _as_number(obj.get("epoch"), int))
    if _is_state_dict(obj):
        return _Checkpoint(dict(obj), "state_dict")
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


def _describe_arch(info: Mapping[str, Any]) -> str:
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


# ---------------------------------------------------------------------------------------------
# strict check and loading
# ---------------------------------------------------------------------------------------------

_MAX_LISTED = 25


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's keys or shapes do not match the model (after remapping).

    Attributes: ``source``, ``missing`` (model keys absent from the checkpoint), ``unexpected``
    (checkpoint keys the model lacks), ``mismatched`` (``(key, checkpoint shape, model shape)``)
    and ``checkpoint_info`` (:func:`infer_architecture` of the checkpoint).
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
        lines.append(f"  the checkpoint looks like: {_describe_arch(self.checkpoint_info)}")
        bad = set(missing) | set(unexpected) | {k for k, _, _ in mismatched}
        if bad and all(k.startswith(head_name + ".") for k in bad):
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


def _resolve_source(
    source: Union[str, os.PathLike], cache_dir: Union[str, os.PathLike]
) -> tuple[Path, Optional[ReleasedWeight]]:
    released = find_released(source)
    if released is not None:
        return resolve_released(released.name, cache_dir=cache_dir, repo_id=released.repo_id), released
    return Path(source), None


def load_checkpoint(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    replace_head: bool = False,
    strict: bool = True,
    map_location: Any = "cpu",
    cache_dir: Union[str, os.PathLike] = "checkpoints",
    weights_only: Optional[bool] = None,
) -> LoadReport:
    """Load weights into ``model`` after remapping foreign keys; strict by default.

    Args:
        model: the network (e.g. from :func:`i2e_train.models.create_model`).
        source: a checkpoint path (official ``.pth.tar``, Lightning ``.ckpt``, ``.safetensors``,
            raw state dict), a released-weight name (``'released:<name>'`` or the bare name),
            or an in-memory state dict.
        replace_head: ignore the checkpoint's classifier ``fc`` and re-initialise the model's
            (its class count is the model's); every other tensor is loaded exactly.
        strict: raise :class:`CheckpointMismatchError` on any missing, unexpected or
            mis-shaped key. With ``strict=False`` the matching tensors are loaded and the rest
            is reported.
        map_location: passed to ``torch.load`` (device for safetensors).
        cache_dir: where released weights are looked for / downloaded to.
        weights_only: ``torch.load`` safety. ``None`` (default) loads with
            ``weights_only=True`` and falls back to full unpickling only for Lightning ``.ckpt``
            files (our own runs) and for released weights named through the table; any other
            file that needs it raises :class:`CheckpointFormatError` unless
            ``weights_only=False`` is passed.

    Returns:
        a :class:`LoadReport`.
    """
    released = None
    if isinstance(source, Mapping):
        ckpt = _Checkpoint(dict(source), "state_dict")
        label = "<in-memory state dict>"
    else:
        path, released = _resolve_source(source, cache_dir)
        ckpt = read_checkpoint(path, map_location=map_location, weights_only=weights_only, trusted=released is not None)
        label = str(path)

    model_sd = model.state_dict()
    sd, ignored = remap_state_dict(ckpt.state_dict, set(model_sd))
    head = _head_name(model)
    is_head = lambda k: k.startswith(head + ".")  # noqa: E731
    if replace_head:
        ignored += [k for k in sd if is_head(k)]
        sd = {k: v for k, v in sd.items() if not is_head(k)}

    missing = [k for k in model_sd if k not in sd and not (replace_head and is_head(k))]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [
        (k, tuple(sd[k].shape), tuple(model_sd[k].shape))
        for k in sd
        if k in model_sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)
    ]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointMismatchError(label, missing, unexpected, mismatched, model_sd, sd, _model_desc(model), head)

    bad = set(unexpected) | {k for k, _, _ in mismatched}
    to_load = {k: v for k, v in sd.items() if k not in bad}
    result = model.load_state_dict(to_load, strict=False)
    leftover = [k for k in result.missing_keys if not (replace_head and is_head(k))]
    expected_leftover = missing + [k for k, _, _ in mismatched]
    if sorted(leftover) != sorted(expected_leftover) or result.unexpected_keys:  # pragma: no cover - defensive
        raise CheckpointError(f"{label}: load_state_dict disagreed with the key check ({result})")
    if replace_head:
        model.get_submodule(head).reset_parameters()

    return LoadReport(
        source=label,
        format=ckpt.format,
        loaded_keys=len(to_load),
        ignored_keys=ignored,
        missing_keys=missing,
        unexpected_keys=unexpected,
        mismatched_keys=mismatched,
        head_replaced=replace_head,
        epoch=ckpt.epoch,
        best_acc1=ckpt.best_acc1,
        released=released,
        metadata=ckpt.metadata,
    )


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_safetensors(
    model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``model.state_dict()`` to a ``.safetensors`` file (CPU, contiguous tensors).

    ``metadata`` values are stored as strings (mappings and lists as JSON); the model's
    ``model_info`` architecture and class count are added when present. The file is written
    next to its destination and moved into place, so an existing file is never half-written.
    Read it back with :func:`load_checkpoint`.
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
