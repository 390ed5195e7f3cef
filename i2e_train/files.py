"""Files that are either complete or absent: every write of the package goes through here.

A file is written to a temporary name in its own folder (``.<name>.tmp-<host>-<pid>``), flushed
and renamed over the target (``os.replace``, atomic on one filesystem), so a process killed while
writing leaves the previous good file, or nothing, never a half-written one. A temporary file is
only ever removed by its owner, or by the next write of the same target when it is provably
dead: written on this host by a process that no longer exists. Another live writer's file (a
second process, another host on a shared filesystem) is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "temporary_name",
           "remove_stale_temporaries"]


def _host() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temporary_name(path: str | os.PathLike) -> Path:
    """The temporary file this process writes ``path`` through (same folder, hidden; names host and pid)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` whose writer is provably dead: written on this host
    by a process that no longer exists. Files of live writers and of other hosts are kept."""
    path = Path(path)
    prefix, host = f".{path.name}.tmp-", _host()
    stale = []
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        m = re.fullmatch(r"(.+)-(\d+)", p.name[len(prefix):])
        if m and m.group(1) == host and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unnamed_os_error(exc: BaseException) -> OSError | None:
    """The OSError without a file name behind ``exc``: ``exc`` itself, or the one a writer wrapped
    (``torch.save`` turns a failed ``write()`` into ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``, keeping the OSError as its context)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc if exc.filename is None and exc.errno is not None else None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], durable: bool = False) -> Path:
    """Call ``write(binary file)`` on a temporary file, then rename it over ``path``.

    ``durable``: fsync the file and its folder (checkpoints), so the rename survives a power cut.
    The folder is created when missing. On any error the temporary file is removed and the
    error raised; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failed = _unnamed_os_error(exc)
        if failed is not None:  # a failed write() names no file (disk full, quota, I/O error): name it
            full = failed.errno in (errno.ENOSPC, errno.EDQUOT)
            what = f"disk full: {failed.strerror}" if full else failed.strerror or str(failed)
            fix = "free space there or point the output elsewhere" if full else "check the device and retry"
            raise OSError(failed.errno, f"{what} while writing {path}; {path} is unchanged: {fix}",
                          str(path)) from exc  # fmt: skip
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), durable)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 2, durable: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n", durable)
