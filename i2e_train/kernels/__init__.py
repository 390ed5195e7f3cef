"""Compiled CPU kernels (numba), by job: the converter, LIF neurons, spike bits, bit masks.

Used by `i2e_train.i2e` (converter) and `i2e_train.models` (LIF, spike bits); this
package imports neither. Every kernel is plain IEEE float32 arithmetic in the order of the
tensor code it replaces, so results are bit-identical to it. Kernels are compiled on first use
and cached on disk (about 7 s once per machine, then loaded).

`load` is the one way in: it imports a kernel module, or, when numba cannot be used here,
logs why once and returns None, and callers take their plain tensor path.

The models' kernels are drop-in operators beneath the networks, chosen by the tensor's device
(`cpu_enabled`): ``I2E_CPU_KERNELS=0`` in the environment turns them off, and the CPU then
runs the tensor operations a GPU runs (how the tests and ``benchmarks/memory.py`` measure the GPU
path on a CPU). The converter chooses its own back-end (`i2e_train.i2e`).

Modules: ``converter`` (I2E intensity, dense and packed events), ``lif`` (multi-step LIF
forward / backward), ``spikes`` (spike tensors
packed to bits and back), ``bits`` (the LLVM intrinsics that turn 32 comparisons into a bit mask
and back), ``_jit`` (shared options, thread count).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

__all__ = ["MODULES", "cpu_enabled", "empty", "load", "unavailable_reason", "use_threads"]

log = logging.getLogger(__name__)

MODULES = ("converter", "lif", "bits", "spikes")
_loaded: dict[str, ModuleType] = {}
_error: str | None = None


def load(name: str) -> ModuleType | None:
    """The compiled kernel module ``name`` (one of `MODULES`), or None when numba is unusable."""
    global _error
    if name not in MODULES:
        raise ValueError(f"unknown kernel module {name!r}; known: {', '.join(MODULES)}")
    if name in _loaded:
        return _loaded[name]
    if _error is not None:
        return None
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        _error = f"{type(exc).__name__}: {exc}"
        log.warning("numba kernels unavailable (%s): the fast CPU paths are off", _error)
        return None
    _loaded[name] = module
    return module


def cpu_enabled(name: str, x: "torch.Tensor") -> bool:
    """Whether kernel module ``name`` runs for tensor ``x``: a real CPU tensor (not a fake one of
    ``FakeTensorMode``), ``I2E_CPU_KERNELS`` not ``0`` in the environment, and numba loads."""
    from torch._subclasses.fake_tensor import is_fake

    return (x.device.type == "cpu" and os.environ.get("I2E_CPU_KERNELS", "1").strip() != "0" and not is_fake(x)
            and load(name) is not None)  # fmt: skip


def unavailable_reason() -> str | None:
    """Why `load` returned None (None when the kernels load)."""
    return _error


def use_threads(n: int) -> None:
    """Run the kernels on torch's thread count ``n`` (see `i2e_train.kernels._jit.use_threads`)."""
    if load("bits") is None:
        return
    from ._jit import use_threads as _use

    _use(n)


def empty(shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":
    """An uninitialised contiguous 64-byte aligned CPU tensor for a kernel's output.

    The memory comes from ``malloc`` (through numpy) rather than PyTorch's ``posix_memalign(64, n)``, for which
    glibc asks its heap for ``n`` plus about 96 bytes and returns the spare bytes: a freed n-byte
    block is then too small for the next request of the same size, and a training step that
    allocates and frees tensors of a few sizes keeps growing the heap. A plain ``malloc`` of the
    same size fits those freed blocks, so at least the activations, gradients and unpacked spikes
    that the kernels write recycle the heap (``benchmarks/memory.py``). The values are whatever
    the kernel writes; nothing else differs from ``torch.empty``.
    """
    import numpy as np
    import torch

    shape = tuple(int(d) for d in shape)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return torch.from_numpy(raw[start : start + nbytes].view(np_dtype).reshape(shape))
