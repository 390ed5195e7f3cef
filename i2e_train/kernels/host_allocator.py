"""A host (CPU) allocator for PyTorch whose resident memory follows the live tensors.

PyTorch's CPU allocator takes every tensor from ``posix_memalign(64, n)``. glibc serves it from
a larger free block and hands the spare ends back, so a freed n-byte block is too small for the
next request of the same size; and after the first large free glibc keeps big blocks in its heap
instead of unmapping them. A training step allocates and frees tensors of a few sizes over and
over: the heap grows instead of being reused, and the peak resident set of a CPU training step
ends at about twice its live tensors (``benchmarks/memory.py`` shows both).

:func:`install` makes ``host_allocator.cpp`` PyTorch's CPU allocator for the rest of the process
(``c10::SetCPUAllocator``): tensors of 4 MiB and more get mapped pages of their own, kept after
``free`` for the next request of their size class; a request that no kept block serves maps a new
block, first unmapping kept blocks (oldest first) as far as needed to keep the mapped total
within 1.25 times the highest live total so far. Resident memory is thus bounded by the live
peak, and a training step, which repeats the sizes of the step before, finds most blocks kept.
Smaller tensors come from ``malloc`` (exact-size reuse in glibc's bins). Every
tensor stays 64-byte aligned; values are untouched (an allocator only hands out memory), so
results are the same to the bit. Memory profiling (``torch.profiler(profile_memory=True)``) sees
every allocation, as with PyTorch's allocator.

The C++ file is compiled on first use with the system's C++ compiler against the installed
torch's headers (about 2 s) and cached under ``~/.cache/i2e_train`` (``I2E_TRAIN_CACHE`` moves
it). Without a compiler :func:`install` logs why once and returns False: PyTorch's allocator stays.
Installed, it stays installed (tensors carry their own deleter, so tensors allocated before stay
valid).

Used by :class:`i2e_train.module.SNNClassifier` (``module.host_allocator``, default ``caching``)
and by :func:`i2e_train.kernels.empty`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["install", "installed", "unavailable_reason", "stats", "release_cached", "reset_peak", "set_cache_limit",
           "library_path", "resident", "reset_resident_peak",
           "suspended"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("host_allocator.cpp")
_STATS = ("allocated_bytes", "peak_allocated_bytes", "cached_bytes", "mapped_bytes", "maps", "unmaps", "reuses")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_installed = False
_keep_limit: int | None = None


def _cache_dir() -> Path:
    root = os.environ.get("I2E_TRAIN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "i2e_train"
    return Path(root) / "host_allocator"


def library_path() -> Path:
    """Where the compiled library of this source, torch and Python is cached."""
    import torch

    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{torch._C._GLIBCXX_USE_CXX11_ABI}|{sys.implementation.cache_tag}".encode())
    return _cache_dir() / f"i2e_host_allocator-{key.hexdigest()[:16]}.so"


def _compile(out: Path) -> None:
    """Compile ``host_allocator.cpp`` into ``out`` (through a temporary name: never half written)."""
    import torch

    torch_dir = Path(torch.__file__).resolve().parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-shared", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-isystem", str(torch_dir / "include"), str(SOURCE), "-o", str(tmp),
           "-L", str(torch_dir / "lib"), "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    try:
        path = library_path()
        if not path.is_file():
            _compile(path)
        lib = ctypes.CDLL(str(path))
        lib.i2e_host_allocator_install.restype = ctypes.c_int
        lib.i2e_host_allocator_release.restype = ctypes.c_size_t
        lib.i2e_host_allocator_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        lib.i2e_host_allocator_raw_deallocate.argtypes = [ctypes.c_void_p]
        lib.i2e_host_allocator_set_keep_limit.argtypes = [ctypes.c_longlong]
        lib.i2e_host_allocator_use.argtypes = [ctypes.c_int]
        lib.i2e_host_allocator_use.restype = ctypes.c_int
        _lib = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _error = f"{type(exc).__name__}: {exc}"
        log.warning("host allocator unavailable (%s): PyTorch's CPU allocator stays", _error)
    return _lib


def install() -> bool:
    """Make the caching host allocator PyTorch's CPU allocator for the rest of this process
    (idempotent). False, having logged why once, when it cannot be built or installed here."""
    global _installed, _error
    with _lock:
        if _installed:
            return True
        lib = _load()
        if lib is None:
            return False
        _installed = bool(lib.i2e_host_allocator_install())
        if _installed:
            lib.i2e_host_allocator_set_keep_limit(-1 if _keep_limit is None else _keep_limit)
        if not _installed and _error is None:
            _error = "another CPU allocator of higher priority is installed"
            log.warning("host allocator not installed: %s", _error)
        return _installed


def installed() -> bool:
    """Whether :func:`install` has made the caching allocator PyTorch's CPU allocator."""
    return _installed


