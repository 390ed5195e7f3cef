"""How much memory will a training step take? A dry run per memory mode, and ``memory=auto``.

`predict_peaks` runs training steps of a copy of the network whose parameters, buffers,
input and every intermediate tensor are fake (PyTorch's ``FakeTensorMode``: shapes, dtypes and
strides, no data, no allocation), in each memory mode, with the real optimiser (its state made by
a first step), and follows every storage from the operator that makes it until it is freed: the
peak of live tensor bytes of the second step, what ``torch.cuda.max_memory_allocated`` counts on a
GPU. Kernel workspaces (cuDNN's, oneDNN's) are not tensors of the step and are not included, so a
measured peak is at or above the prediction; mixed precision (``16-mixed``, ``bf16-mixed``) is run
under CPU autocast of the same dtype, whose casting rules follow CUDA's for convolutions, linear
layers and batch norm. It takes about a second per mode on a CPU, whatever the input size.

`choose_memory` picks the fastest mode (`LADDER`) whose predicted peak fits a budget
and puts the network in it; ``SNNClassifier(memory="auto")`` calls it before its first training
step, with the device's free memory as the budget unless ``memory_budget`` (GiB) is given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import set_memory

__all__ = ["LADDER", "PRECISIONS", "choose_memory", "device_budget", "predict_peaks"]

log = logging.getLogger(__name__)

LADDER = ("none", "bits", "recompute", "least")  # fastest first
PRECISIONS = {"32-true": None, "32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


class _LiveBytes(TorchDispatchMode):
    """Live tensor bytes: each storage from the operator that makes it until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage._cdata not in self.live:
            self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
            self.total += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.total -= self.live.pop(key)[1]
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, self.total)
        return out


@dataclass
class _Fake:
    mode: FakeTensorMode
    model: nn.Module
    params: list[torch.Tensor]


def _fake_copy(model: nn.Module) -> _Fake:
    """A copy of ``model`` whose parameters and buffers are fake (no data is copied)."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    mode.cache_enabled = False  # its cache of operator results would hold storages alive
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(mode.from_tensor(p.detach(), static_shapes=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = mode.from_tensor(b, static_shapes=True)
    fake = copy.deepcopy(model, memo)
    return _Fake(mode, fake, list(fake.parameters()))


def _default_loss(out: torch.Tensor) -> torch.Tensor:
    if out.dim() == 2:  # logits [B, K]: the classifier's cross entropy
        return F.cross_entropy(out.float(), torch.zeros(out.shape[0], dtype=torch.long))
    return out.float().sum()


def predict_peaks(model: nn.Module, input_shape: Sequence[int], *, modes: Iterable[str] = LADDER,
                  optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                  precision: str | None = None, input_dtype: torch.dtype = torch.float32,
                  loss: Callable[[torch.Tensor], torch.Tensor] = _default_loss) -> dict[str, int]:  # fmt: skip
    """Predicted peak of live tensor bytes of one training step of ``model`` per memory mode.

    ``input_shape``: the network's input, e.g. ``[T, B, C, H, W]``; ``optimizer``: a factory
    ``model -> optimiser`` (its state counts; None: parameters and gradients only); ``precision``:
    a Lightning precision (`PRECISIONS`). The network itself is not touched.
    """
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS.get(precision) if precision else None
    fake = _fake_copy(model)
    out: dict[str, int] = {}
    with fake.mode:
        x = torch.empty(tuple(int(s) for s in input_shape), dtype=input_dtype)
        opt = optimizer(fake.model) if optimizer is not None else None
        for mode in modes:
            set_memory(fake.model, mode)
            live = None
            for step in range(2):  # the first makes the optimiser's state; the second is measured
                if step:
                    live = _LiveBytes()
                    for t in (*fake.params, *fake.model.buffers(), x, *_state(opt)):
                        live.track(t)
                    live.__enter__()
                try:
                    for p in fake.params:
                        p.grad = None
                    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        value = loss(fake.model(x))
                    value.backward()
                    del value
                    if opt is not None:
                        opt.step()
                finally:
                    if step:
                        live.__exit__(None, None, None)
            out[mode] = live.peak
    return out


def _state(opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if opt is None:
        return []
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def device_budget(device: torch.device) -> int:
    """Bytes a training step may use on ``device``: on CUDA the free memory plus what PyTorch
    holds in live tensors now (the network is already there); on CPU the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_allocated(device))
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("memory=auto on CPU needs /proc/meminfo (Linux); set module.memory_budget (GiB)")


def choose_memory(model: nn.Module, input_shape: Sequence[int], budget: int, **predict_kwargs) -> tuple[str, dict[str, int]]:
    """Put ``model`` in the fastest memory mode whose predicted peak fits ``budget`` bytes (when
    none fits, with a warning, the one with the lowest peak); returns the mode and every prediction."""
    peaks = predict_peaks(model, input_shape, **predict_kwargs)
    fits = [m for m in LADDER if m in peaks and peaks[m] <= budget]
    mode = fits[0] if fits else min(peaks, key=lambda m: (peaks[m], LADDER.index(m) if m in LADDER else len(LADDER)))
    if not fits:
        log.warning("memory=auto: no memory mode fits %.2f GiB (predicted %s); using %r", budget / 2**30,
                    ", ".join(f"{m} {p / 2**30:.2f} GiB" for m, p in peaks.items()), mode)
    set_memory(model, mode)
    return mode, peaks
