"""SNNClassifier: the LightningModule that trains and evaluates any registered SNN.

Batches arrive as (events [T, B, C, H, W] float, labels [B] int64): the DataModule has
already unpacked (or converted) them on the device in ``on_after_batch_transfer``. The
network returns logits [B, classes] averaged over T and resets its neurons itself.

Loss: cross entropy with label smoothing on the training loss only (validation loss is plain
cross entropy, as in the official scripts). Metrics: top-1 / top-5 accuracy (torchmetrics,
synchronised across DDP ranks) and the validation confusion matrix.
Optimiser and schedule: partials of timm's factories (``create_optimizer_v2`` excludes biases
and norm weights from weight decay; ``CosineLRScheduler`` stepped per epoch, which is why
``lr_scheduler_step`` is overridden).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from .models.lif import set_fast_kernels
from .models.memory import check_memory_mode, set_memory
from .models.memory_plan import PRECISIONS, choose_memory, device_budget

__all__ = ["SNNClassifier"]




class _ConfusionMatrix(MulticlassConfusionMatrix):
    """``MulticlassConfusionMatrix`` ([classes, classes], rows = true class) whose update adds
    the batch with an accumulating ``index_put_``: torchmetrics' own uses ``torch.bincount``,
    whose output size depends on the largest value (a host read per validation step on a GPU).
    The same counts (``tests/test_gpu_path.py``)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point():  # logits / probabilities [B, K] -> predicted class [B]
            preds = preds.argmax(1)
        cell = target.reshape(-1).long() * self.num_classes + preds.reshape(-1).long()
        self.confmat.view(-1).index_put_((cell,), torch.ones_like(cell, dtype=self.confmat.dtype), accumulate=True)


