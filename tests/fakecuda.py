"""Checking the CUDA path without a GPU: fake CUDA tensors and a count of host traffic.

Why: a GPU step is fast only while the host never waits for the device. Every ``.item()``,
``bool(tensor)``, ``if tensor:``, ``nonzero``, ``unique`` or ``.cpu()`` inside a step makes the
host wait (a synchronisation), and every ``torch.tensor(host_list, device="cuda")`` or
``cpu_tensor.to("cuda")`` is a blocking host-to-device copy. None of these shows up on CPU, and
CI has no GPU; this module finds them anyway.

How:

* :func:`fake_cuda` enters PyTorch's ``FakeTensorMode`` (``torch._subclasses.fake_tensor``) with
  ``allow_non_fake_inputs=False``. Tensors made inside it with ``device="cuda"`` are
  ``FakeTensor`` objects: they carry shape, dtype and a CUDA device but no data, so every
  operator runs its shape / dtype / device logic (the device-specific Python branches of our
  code, ``x.device.type != "cpu"``, are taken as on a GPU). Anything that needs the values on
  the host raises ``DataDependentOutputException`` (``.item()``, ``bool()``, ``.tolist()``) or
  ``DynamicOutputShapeException`` (``nonzero``, ``unique``, boolean masks), and mixing a CUDA
  tensor with a non-scalar CPU tensor raises too. It works on a machine without CUDA
  (``torch.cuda.is_available()`` False): nothing is allocated on a device. Build modules inside
  it with ``with mode, torch.device("cuda"): model = create_model(...)`` (``module.to("cuda")``
  does not work under fake mode: ``Module._apply`` cannot swap the parameters).
* :class:`HostTraffic` is a ``TorchDispatchMode`` entered *inside* the fake mode, so it sees
  every ATen call (with fake arguments) before the fake mode runs it. It records host-to-device
  copies (``_to_copy`` / ``copy_`` from ``cpu`` to the device: ``torch.tensor(list,
  device=...)`` is ``lift_fresh`` + such a ``_to_copy``), device-to-host copies and the ATen
  calls that read values on the host, each with the line of ``i2e_train`` that made it.
  :meth:`HostTraffic.assert_clean` fails a test that saw any of them.
* The backward pass cannot run on fake CUDA without a GPU: autograd's engine asks the CUDA
  driver for a context (``hasPrimaryContext expects a valid device index``; pytorch#92627).
  :func:`meta_model` traces it on the ``meta`` device instead: no data either, ``.item()`` on a
  meta tensor raises, a CPU tensor mixed in raises, and our code takes the same non-CPU branches.
  :class:`HostTraffic` counts copies to ``meta`` as host-to-device copies there.

Warm-ups: count inside a *second* step, so that what is built once (a compiled kernel, a cached
tensor) is not counted. Extend by writing the new path as a function of device tensors and
running it under ``fake_cuda()`` + ``HostTraffic()`` (see ``tests/test_gpu_path.py``).
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostTraffic", "cuda_autocast", "fake_cuda", "fake_module", "meta_model"]

aten = torch.ops.aten

# ATen calls whose result depends on the values and has to be read on the host (each one is a
# device synchronisation on a GPU).
_HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), bool(), float(), int(), .tolist()
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.allclose.default,
}


def _where() -> str:
    """The innermost line of i2e_train (else of the tests) on the Python stack."""
    frames = traceback.extract_stack()[:-3]
    for key in ("/i2e_train/", "/tests/", "/benchmarks/"):
        for f in reversed(frames):
            if key in f.filename.replace("\\", "/"):
                return f"{f.filename.split(key.strip('/') + '/', 1)[-1]}:{f.lineno} ({f.line})"
    return "?"


def _device_of(x) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


@dataclass
class HostTraffic(TorchDispatchMode):
    """Records, while entered, the host-to-device copies (``h2d``, blocking or not: a step should
    make none), blocking device-to-host copies (``d2h``; ``non_blocking=True`` ones, e.g. to pinned
    memory, go to ``d2h_async`` and are no problem) and host reads of values (``reads``) of ATen
    calls on ``device_type`` tensors."""

    device_type: str = "cuda"
    h2d: list[str] = field(default_factory=list)
    d2h: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    d2h_async: list[str] = field(default_factory=list)  # non-blocking device-to-host copies (not a wait)
    calls: dict[str, int] = field(default_factory=dict)  # ATen / custom operator -> number of calls
    stop_on_read: bool = True  # raise at the first host read, naming its line (False: only record)

    def __post_init__(self) -> None:
        super().__init__()

    def _copy(self, func, src: torch.device | None, dst: torch.device | None, non_blocking: bool) -> None:
        if src is None or dst is None:
            return
        if src.type == "cpu" and dst.type == self.device_type:
            self.h2d.append(f"{func} at {_where()}")
        elif src.type == self.device_type and dst.type == "cpu":  # non-blocking (to pinned memory): no wait
            (self.d2h_async if non_blocking else self.d2h).append(f"{func} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        if func is aten._to_copy.default:
            src = _device_of(args[0])
            dst = torch.device(kwargs["device"]) if kwargs.get("device") is not None else src
            self._copy(func, src, dst, bool(kwargs.get("non_blocking", False)))
        elif func in (aten.copy_.default, aten.copy.default):
            non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            self._copy(func, _device_of(args[1]), _device_of(args[0]), non_blocking)
        elif func in _HOST_READS and any(_device_of(a) is not None and _device_of(a).type == self.device_type
                                         for a in args):  # fmt: skip
            self.reads.append(f"{func} at {_where()}")
            if self.stop_on_read:  # stop here with the line, rather than with the fake / meta tensor's own error
                raise AssertionError(f"host read of device values: {self.reads[-1]}")
        return func(*args, **kwargs)

    def problems(self) -> list[str]:
        return ([f"host-to-device copy: {w}" for w in self.h2d] + [f"device-to-host copy: {w}" for w in self.d2h]
                + [f"host read of device values: {w}" for w in self.reads])  # fmt: skip

    def assert_clean(self, what: str) -> None:
        found = self.problems()
        assert not found, f"{what}: {len(found)} host synchronisation(s) or copies in the step:\n  " + "\n  ".join(found)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A ``FakeTensorMode`` (entered) in which ``device="cuda"`` tensors exist without a GPU."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        yield mode


def fake_module(mode: FakeTensorMode, build, device: str = "cuda"):
    """``build()`` (made on CPU) with every parameter, buffer and torchmetrics state replaced by
    a fake tensor of the same shape, strides and dtype on ``device``.

    Built on CPU and converted, not built inside the fake mode: torchmetrics deep-copies each
    state's default, and a deep-copied fake tensor gets a fake mode of its own (then "Mixing
    fake modes" errors, and heap corruption at the next garbage collection)."""
    from torchmetrics import Metric

    with unset_fake_temporarily():  # real CPU tensors, even when called inside fake_cuda()
        module = build()
    with mode:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(_like(p, device), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = _like(b, device)
            if isinstance(m, Metric):
                for name, default in m._defaults.items():
                    if isinstance(default, torch.Tensor):
                        m._defaults[name] = _like(default, device)
                        setattr(m, name, _like(getattr(m, name), device))
                m._device = torch.device(device)
    return module


def _like(t: torch.Tensor, device: str) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def meta_model(build):
    """``build()`` on the ``meta`` device (for the backward pass; see the module docstring)."""
    with torch.device("meta"):
        return build()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """Autocast for CUDA even where CUDA is not available (``torch.autocast("cuda")`` then
    switches itself off with a warning); fake CUDA tensors carry the autocast dispatch key, so
    the network runs in ``dtype`` as under ``16-mixed`` / ``bf16-mixed``."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
