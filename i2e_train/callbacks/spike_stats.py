"""Firing rate of every spiking layer and synaptic operations per sample, on the validation set."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from i2e_train.files import atomic_write_json
from i2e_train.tracking import find_wandb_logger

__all__ = ["SpikeStats", "spiking_layers"]

log = logging.getLogger(__name__)

_SYNAPSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

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
    """Firing rates and synaptic operations (SOPs) of a spiking network on the validation set.

    During every validation epoch (not the sanity check, not training) forward hooks are put on

    * every SpikingJelly neuron (``isinstance(m, BaseNode)``): its output spikes ``s`` are counted;
      the **firing rate** of layer ``l`` is ``r_l = sum(s) / numel(s)`` over all elements of the
      epoch (time steps, samples, channels and positions together), i.e. the fraction of
      neuron-timesteps that emit a spike;
    * every ``Conv1d/2d/3d`` and ``Linear`` (the synapses): the fraction of non-zero elements of
      its input ``x`` (``r_in = nnz(x) / numel(x)``) and its multiply-accumulates per call.

    The hooks are removed at the end of the epoch. With ``N`` validation samples and ``T`` time
    steps, the standard SNN estimate is used (input spikes times the operations each triggers):

    ```text
    SOPs/sample = sum over the synapses l with binary input of  r_in,l * MACs_l * T
    ```

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
