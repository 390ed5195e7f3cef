"""Run folders: one per run, never shared, never silently overwritten.

Default run folders are unique (``configs/hydra/default.yaml``: date, time to the microsecond
and the process id). A folder chosen by hand (``hydra.run.dir=...``) that already holds a run
(a checkpoint, ``metrics.json``, or the ``RUNNING`` marker of a live process) is refused unless
the run is resumed (``ckpt_path=last``) or ``overwrite=true`` is given. ``ckpt_path=last``
needs the folder and its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from i2e_train.files import atomic_write_json

__all__ = ["RunFolderError", "MARKER", "check_run_folder", "mark_running", "unmark_running", "holds_run",
           "primary_process"]

MARKER = "RUNNING"  # JSON {pid, host}: written at the start of a run, removed at its end


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (it holds another run, or there is nothing to resume)."""


def primary_process() -> bool:
    """False in the processes a DDP launcher (Lightning, torchrun, SLURM, MPI) started for ranks > 0:
    they share rank 0's folder, which rank 0 checks and marks."""
    ranks = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    return all(os.environ.get(v, "0") in ("", "0") for v in ranks)


def _live_marker(folder: Path) -> str | None:
    """``'pid N on host H'`` when the folder's marker names a process that may still be running."""
    try:
        info = json.loads((folder / MARKER).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname():
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return f"pid {pid} on host {host}"


def holds_run(folder: Path) -> str | None:
    """What makes ``folder`` a run of its own (``None`` when it holds none)."""
    folder = Path(folder)
    live = _live_marker(folder)
    if live:
        return f"a running run ({live})"
    ckpts = sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt"))
    if ckpts:
        return f"checkpoints ({', '.join(ckpts[:3])}{' ...' if len(ckpts) > 3 else ''})"
    if (folder / "metrics.json").is_file():
        return "a finished run (metrics.json)"
    return None


def check_run_folder(folder: str | os.PathLike, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse a folder holding another run (unless resuming or ``overwrite``), and ``ckpt_path=last``
    without a run to resume."""
    folder = Path(folder)
    if ckpt_path == "last":
        last = folder / "checkpoints" / "last.ckpt"
        if not folder.is_dir():
            raise RunFolderError(f"ckpt_path=last: the run folder {folder} does not exist; pass the folder of the "
                                 "run to resume as hydra.run.dir=<logs/train/runs/...>")
        if not last.is_file():
            raise RunFolderError(f"ckpt_path=last: {last} does not exist, so there is nothing to resume in {folder}; "
                                 "start a new run without ckpt_path=last (add overwrite=true to reuse this folder)")
        live = _live_marker(folder)
        if live:
            raise RunFolderError(f"{folder} is being written by a running run ({live}); wait for it to end")
        return
    found = holds_run(folder)
    if found and not overwrite:
        raise RunFolderError(
            f"the run folder {folder} already holds {found}; refusing to overwrite it. Resume it with "
            "ckpt_path=last, pick a new folder (leave hydra.run.dir out), or pass overwrite=true to replace it")
    if found and "running run" in found:
        raise RunFolderError(f"{folder} is being written by {found}; overwrite=true does not stop a live run")


def mark_running(folder: str | os.PathLike) -> Path:
    return atomic_write_json(Path(folder) / MARKER, {"pid": os.getpid(), "host": socket.gethostname()})


def unmark_running(folder: str | os.PathLike) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)
