"""The run's facts (config, parameter counts, hardware) sent to every logger at the start of fit."""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer

from i2e_train.tracking import find_wandb_logger

__all__ = ["RunInfo"]

log = logging.getLogger(__name__)


class RunInfo(Callback):
    """At the start of fit, send every logger the run's facts as hyper-parameters:

    * the full resolved config (``pl_module.run_config``, set by ``i2e-train``; the module's
      ``hparams`` otherwise) -- model, data (resolution, T, batch size, encoder...), optimiser...;
    * ``params``: total / trainable / frozen parameter counts of the network;
    * ``hardware``: CPU and GPU names, device counts, torch / CUDA / cuDNN / Lightning /
      SpikingJelly versions, accelerator, strategy and precision, and ``neuron_backends``: the
      implementation that trains each neuron type (``{"LIFNode": "triton"}``; a CUDA run on
      SpikingJelly's torch reference is also warned about in the log, logger or not).

    wandb gets them in the run config and the counts / hardware in the run summary too
    (``params/*``, ``hardware/*``); CSV writes ``hparams.yaml``, TensorBoard its hparams tab.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from i2e_train.tracking import hardware_info, lif_backends, parameter_counts, torch_reference_warning

        model = getattr(pl_module, "model", pl_module)
        backends = lif_backends(model, pl_module.device)
        warning = torch_reference_warning(backends, pl_module.device)
        if warning is not None:
            log.warning(warning)
        if not trainer.loggers:
            return
        config = getattr(pl_module, "run_config", None)
        if config is None:
            config = dict(pl_module.hparams)
        params = parameter_counts(model)
        hardware = {**hardware_info(trainer), "neuron_backends": backends}
        facts = {**config, "params": params, "hardware": hardware}
        for lg in trainer.loggers:
            lg.log_hyperparams(facts)
        wb = find_wandb_logger(trainer)
        if wb is not None and trainer.is_global_zero:
            summary = {f"params/{k}": v for k, v in params.items()}
            summary.update({f"hardware/{k}": v for k, v in hardware.items()})
            wb.experiment.summary.update(summary)