class SNNClassifier(LightningModule):
    """Classification of event streams with a spiking network.

    Args:
        model: the network, events [T, B, C, H, W] -> logits [B, num_classes].
        num_classes: number of classes (for metrics).
        optimizer: callable(model) -> torch optimiser (e.g. a partial of timm's create_optimizer_v2).
        scheduler: callable(optimizer) -> timm scheduler (or torch LR scheduler), or None.
        label_smoothing: label smoothing of the training loss.
        run_config: the resolved run config, stored in every checkpoint as ``i2e_config`` so that
            a checkpoint alone says how to rebuild its model and data.
        fast_kernels: the compiled CPU kernel of our LIF neurons (`i2e_train.models.lif`):
            the same results to the bit, faster training steps on CPU; ``False`` (or
            ``I2E_CPU_KERNELS=0`` in the environment) runs SpikingJelly's operators there.
        memory: what training keeps for the backward pass (`i2e_train.models.memory`), from
            fastest to leanest: ``"none"``, ``"bits"`` (only what is free), ``"recompute"``
            (what costs no convolution work runs again in the backward), ``"least"`` (every
            layer runs again from spikes kept as bits), or ``"auto"`` (the fastest whose
            predicted peak fits ``memory_budget``). The same losses and gradients to the bit in
            every mode.
        memory_budget: GiB a training step may use with ``memory="auto"`` (None: the device's
            free memory, `i2e_train.models.memory_plan.device_budget`).
        channels_last: keep convolution weights (and so activations) in channels-last memory
            format, the fast layout for tensor cores. The float sums run in another order, so
            membrane values differ in the last bits and spikes right at threshold may flip.
        compile: run the network through ``torch.compile`` (the parameters and state-dict keys
            stay those of the plain network); the compiled forward is the plain one, without the
            memory mode (a warning says so).
        eval_autocast: run validation / test under the trainer's mixed precision. False
            (default, the official scripts: their ``validate`` has no autocast) runs the network
            in float32 there, whatever the trainer's precision.
        batch_transform: applied to the training events [T, B, C, H, W] before the network
            (e.g. ``i2e_train.data.augment.TemporalDelete``, the official ``--t_train``); None = none.

    A training batch may carry soft targets [B, classes] as a third element (MixUp/CutMix):
    the loss is then taken on them, the accuracy on the hard labels.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        label_smoothing: float = 0.1,
        run_config: dict | None = None,
        channels_last: bool = False,
        compile: bool = False,
        fast_kernels: bool = True,
        memory: str = "bits",
        memory_budget: float | None = None,
        eval_autocast: bool = False,
        batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = float(label_smoothing)
        self.run_config = run_config
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.fast_kernels = bool(fast_kernels)
        self.memory = check_memory_mode(memory)
        if memory_budget is not None and not float(memory_budget) > 0:
            raise ValueError(f"module.memory_budget={memory_budget!r}: expected a positive number of GiB or null")
        self.memory_budget = None if memory_budget is None else float(memory_budget)
        self.memory_chosen: str | None = None  # memory="auto": the mode picked before the first step
        self.eval_autocast = bool(eval_autocast)
        self.batch_transform = batch_transform
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        top5 = min(5, self.num_classes)
        # validate_args=False: the value checks run torch.unique on every update (a host
        # synchronisation per metric per step on a GPU); shapes are checked by the loss anyway.
        checks = {"validate_args": False}
        self.train_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro", **checks)
        self.val_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro", **checks)
        self.val_top5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro", **checks)
        self.val_confusion = _ConfusionMatrix(self.num_classes, **checks)
        self.last_confusion: torch.Tensor | None = None  # [classes, classes], rows = true class

    def configure_model(self) -> None:
        set_fast_kernels(self.model, self.fast_kernels)
        set_memory(self.model, self.memory)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile and self._compiled is None:
            if self.memory != "none":
                warnings.warn(
                    f"module.compile=true: the compiled network runs its plain forward, memory mode {self.memory!r} "
                    "does not apply (autograd keeps what the compiled graph saves); set module.compile=false to "
                    "keep it",
                    stacklevel=2,
                )
            # Not registered as a submodule: checkpoints keep the plain network's keys.
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def forward(self, events: torch.Tensor) -> torch.Tensor:
        net = self._compiled if self._compiled is not None else self.model
        return net(events)  # [T, B, C, H, W] -> [B, classes]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.memory == "auto" and self.memory_chosen is None:
            self._choose_memory(batch[0])

    def _choose_memory(self, events: torch.Tensor) -> None:
        """memory=auto: the fastest mode whose predicted peak fits the budget, from the first batch's shape."""
        budget = device_budget(events.device) if self.memory_budget is None else int(self.memory_budget * 2**30)
        precision = str(getattr(self.trainer, "precision", "32-true")) if self._trainer is not None else None
        mode, peaks = choose_memory(self.model, events.shape, budget, optimizer=self.optimizer_factory,
                                    precision=precision if precision in PRECISIONS else None,
                                    input_dtype=events.dtype)  # fmt: skip
        self.memory_chosen = mode
        rank_zero_info("memory=auto: %s for a budget of %.2f GiB (predicted peaks: %s)" % (
            mode, budget / 2**30, ", ".join(f"{m} {p / 2**30:.2f} GiB" for m, p in peaks.items())))

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        events, labels = batch[0], batch[1]
        targets = batch[2] if len(batch) > 2 else labels  # soft targets [B, classes] of MixUp/CutMix
        if labels.numel() == 0:  # every record of the batch was skipped (data.on_bad_record=skip)
            return None
        if self.batch_transform is not None:
            events = self.batch_transform(events)
        logits = self(events)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)  # targets [B] or soft [B, K]
        # logged per epoch: no per-batch value to compute
        self.train_top1.update(logits, labels.argmax(1) if labels.dim() == 2 else labels)
        bs = labels.shape[0]
        # not prog_bar: Lightning would read it on the host after every step; the progress bar
        # (callbacks.StepLossProgressBar) reads it once per refresh
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        events, labels = batch
        if labels.numel() == 0:  # every record of the batch was skipped (data.on_bad_record=skip)
            return
        with torch.autocast(events.device.type, enabled=torch.is_autocast_enabled(events.device.type)
                            and self.eval_autocast):
            logits = self(events).float()
        loss = F.cross_entropy(logits, labels)
        bs = labels.shape[0]
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        self.val_confusion.update(logits, labels)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/top1", self.val_top1, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("val/top5", self.val_top5, on_epoch=True, batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        self.last_confusion = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("SNNClassifier needs an optimizer factory to train (config group 'optim')")
        optimizer = self.optimizer_factory(self.model)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers take the index of the epoch about to start; Lightning calls this at
        # the end of epoch `current_epoch`, before the counter moves on.
        if hasattr(scheduler, "step_update") and hasattr(scheduler, "t_in_epochs"):
            scheduler.step(epoch=self.current_epoch + 1, metric=metric)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["i2e_config"] = self.run_config
        checkpoint["num_classes"] = self.num_classes
