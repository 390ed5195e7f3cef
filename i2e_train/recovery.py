"""Keeping a training run recoverable: atomic checkpoints, exact resume, loud failures.

- ``AtomicCheckpointIO``: every checkpoint is written to a temporary file in the same folder,
  flushed to disk and renamed over the target (``os.replace``), so a run killed while saving
  leaves the previous good file, never a half-written one. (Lightning's own writer goes
  through an fsspec transaction whose temporary file lives in the system temp folder: the
  final move is a copy when that is another filesystem.) Used by every trainer config
  (``configs/trainer/default.yaml``: ``plugins``).
- ``StepCheckpoint``: ``<output_dir>/checkpoints/last.ckpt`` every N optimiser steps, the
  mid-epoch recovery point for long epochs (``callbacks.step_checkpoint.every_n_train_steps``).
- ``RestoreRNGState``: Lightning stores no RNG state in its checkpoints; this callback stores
  the torch / CUDA / numpy / python generators and puts them back when training resumes.
  Together with the DataModules' resumable sampler (``i2e_train.data.sampler``) a run
  interrupted mid-epoch and resumed with ``ckpt_path=last`` ends with the same weights as an
  uninterrupted one (deterministic settings, ``num_workers=0``, or no worker-side randomness).
- ``StopOnNonFinite``: a NaN/Inf training loss stops the run (on CPU before the optimiser step;
  on CUDA without a host synchronisation in the step: as soon as the loss has reached the host,
  at the latest at the epoch end or the next checkpoint), with a
  message naming the epoch and step; a checkpoint holding NaN/Inf weights is never written, so
  the last good one stays.
- ``BadRecordsReport``: records dropped under ``data.on_bad_record=skip`` are counted (all
  processes, all DataLoader workers), logged as ``data/bad_records`` and written to
  ``<output_dir>/bad_records.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from i2e_train.files import atomic_write, atomic_write_json

__all__ = ["AtomicCheckpointIO", "StepCheckpoint", "RestoreRNGState", "StopOnNonFinite", "NonFiniteLossError",
           "BadRecordsReport", "recovery_callbacks", "atomic_torch_save", "rng_states", "set_rng_states"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- atomic files
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file in the same folder + ``os.replace``."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), durable=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a half-written checkpoint where a good one was.

    Local paths are written atomically (temporary file + fsync + ``os.replace``); remote URLs
    (``s3://`` ...) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


# --------------------------------------------------------------------------- checkpoints
class StepCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimiser steps (mid-epoch recovery
    points); ``None`` or 0 = never (the epoch-end ``last.ckpt`` of the main ModelCheckpoint stays).

    It overwrites the same ``last.ckpt`` as the main checkpoint callback (which must therefore
    have ``enable_version_counter: false``), so ``ckpt_path=last`` always finds the newest state.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None) -> None:
        n = int(every_n_train_steps or 0)
        if n < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (or null), got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=n,
                         every_n_epochs=0, enable_version_counter=False, save_on_train_epoch_end=False)
        self.every_n = n

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self.every_n, kind="step_checkpoint")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # ModelCheckpoint would save last.ckpt here if this callback never saved: the main one did


# --------------------------------------------------------------------------- RNG
def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    import random

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
    import random

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


# --------------------------------------------------------------------------- NaN / Inf
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
    checks for the loss first, then for NaN/Inf weights). ``sync_free`` forces either mode.

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
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteLossError(
                f"the weights hold NaN/Inf at epoch {trainer.current_epoch}, global step {trainer.global_step} "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): not writing this checkpoint. "
                f"{_last_good(trainer)}"
            )


def _last_good(trainer: Trainer) -> str:
    cb = trainer.checkpoint_callback
    last = getattr(cb, "last_model_path", "") if cb is not None else ""
    paths = [getattr(c, "last_model_path", "") for c in trainer.checkpoint_callbacks] + [last]
    paths = [p for p in paths if p and os.path.isfile(p)]
    if not paths:
        return "No checkpoint was written before this point."
    newest = max(paths, key=lambda p: os.path.getmtime(p))
    return f"The last good checkpoint is kept: {newest} (resume from it with ckpt_path=last, e.g. with a lower lr)."


# --------------------------------------------------------------------------- bad records
class BadRecordsReport(Callback):
    """Counts of the records dropped under ``on_bad_record='skip'``: logged as
    ``data/bad_records`` at every training epoch end (summed over processes) and written to
    ``<output_dir>/bad_records.json`` (every epoch end, fit end, and when the run fails).

    The DataModule's ``bad_records`` (a ``BadRecordCounter``) is filled in the main process from
    the messages that travel with each batch, so counts from DataLoader workers are not lost.
    Under DDP the ranks' counters are merged at fit end (one ``all_gather_object``; the file of
    earlier epochs holds rank 0's share) and rank 0 writes. No collective runs in epoch hooks:
    rank 0 alone syncs metrics for its progress bar there, and a collective of ours in between
    would pair with the wrong one.
    """

    filename = "bad_records.json"

    def __init__(self, output_dir: str | os.PathLike | None = None) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)

    @staticmethod
    def _counter(trainer: Trainer):
        dm = trainer.datamodule
        if dm is None or getattr(dm, "on_bad_record", "raise") != "skip":
            return None
        return getattr(dm, "bad_records", None)

    def _merged(self, trainer: Trainer, counter) -> dict[str, Any]:
        state = counter.state_dict()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
            merged = type(counter)()
            for s in states:
                merged.load_state_dict(s)
            return merged.report()
        return counter.report()

    def _write(self, trainer: Trainer, report: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        out = self.output_dir or Path(trainer.default_root_dir)
        atomic_write_json(out / self.filename, report, indent=1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counter = self._counter(trainer)
        if counter is None:
            return
        pl_module.log("data/bad_records", float(counter.total), reduce_fx="sum", sync_dist=True)
        self._write(trainer, counter.report())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counter = self._counter(trainer)
        if counter is None:
            return
        report = self._merged(trainer, counter)
        self._write(trainer, report)
        if report["total"] and trainer.is_global_zero:
            log.warning("%d bad record(s) were skipped (%s); see %s", report["total"], report["counts"],
                        (self.output_dir or Path(trainer.default_root_dir)) / self.filename)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        counter = self._counter(trainer)
        if counter is not None:  # no collectives here: another rank may be gone
            self._write(trainer, counter.report())


def recovery_callbacks(output_dir: str | os.PathLike | None = None) -> list[Callback]:
    """The callbacks every ``i2e-train`` run gets (not a config group: resuming exactly and
    stopping on NaN must not depend on the chosen callback set)."""
    return [RestoreRNGState(), StopOnNonFinite(), BadRecordsReport(output_dir)]
