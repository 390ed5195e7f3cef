"""Lightning callbacks that tell a person what a run did (configs/callbacks/default.yaml).

* :class:`SpikeStats`: firing rate of every spiking layer and synaptic operations per sample,
  measured on the validation set (``spikes/*`` metrics, ``spike_stats.json``, ``spike_rates.png``).
* :class:`EventMediaLogger`: a few validation samples as event animations and the confusion
  matrix, logged to Weights & Biases (does nothing without a ``WandbLogger``).
* :class:`LearningCurves`: train / validation loss and top-1 per epoch as a PNG at the end of fit.
* :class:`RunInfo`: the resolved config, parameter counts and hardware sent to every logger at
  the start of fit (wandb: config + summary; CSV: hparams.yaml; TensorBoard: hparams).

All of them are cheap: SpikeStats hooks the network during validation epochs only (no hook
exists during training steps, nor during the sanity check), media and plots are made on rank 0.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from i2e_train.files import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["SpikeStats", "EventMediaLogger", "LearningCurves", "RunInfo", "find_wandb_logger", "spiking_layers"]

_SYNAPSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def find_wandb_logger(trainer: Trainer):
    """The first ``WandbLogger`` attached to the trainer, or None."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def spiking_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every SpikingJelly neuron (``BaseNode``: LIF, IF, ...) of ``module``, in forward-definition
    order, with its name relative to ``module``."""
    from spikingjelly.activation_based.neuron import BaseNode

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseNode)]


def _short_names(names: list[str]) -> dict[str, str]:
    """Drop a prefix every name shares up to a dot (``model.layer1.0.sn1`` -> ``layer1.0.sn1``)."""
    prefix = "model."
    if names and all(n.startswith(prefix) for n in names):
        return {n: n[len(prefix):] for n in names}
    return {n: n for n in names}


def _output_dir(trainer: Trainer, output_dir: str | Path | None) -> Path:
    return Path(output_dir) if output_dir else Path(trainer.default_root_dir)


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a conv / linear layer (all frames of the call)."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    k = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * k


class SpikeStats(Callback):
    r"""Firing rates and synaptic operations (SOPs) of a spiking network on the validation set.

    During every validation epoch (not the sanity check, not training) forward hooks are put on

    * every SpikingJelly neuron (``isinstance(m, BaseNode)``): its output spikes ``s`` are counted;
      the **firing rate** of layer ``l`` is ``r_l = sum(s) / numel(s)`` over all elements of the
      epoch (time steps, samples, channels and positions together), i.e. the fraction of
      neuron-timesteps that emit a spike;
    * every ``Conv1d/2d/3d`` and ``Linear`` (the synapses): the fraction of non-zero elements of
      its input ``x`` (``r_in = nnz(x) / numel(x)``) and its multiply-accumulates per call.

    The hooks are removed at the end of the epoch. With ``N`` validation samples and ``T`` time
    steps, the standard SNN estimate is used (input spikes times the operations each triggers):

    .. math::
        \mathrm{SOPs/sample} = \sum_{l \in \text{synapses with binary input}}
            r_{in,l} \cdot \mathrm{MACs}_l \cdot T

    where ``MACs_l`` = multiply-accumulates of layer ``l`` for one sample and one time step
    (conv: ``C_out * H_out * W_out * C_in / groups * k_h * k_w``; linear: ``in * out``). It equals
    ``nnz(x_l) * MACs_l / numel(x_l)`` summed over the epoch and divided by ``N``: the number of
    input spikes times the mean fan-out of one input element (``C_out * k_h * k_w / stride^2`` for
    a convolution, ``out_features`` for a linear layer). The input of a synapse is usually the
    output of the neuron right before it (``r_in = r_l`` of that neuron); the first convolution
    reads the binary event tensor itself, which counts as spikes too. A synapse whose input is not
    binary (e.g. event-count frames of CIFAR10-DVS) performs dense MACs: those are reported as
    ``dense_macs_per_sample`` and not added to the SOPs. Batch norms, pooling and the membrane
    shortcut additions are not counted (BN folds into the convolution at inference).

    Logged (every validation epoch): ``spikes/<layer>`` (firing rate of each neuron layer, when
    ``log_layers``), ``spikes/mean_rate`` (all spikes / all neuron-timesteps of the network) and
    ``spikes/sops_per_sample``. Rank 0 writes ``<output_dir>/spike_stats.json`` (the numbers of
    the last validation epoch, per layer and per synapse) and ``<output_dir>/spike_rates.png``.
    Counts are summed over DDP ranks before the rates are computed.
    """

    def __init__(self, output_dir: str | Path | None = None, log_layers: bool = True, plot: bool = True,
                 filename: str = "spike_stats.json", plot_filename: str = "spike_rates.png") -> None:
        self.output_dir = output_dir
        self.log_layers = bool(log_layers)
        self.plot = bool(plot)
        self.filename = filename
        self.plot_filename = plot_filename
        self.last: dict[str, Any] | None = None  # the numbers of the last validation epoch
        self._handles: list = []
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._nodes: dict[str, list] = {}  # name -> [spike count (tensor), elements (int)]
        self._syn: dict[str, dict[str, Any]] = {}  # name -> nnz, nonbinary, numel, macs, sources
        self._ptr: dict[int, str] = {}  # data_ptr of a spike tensor of this batch -> its neuron
        self._samples = 0
        self._timesteps: int | None = None

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def _node_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_tensor(output):
                return
            out = output.detach()
            acc = self._nodes[name]
            acc[0] = acc[0] + torch.count_nonzero(out)
            acc[1] += out.numel()
            self._ptr[out.data_ptr()] = name

        return hook

    def _syn_hook(self, name: str):
        def hook(module, inputs, output):
            if not inputs or not torch.is_tensor(inputs[0]) or not torch.is_tensor(output):
                return
            x = inputs[0].detach()
            acc = self._syn[name]
            acc["nnz"] = acc["nnz"] + torch.count_nonzero(x)
            acc["nonbinary"] = acc["nonbinary"] + torch.count_nonzero((x != 0) & (x != 1))
            acc["numel"] += x.numel()
            acc["macs"] += _macs(module, output)
            acc["sources"].add(self._ptr.get(x.data_ptr(), "?"))

        return hook

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._reset()
        if trainer.sanity_checking:
            return
        neurons = {n for n, _ in spiking_layers(pl_module)}
        hooked = [(n, m) for n, m in pl_module.named_modules() if n in neurons or isinstance(m, _SYNAPSES)]
        short = _short_names([n for n, _ in hooked])
        for name, m in hooked:
            if name in neurons:
                self._nodes[short[name]] = [0, 0]
                self._handles.append(m.register_forward_hook(self._node_hook(short[name])))
            else:
                self._syn[short[name]] = {"nnz": 0, "nonbinary": 0, "numel": 0, "macs": 0, "sources": set()}
                self._handles.append(m.register_forward_hook(self._syn_hook(short[name])))
        if not self._nodes:
            self._remove_hooks()
            self._reset()

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not self.hooked:
            return
        self._ptr = {}
        events = batch[0] if isinstance(batch, (tuple, list)) else batch
        if torch.is_tensor(events):
            self._ptr[events.data_ptr()] = "input"

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.hooked:
            return
        self._ptr = {}
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and torch.is_tensor(batch[1]):
            events, labels = batch[0], batch[1]
            self._samples += int(labels.shape[0])
            if torch.is_tensor(events) and events.dim() == 5:  # [T, B, C, H, W]
                self._timesteps = int(events.shape[0])
        elif torch.is_tensor(batch) and batch.dim() == 5:
            self._samples += int(batch.shape[1])
            self._timesteps = int(batch.shape[0])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.hooked:
            return
        self._remove_hooks()
        stats = self._compute(trainer, pl_module)
        self._reset()
        if stats is None:
            return
        self.last = stats
        if self.log_layers:
            for layer in stats["layers"]:
                pl_module.log(f"spikes/{layer['name']}", layer["rate"], on_epoch=True, sync_dist=False)
        pl_module.log("spikes/mean_rate", stats["mean_rate"], on_epoch=True, sync_dist=False)
        pl_module.log("spikes/sops_per_sample", stats["sops_per_sample"], on_epoch=True, sync_dist=False)
        if trainer.is_global_zero:
            self._write(trainer, stats)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()  # an epoch that ended early must not leave hooks behind

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ numbers
    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        nodes, syn = list(self._nodes), list(self._syn)
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
        parts = [torch.as_tensor(self._samples, dtype=dtype)]
        for n in nodes:
            parts += [torch.as_tensor(v, dtype=dtype) for v in self._nodes[n]]
        for n in syn:
            a = self._syn[n]
            parts += [torch.as_tensor(a[k], dtype=dtype) for k in ("nnz", "nonbinary", "numel", "macs")]
        vec = torch.stack([p.to(pl_module.device) for p in parts])
        vec = trainer.strategy.reduce(vec, reduce_op="sum")  # counts of all ranks (identity on one device)
        v = vec.double().cpu().tolist()  # the only device sync of the epoch
        samples = v[0]
        if samples <= 0:
            return None
        t = self._timesteps
        layers, total_spikes, total_elements = [], 0.0, 0.0
        for i, n in enumerate(nodes):
            spikes, elements = v[1 + 2 * i], v[2 + 2 * i]
            if elements <= 0:
                continue
            total_spikes += spikes
            total_elements += elements
            layers.append({"name": n, "rate": spikes / elements, "spikes_per_sample": spikes / samples,
                           "neurons": int(round(elements / samples / t)) if t else None})
        if not layers:
            return None
        base = 1 + 2 * len(nodes)
        synapses, sops, dense = [], 0.0, 0.0
        for j, n in enumerate(syn):
            nnz, nonbinary, numel, macs = v[base + 4 * j: base + 4 * j + 4]
            if numel <= 0:
                continue
            rate = nnz / numel
            macs_sample = macs / samples  # all time steps
            spiking = nonbinary == 0
            entry = {"name": n, "input_from": sorted(self._syn[n]["sources"]), "spiking_input": spiking,
                     "input_rate": rate, "macs_per_sample_step": macs_sample / t if t else None,
                     "sops_per_sample": rate * macs_sample if spiking else 0.0,
                     "dense_macs_per_sample": 0.0 if spiking else macs_sample}
            sops += entry["sops_per_sample"]
            dense += entry["dense_macs_per_sample"]
            synapses.append(entry)
        return {
            "stage": trainer.state.fn.value if trainer.state.fn else None,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "samples": int(samples),
            "timesteps": t,
            "mean_rate": total_spikes / total_elements,
            "sops_per_sample": sops,
            "dense_macs_per_sample": dense,
            "formula": "SOPs/sample = sum over conv/linear layers with binary input of "
                       "input_rate * MACs(per sample, per time step) * T",
            "layers": layers,
            "synapses": synapses,
        }

    def _write(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        out = _output_dir(trainer, self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / self.filename, stats)
        if not self.plot:
            return
        from i2e_train.plots import plot_spike_rates

        png = plot_spike_rates({layer["name"]: layer["rate"] for layer in stats["layers"]}, out / self.plot_filename,
                               mean_rate=stats["mean_rate"],
                               title=f"firing rate per layer (epoch {stats['epoch']}, "
                                     f"{stats['sops_per_sample'] / 1e6:.2f} M SOPs/sample)")
        wb = find_wandb_logger(trainer)
        if wb is not None:
            wb.log_image("plots/spike_rates", [str(png)], step=trainer.global_step)


class EventMediaLogger(Callback):
    """Validation samples as event-stream animations and the confusion matrix, to wandb.

    Only active when a ``WandbLogger`` is attached (otherwise it does nothing, not even
    keep a batch). The first ``num_samples`` samples of the first validation batch become GIF
    videos (``media/val_events``: one frame per time step, ON red / OFF blue, drawn by
    :func:`i2e_train.viz.event_frames`, ``fps`` frames per second) captioned with the label and
    the prediction; the confusion matrix of the epoch (``pl_module.last_confusion``) is drawn by
    :func:`i2e_train.plots.plot_confusion` (``media/confusion_matrix``). Every
    ``every_n_epochs`` validation epochs, on rank 0, never during the sanity check.
    """

    def __init__(self, num_samples: int = 4, fps: float = 4.0, min_side: int = 128, confusion: bool = True,
                 every_n_epochs: int = 1) -> None:
        self.num_samples = int(num_samples)
        self.fps = float(fps)
        self.min_side = int(min_side)
        self.confusion = bool(confusion)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self._events: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._preds: torch.Tensor | None = None
        self._hook = None

    def _active(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking or find_wandb_logger(trainer) is None:
            return False
        if trainer.state.fn is not None and trainer.state.fn.value == "fit":
            return trainer.current_epoch % self.every_n_epochs == 0
        return True

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or self.num_samples <= 0 or not self._active(trainer):
            return
        n = self.num_samples

        def grab(module, inputs, output):
            if torch.is_tensor(output) and output.dim() == 2 and self._preds is None:
                self._preds = output[:n].detach().argmax(-1).cpu()

        self._preds = None
        self._hook = pl_module.register_forward_hook(grab)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if batch_idx != 0 or dataloader_idx != 0 or self.num_samples <= 0 or not self._active(trainer):
            return
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and torch.is_tensor(batch[0]) and batch[0].dim() == 5:
            self._events = batch[0][:, : self.num_samples].detach().cpu()  # [T, n, C, H, W]
            self._labels = batch[1][: self.num_samples].detach().cpu()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            if self._active(trainer) and trainer.is_global_zero:
                self._log(trainer, pl_module)
        finally:
            self._events = self._labels = self._preds = None

    def _gif(self, events: torch.Tensor) -> io.BytesIO:
        from PIL import Image

        from i2e_train.viz import event_frames

        frames = event_frames(events > 0, scale=None, min_side=self.min_side)  # [T, H, W, 3] uint8
        images = [Image.fromarray(f).convert("P", palette=Image.ADAPTIVE, colors=16) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000 / self.fps)), loop=0)
        buf.seek(0)
        return buf

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import numpy as np
        import wandb
        from PIL import Image

        wb = find_wandb_logger(trainer)
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        names = list(names) if names else None

        def label(i: int) -> str:
            return names[i] if names and 0 <= i < len(names) else str(i)

        media: dict[str, Any] = {}
        if self._events is not None and self._events.shape[2] == 2:
            videos = []
            for k in range(self._events.shape[1]):
                caption = f"label {label(int(self._labels[k]))}"
                if self._preds is not None and k < len(self._preds):
                    caption += f" | predicted {label(int(self._preds[k]))}"
                videos.append(wandb.Video(self._gif(self._events[:, k]), caption=caption, format="gif"))
            media["media/val_events"] = videos
        elif self._events is not None:
            log.info("EventMediaLogger: events have %d channels (expected ON/OFF = 2): no animation",
                     self._events.shape[2])
        cm = getattr(pl_module, "last_confusion", None)
        if self.confusion and cm is not None:
            import tempfile

            from i2e_train.plots import plot_confusion

            with tempfile.TemporaryDirectory() as tmp:
                png = plot_confusion(np.asarray(cm), Path(tmp) / "confusion.png", class_names=names,
                                     title=f"validation, epoch {trainer.current_epoch}")
                with Image.open(png) as im:
                    media["media/confusion_matrix"] = wandb.Image(np.asarray(im.convert("RGB")))
        if media:
            wb.log_metrics(media, step=trainer.global_step)


class LearningCurves(Callback):
    """At the end of fit (rank 0): ``<output_dir>/learning_curves.png`` (train / validation loss
    and top-1 per epoch) drawn from the ``CSVLogger``'s ``metrics.csv``; also logged to wandb
    (``plots/learning_curves``) when attached. Does nothing without a CSV logger."""

    def __init__(self, output_dir: str | Path | None = None, filename: str = "learning_curves.png") -> None:
        self.output_dir = output_dir
        self.filename = filename

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.loggers import CSVLogger

        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            log.info("LearningCurves: no CSV logger attached (logger=csv or logger=many): no learning curves")
            return
        csv_logger.save()  # flush what is buffered
        metrics = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics.is_file():
            return
        from i2e_train.plots import plot_learning_curves

        png = plot_learning_curves(metrics, _output_dir(trainer, self.output_dir) / self.filename)
        log.info("learning curves: %s", png)
        wb = find_wandb_logger(trainer)
        if wb is not None:
            wb.log_image("plots/learning_curves", [str(png)], step=trainer.global_step)


class RunInfo(Callback):
    """At the start of fit, send every logger the run's facts as hyper-parameters:

    * the full resolved config (``pl_module.run_config``, set by ``i2e-train``; the module's
      ``hparams`` otherwise) -- model, data (resolution, T, batch size, encoder...), optimiser...;
    * ``params``: total / trainable / frozen parameter counts of the network;
    * ``hardware``: CPU and GPU names, device counts, torch / CUDA / cuDNN / Lightning /
      SpikingJelly versions, accelerator, strategy and precision.

    wandb gets them in the run config and the counts / hardware in the run summary too
    (``params/*``, ``hardware/*``); CSV writes ``hparams.yaml``, TensorBoard its hparams tab.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from i2e_train.tracking import hardware_info, parameter_counts

        if not trainer.loggers:
            return
        config = getattr(pl_module, "run_config", None)
        if config is None:
            config = dict(pl_module.hparams)
        model = getattr(pl_module, "model", pl_module)
        params = parameter_counts(model)
        hardware = hardware_info(trainer)
        facts = {**config, "params": params, "hardware": hardware}
        for lg in trainer.loggers:
            lg.log_hyperparams(facts)
        wb = find_wandb_logger(trainer)
        if wb is not None and trainer.is_global_zero:
            summary = {f"params/{k}": v for k, v in params.items()}
            summary.update({f"hardware/{k}": v for k, v in hardware.items()})
            wb.experiment.summary.update(summary)
