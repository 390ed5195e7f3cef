"""Files that are either complete or absent: every write of the package goes through here.

A file is written to a temporary name in its own folder (``.<name>.tmp-<host>-<pid>``), flushed
and renamed over the target (``os.replace``, atomic on one filesystem), so a process killed while
writing leaves the previous good file, or nothing, never a half-written one. A temporary file is
only ever removed by its owner, or by the next write of the same target when it is provably
dead: written on this host by a process that no longer exists. Another live writer's file (a
second process, another host on a shared filesystem) is never touched.

`exclusive_lock` keeps a folder to one writer at a time: an advisory ``fcntl.flock`` on a
lock file that records its owner (host, pid, start time and what the caller adds), so a refused
second writer can name the running one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "temporary_name",
           "remove_stale_temporaries", "exclusive_lock", "LockHeld"]

log = logging.getLogger(__name__)


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


# =========================================================================== one writer per folder
class LockHeld(RuntimeError):
    """Another live process holds the lock ``path``; ``owner`` is its record ({} when unreadable)."""

    def __init__(self, path: Path, owner: dict, enforced: bool = True) -> None:
        self.path, self.owner, self.enforced = path, owner, enforced
        super().__init__(f"{path} is held by {describe_owner(owner)}")


def describe_owner(owner: dict) -> str:
    """"pid 123 on host h, started 2026-01-02T03:04:05+0100" from a lock record (any content:
    shown printable and short)."""
    if not owner.get("pid"):
        return "another process (its owner record is not written yet or unreadable)"

    def shown(value: Any) -> str:
        return re.sub(r"[^\x20-\x7e]", "?", str(value))[:80]

    return f"pid {shown(owner.get('pid'))} on host {shown(owner.get('host'))}, started {shown(owner.get('started'))}"


def _read_owner(fd: int) -> dict:
    """The record in a lock file: untrusted, only shown in messages (non-JSON or a non-object: {})."""
    try:
        data = json.loads(os.pread(fd, 1 << 20, 0).decode("utf-8") or "{}")
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _flock_or_record(fd: int, path: Path, blocking: bool) -> bool:
    """Take the flock on ``fd`` (False: a filesystem without flock; True: held). LockHeld when a
    live process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        raise LockHeld(path, _read_owner(fd)) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    owner = _read_owner(fd)  # no flock here (some network filesystems): judge by the record
    pid = owner.get("pid")
    alive = isinstance(pid, int) and pid > 0 and (owner.get("host") != socket.gethostname() or _pid_alive(pid))
    if alive and not blocking:
        raise LockHeld(path, owner, enforced=False)
    log.warning("%s: this filesystem does not support file locks (flock); only the owner record in the lock "
                "file keeps a second writer out", path)
    return False


@contextmanager
def exclusive_lock(path: str | os.PathLike, record: dict[str, Any] | None = None,
                   blocking: bool = False) -> Iterator[dict]:
    """Hold an exclusive advisory lock on ``path`` (created, never followed as a symlink) while
    the block runs; its content names the owner: host, pid, start time and ``record``.

    Raises `LockHeld` (naming the owner) when another live process holds it, unless
    ``blocking`` (then waits). Yields the record of an earlier owner that died holding it ({}
    when there was none): the kernel drops the flock of a dead process, and its file is left
    behind. On release the file is removed. Hand-written on ``fcntl.flock`` because the
    ``filelock`` package records no owner a refused process could name.
    """
    path = Path(path)
    while True:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o644)
        try:
            locked = _flock_or_record(fd, path, blocking)
            st = os.stat(path, follow_symlinks=False)  # released and removed meanwhile: lock the new file
            if (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        previous = _read_owner(fd)
        if previous:
            log.warning("%s: taking over the lock left by %s, which ended without releasing it", path,
                        describe_owner(previous))
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(record or {})}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine, indent=1).encode("utf-8"), 0)
        yield previous
    finally:
        try:
            os.unlink(path)  # still held: a process that opened it before now finds it gone and retries
        except FileNotFoundError:
            pass
        finally:
            if locked:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