def unavailable_reason() -> str | None:
    """Why :func:`install` returned False (None when it has not failed)."""
    return _error


def stats() -> dict[str, int]:
    """Counters of the allocator (zeros before :func:`install`): bytes of live tensors and their
    peak (see :func:`reset_peak`), bytes of freed blocks kept for reuse, bytes mapped in all, and
    how many blocks were mapped, unmapped and reused."""
    if not _installed:
        return dict.fromkeys(_STATS, 0)
    out = (ctypes.c_uint64 * len(_STATS))()
    _lib.i2e_host_allocator_stats(out)
    return dict(zip(_STATS, (int(v) for v in out)))


@contextmanager
def suspended(active: bool = True) -> Iterator[None]:
    """PyTorch's own CPU allocator for the tensors allocated inside the block, the caching one
    again after it (nothing to do where it is not installed, or with ``active=False``). For
    comparisons of the two in one process (``benchmarks/``): tensors keep the allocator they came
    from, whenever they are freed. Process-wide, as installing is: not for use while other threads
    allocate."""
    if not (_installed and active):
        yield
        return
    with _lock:
        _lib.i2e_host_allocator_use(0)
    try:
        yield
    finally:
        with _lock:
            if not _lib.i2e_host_allocator_use(1):
                raise RuntimeError("the caching host allocator could not be made PyTorch's CPU allocator again")


def reset_peak() -> None:
    """Start ``peak_allocated_bytes`` again from the bytes allocated now."""
    if _installed:
        _lib.i2e_host_allocator_reset_peak()


def set_cache_limit(limit_bytes: int | None) -> None:
    """Keep at most ``limit_bytes`` of freed blocks for reuse (None: no limit, the default); the
    oldest kept blocks beyond it are unmapped at once. A small limit lowers a peak where freed
    blocks of one size wait while blocks of another size are needed, at the cost of mapping (and
    page-faulting) blocks again: :func:`i2e_train.models.memory.host_cache_limit` sets one for
    ``bits+checkpoint``, the mode that trades time for memory."""
    global _keep_limit
    _keep_limit = None if limit_bytes is None else max(0, int(limit_bytes))
    if _installed:
        _lib.i2e_host_allocator_set_keep_limit(-1 if _keep_limit is None else _keep_limit)


def release_cached() -> int:
    """Unmap every kept block (memory back to the system now); returns the bytes unmapped."""
    return int(_lib.i2e_host_allocator_release()) if _installed else 0


def resident() -> dict[str, int]:
    """Resident set of this process in bytes, now (``current``) and at its highest (``peak``),
    from ``/proc/self/status`` (Linux; zeros elsewhere). The peak is that of this process's own
    memory map since its start or :func:`reset_resident_peak`. (``getrusage``'s ``ru_maxrss`` is
    not: a process started with vfork and exec, as Python's ``subprocess`` does, inherits its
    parent's peak there.)"""
    fields = {"VmRSS:": "current", "VmHWM:": "peak"}
    out = dict.fromkeys(fields.values(), 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(" ")
                if key.strip() in fields:
                    out[fields[key.strip()]] = int(rest.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out


def reset_resident_peak() -> bool:
    """Start the peak of :func:`resident` again from the resident set now (writes 5 to
    ``/proc/self/clear_refs``, Linux 4.0 and later); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
