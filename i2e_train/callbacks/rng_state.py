"""RNG states in every checkpoint, put back when training resumes (Lightning stores none)."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["RestoreRNGState", "rng_states", "set_rng_states"]

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``rng_states``."""
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states:
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RestoreRNGState(Callback):
    """Stores the global RNG states (torch, CUDA, numpy, python) in every checkpoint and restores
    them when training resumes from one.

    They are put back in ``on_train_start``: after the training DataLoader's iterator exists and
    the sanity check ran (Lightning runs it inside ``isolate_rng``), before the first batch, so
    the resumed run draws exactly the numbers the uninterrupted run drew after the checkpoint.
    Under DDP the checkpoint holds rank 0's states (every rank starts from the same seed).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if not torch.cuda.is_available():
            states = {k: v for k, v in states.items() if k != "torch.cuda"}
        elif "torch.cuda" in states and len(states["torch.cuda"]) != torch.cuda.device_count():
            states = {k: v for k, v in states.items() if k != "torch.cuda"}
            log.warning("the checkpoint's CUDA RNG states are for another device count: not restored")
        set_rng_states(states)
        log.info("restored the RNG states of the checkpoint (torch, numpy, python%s)",
                 ", cuda" if "torch.cuda" in states else "")
