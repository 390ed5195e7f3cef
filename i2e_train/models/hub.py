"""Getting a released weight's file: the local cache folder first, else the Hugging Face hub."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, list_repo_files

from i2e_train.files import atomic_write_json
from i2e_train.models.errors import ReleasedWeightsUnavailable
from i2e_train.models.released import HF_REPO_ID, get_released

__all__ = ["resolve_released"]


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the hub library itself reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


_INDEX = "released.json"  # in the cache folder: what was downloaded there, with its size and SHA-256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_index(cache: Path) -> dict:
    try:
        data = json.loads((cache / _INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _verified(cache: Path, entry: dict, key: str) -> Optional[Path]:
    """The file an index entry names, after checking its size and SHA-256 against the download."""
    rel = PurePosixPath(str(entry.get("path", "")))
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        return None
    path = cache / rel
    if not path.is_file():
        return None
    size, digest = path.stat().st_size, entry.get("sha256")
    if size != entry.get("size") or (digest and _sha256(path) != digest):
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r}: {path} changed since it was downloaded (size or SHA-256 differs from "
            f"{cache / _INDEX}); delete it and run again to download it afresh"
        )
    return path


def _cached(cache: Path, key: str, filenames: tuple[str, ...]) -> Optional[Path]:
    """A cached copy: one of the exact names directly in ``cache`` (a manual download), or the file
    a download recorded in the index (checked by size and hash). Nothing else is searched."""
    for name in filenames:
        if (cache / name).is_file():
            return cache / name
    entry = _read_index(cache).get(key)
    return _verified(cache, entry, key) if isinstance(entry, dict) else None


def _record(cache: Path, key: str, path: Path, repo_file: str) -> None:
    index = _read_index(cache)
    index[key] = {"path": path.resolve().relative_to(cache.resolve()).as_posix(), "repo_file": repo_file,
                  "size": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_json(cache / _INDEX, index)


def resolve_released(
    name: str,
    cache_dir: Union[str, os.PathLike] = "checkpoints",
    repo_id: str = HF_REPO_ID,
    revision: Optional[str] = None,
) -> Path:
    """Local path of a released weight, downloading it when needed.

    1. ``cache_dir/<name><ext>`` for each extension the hub may use (``.pth.tar``, ``.pth``,
       ``.pt``, ``.safetensors``), or the file an earlier download recorded in
       ``cache_dir/released.json`` (its size and SHA-256 are checked). No other file is looked at;
    2. otherwise the repo's file list is read (the folder inside the repo is not documented),
       the entry whose base name is one of those names is downloaded into ``cache_dir``
       (the repo's sub-folders are kept), recorded in the index and its path returned.

    Raises:
        ValueError: ``name`` is not in `RELEASED_WEIGHTS`.
        ReleasedWeightsUnavailable: not cached and the hub is offline, unreachable or does not
            list the file; or the downloaded file changed since. The message says what to do.
    """
    weight = get_released(name)
    key, filename, names = weight.name, weight.filename, weight.filenames
    cache = Path(cache_dir)
    if cache.is_dir():
        hit = _cached(cache, key, names)
        if hit is not None:
            return hit

    manual = (
        f"Download {filename} (or {key}.pth / {key}.safetensors) from https://huggingface.co/{repo_id} and "
        f"place it at {cache / filename}."
    )
    if _hub_offline():
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r} ({filename}) is not in {cache}/ and HF_HUB_OFFLINE is set, "
            f"so it cannot be downloaded. {manual}"
        )
    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # connection errors, offline mode, auth, missing repo ...
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r} ({filename}) is not in {cache}/ and the file list of the "
            f"Hugging Face repo {repo_id} could not be read ({type(exc).__name__}: {exc}). {manual}"
        ) from exc
    rank = {n: i for i, n in enumerate(names)}
    matches = sorted((f for f in files if PurePosixPath(f).name in rank),
                     key=lambda f: (rank[PurePosixPath(f).name], f.count("/"), f))
    if not matches:
        shown = ", ".join(sorted(files)[:20]) + (" ..." if len(files) > 20 else "")
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r}: no file named {' / '.join(names)} in the Hugging Face repo {repo_id} "
            f"(it lists: {shown or 'nothing'}). {manual}"
        )
    try:
        local = Path(hf_hub_download(repo_id, filename=matches[0], revision=revision, local_dir=str(cache)))
    except Exception as exc:
        raise ReleasedWeightsUnavailable(
            f"released weight {key!r}: downloading {matches[0]} from the Hugging Face repo {repo_id} "
            f"into {cache}/ failed ({type(exc).__name__}: {exc}). {manual}"
        ) from exc
    _record(cache, key, local, matches[0])
    return local
