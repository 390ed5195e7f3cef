"""Compiled CPU kernels (numba), by job: the converter, LIF neurons, max pooling, bit masks.

Used by :mod:`i2e_train.i2e` (converter) and :mod:`i2e_train.models` (LIF, pooling); this
package imports neither. Every kernel is plain IEEE float32 arithmetic in the order of the
tensor code it replaces, so results are bit-identical to it. Kernels are compiled on first use
and cached on disk (about 7 s once per machine, then loaded).

:func:`load` is the one way in: it imports a kernel module, or, when numba cannot be used here,
logs why once and returns None, and callers take their plain tensor path.

Modules: ``converter`` (I2E intensity, dense and packed events), ``lif`` (multi-step LIF
forward / backward), ``pooling`` (max pooling forward / backward), ``spikes`` (spike tensors
packed to bits and back), ``bits`` (the LLVM intrinsics that turn 32 comparisons into a bit mask
and back), ``_jit`` (shared options, thread count).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

__all__ = ["load", "unavailable_reason", "use_threads", "MODULES"]

log = logging.getLogger(__name__)

MODULES = ("converter", "lif", "pooling", "bits", "spikes")
_loaded: dict[str, ModuleType] = {}
_error: str | None = None


def load(name: str) -> ModuleType | None:
    """The compiled kernel module ``name`` (one of :data:`MODULES`), or None when numba is unusable."""
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


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None when the kernels load)."""
    return _error


def use_threads(n: int) -> None:
    """Run the kernels on torch's thread count ``n`` (see :func:`i2e_train.kernels._jit.use_threads`)."""
    if load("bits") is None:
        return
    from ._jit import use_threads as _use

    _use(n)
