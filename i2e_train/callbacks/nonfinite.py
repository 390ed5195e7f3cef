"""Stop at the first NaN/Inf training loss; never write a checkpoint holding NaN/Inf weights."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["StopOnNonFinite", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the weights about to be checkpointed) became NaN or Inf."""


class StopOnNonFinite(Callback):
    """Stops training at the first NaN/Inf loss, with a message naming the epoch and step, and
    refuses to write a checkpoint whose weights hold NaN/Inf: the last good checkpoint stays.

    On CPU (and devices other than CUDA) the loss is checked before its backward pass, so the
    bad batch never reaches the optimiser. On CUDA the check adds no host synchronisation to the
    step: the finite flag and the loss are copied to pinned host memory without blocking and
    read once the copy has completed (at a later batch's hooks; at the latest at the epoch end,
    before any checkpoint is written and when training ends). The bad batch's optimiser step
    has then run, but the weights it produced are never checkpointed (``on_save_checkpoint``
    checks for the loss first, then for NaN/Inf weights, with one host read per device).
    ``sync_free`` forces either mode. Under ``16-mixed`` the hook sees the loss times the
    GradScaler's scale; only a NaN/Inf loss is reported, and NaN/Inf divided by the scale is the
    same value, so the message is that of the unscaled loss.

    Each process checks its own loss (no collective per step); under DDP a process that stops
    ends the others through Lightning's launcher (NaN weights are the same on every rank anyway:
    the gradients are averaged).
    """

    def __init__(self, sync_free: bool | None = None) -> None:
        self.sync_free = sync_free  # None: on CUDA only
        self._batch_idx = -1
        # (loss stats [finite flag, loss value], CUDA event after their copy to the host or None,
        #  epoch, global step, batch index, loss is a scalar) of losses not read yet, oldest first
        self._pending: list[tuple[torch.Tensor, Any, int, int, int, bool]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._poll(trainer, block=False)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        where = (trainer.current_epoch, trainer.global_step, self._batch_idx)
        # [all finite, the loss (NaN for a loss of several elements: the message then says NaN/Inf)]
        scalar = loss.numel() == 1
        value = loss.reshape(-1)[0].float() if scalar else loss.new_full((), float("nan"), dtype=torch.float32)
        stats = torch.stack((torch.isfinite(loss).all().float(), value))
        if not (self.sync_free if self.sync_free is not None else loss.is_cuda):
            self._check(trainer, stats, *where, scalar=scalar, deferred=False)
            return
        event = None
        if stats.is_cuda:
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            stats = host
        self._pending.append((stats, event, *where, scalar))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._poll(trainer, block=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._poll(trainer, block=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._poll(trainer, block=True)

    def _poll(self, trainer: Trainer, block: bool) -> None:
        """Check the recorded losses whose copies have completed (all of them when ``block``)."""
        while self._pending:
            stats, event, epoch, step, batch_idx, scalar = self._pending[0]
            if event is not None:
                if not block and not event.query():
                    return
                event.synchronize()
            self._pending.pop(0)
            self._check(trainer, stats, epoch, step, batch_idx, scalar=scalar, deferred=True)

    def _check(self, trainer: Trainer, stats: torch.Tensor, epoch: int, step: int, batch_idx: int, *, scalar: bool,
               deferred: bool) -> None:  # fmt: skip
        finite, value = stats.tolist()
        if finite:
            return
        self._pending.clear()
        when = ("its optimiser step has run; the weights it produced are not checkpointed" if deferred
                else "stopping before the optimiser step")  # fmt: skip
        raise NonFiniteLossError(
            f"non-finite training loss ({value if scalar else 'NaN/Inf'}) at epoch {epoch}, global step {step} "
            f"(batch {batch_idx} of the epoch): {when}. {_last_good(trainer)} Usual causes: a learning rate too "
            "high for the batch size (optim.lr), fp16 overflow (trainer.precision=32-true or bf16-mixed), or bad "
            "input data."
        )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._poll(trainer, block=True)  # a pending NaN loss is named before the weights it spoilt
        bad = _nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteLossError(
                f"the weights hold NaN/Inf at epoch {trainer.current_epoch}, global step {trainer.global_step} "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): not writing this checkpoint. "
                f"{_last_good(trainer)}"
            )


def _nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Keys of the floating-point tensors of ``state`` holding NaN/Inf: one host read per device
    when all are finite (the usual case), one per tensor only to name the bad ones."""
    floats = [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, v in floats:
        by_device.setdefault(v.device, []).append(torch.isfinite(v).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return []
    return [k for k, v in floats if not bool(torch.isfinite(v).all())]


def _last_good(trainer: Trainer) -> str:
    cb = trainer.checkpoint_callback
    last = getattr(cb, "last_model_path", "") if cb is not None else ""
    paths = [getattr(c, "last_model_path", "") for c in trainer.checkpoint_callbacks] + [last]
    paths = [p for p in paths if p and os.path.isfile(p)]
    if not paths:
        return "No checkpoint was written before this point."
    newest = max(paths, key=lambda p: os.path.getmtime(p))
    return f"The last good checkpoint is kept: {newest} (resume from it with ckpt_path=last, e.g. with a lower lr)."
