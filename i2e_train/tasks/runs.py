"""Run folders: one per run, never shared, never silently overwritten.

Default run folders are unique (``configs/hydra/default.yaml``: date, time to the microsecond
and the process id). A folder chosen by hand (``hydra.run.dir=...``) that already holds a run
(a checkpoint, ``metrics.json``, or the ``RUNNING`` marker of a live process) is refused unless
the run is resumed (``ckpt_path=last``, or a checkpoint in its own ``checkpoints/``) or
``overwrite=true`` is given; a folder a live run is writing is refused whatever is asked.
``ckpt_path=last`` needs the folder and its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from i2e_train.files import atomic_write_json

__all__ = ["RunFolderError", "MARKER", "check_run_folder", "resumes_in_place", "mark_running", "unmark_running", "holds_run",
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


def resumes_in_place(folder: str | os.PathLike, ckpt_path: str | None) -> bool:
    """Whether ``ckpt_path`` resumes the run of ``folder`` itself: ``last``, or a checkpoint in its
    ``checkpoints/`` (an ``epoch*.ckpt`` when ``last.ckpt`` is damaged)."""
    if not ckpt_path:
        return False
    if ckpt_path == "last":
        return True
    own = (Path(folder) / "checkpoints").resolve()
    return Path(str(ckpt_path)).resolve().parent == own


def check_run_folder(folder: str | os.PathLike, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse a folder a live run is writing (whatever is asked), a folder holding another run
    (unless resuming it or ``overwrite``), and ``ckpt_path=last`` without a run to resume."""
    folder = Path(folder)
    live = _live_marker(folder)
    if live:
        raise RunFolderError(
            f"{folder} is being written by a running run ({live}): neither resuming it nor overwrite=true can "
            "be used while it runs. Wait for it to end, or leave hydra.run.dir out to start this run in a new "
            "folder")
    if ckpt_path == "last":
        last = folder / "checkpoints" / "last.ckpt"
        if not folder.is_dir():
            raise RunFolderError(f"ckpt_path=last: the run folder {folder} does not exist; pass the folder of the "
                                 "run to resume as hydra.run.dir=<logs/train/runs/...>")
        if not last.is_file():
            raise RunFolderError(f"ckpt_path=last: {last} does not exist, so there is nothing to resume in {folder}; "
                                 "start a new run without ckpt_path=last (add overwrite=true to reuse this folder)")
        return
    if resumes_in_place(folder, ckpt_path):
        return
    found = holds_run(folder)
    if found and not overwrite:
        raise RunFolderError(
            f"the run folder {folder} already holds {found}; refusing to overwrite it. Resume it with "
            "ckpt_path=last, pick a new folder (leave hydra.run.dir out), or pass overwrite=true to replace it")


def mark_running(folder: str | os.PathLike) -> Path:
    return atomic_write_json(Path(folder) / MARKER, {"pid": os.getpid(), "host": socket.gethostname()})


def unmark_running(folder: str | os.PathLike) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)
