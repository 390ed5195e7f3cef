"""Getting a released weight's file: the local cache folder first, else the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, list_repo_files

from i2e_train.models.errors import ReleasedWeightsUnavailable
from i2e_train.models.released import HF_REPO_ID, get_released

__all__ = ["resolve_released"]


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
    weight = get_released(name)
    key, filename = weight.name, weight.filename
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
