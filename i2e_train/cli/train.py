"""`i2e-train`: compose the config, build data, model and trainer, fit, validate the best."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from i2e_train.cli._hydra import entry_point
from i2e_train.files import atomic_write_json
from i2e_train.pipeline import state_digest
from i2e_train.recovery import recovery_callbacks

log = logging.getLogger(__name__)

__all__ = ["train", "main", "build_module"]


def build_module(cfg: DictConfig, with_optim: bool = True):
    """Model (with its initial weights) wrapped in the SNNClassifier described by ``cfg``."""
    from i2e_train.models import load_checkpoint

    model = instantiate(cfg.model)
    if cfg.get("init_from"):
        report = load_checkpoint(model, cfg.init_from, replace_head=bool(cfg.get("replace_head", False)),
                                 cache_dir=cfg.paths.checkpoint_dir)
        log.info("initial weights: %s", report)
    kwargs: dict[str, Any] = {}
    if with_optim:
        kwargs["optimizer"] = instantiate(cfg.optim)
        kwargs["scheduler"] = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(cfg.module, model=model, **kwargs)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint
    return module


def _instantiate_group(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def _resume_path(cfg: DictConfig) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if ckpt != "last":
        return ckpt
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("ckpt_path=last but %s does not exist yet: starting a fresh run", last)
    return None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final metrics (floats) and the best checkpoint path."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    init_digest = state_digest(module.model.state_dict())  # proves which weights a run started from
    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses an LR monitor without a logger; nothing to monitor into
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    callbacks = recovery_callbacks(out_dir) + callbacks  # exact resume (RNG), NaN/Inf stop, bad_records.json
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    result: dict[str, Any] = {"best_checkpoint": best, "fit": metrics, "init_digest": init_digest}
    if cfg.get("eval_after_fit") and best and not trainer.fast_dev_run:
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        result["best"] = {k: float(v) for k, v in val[0].items()}
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        if "best" in result:  # shareable weights + model card of the best checkpoint
            from i2e_train.export import export_run

            result["weights"] = str(export_run(module.model, best, cfg, result["best"], out_dir)[0])
        atomic_write_json(out_dir / "metrics.json", result)
        if "best" in result:
            top1 = result["best"].get("val/top1")
            log.info("best checkpoint %s: val/top1 = %.4f", best, top1)
            print(f"best checkpoint: {best}\nvalidation top-1 of the best checkpoint: {100 * top1:.2f}%")
    return result


@entry_point("train")
def main(cfg: DictConfig) -> float | None:
    from i2e_train.sweeps import in_multirun, record_failure
    from i2e_train.tracking import finish_wandb

    try:
        result = train(cfg)
    except Exception as err:
        finish_wandb(exit_code=1)
        if not in_multirun():
            raise
        # One failed trial must not end a sweep: error.txt in the trial folder, and None, which
        # the Optuna sweeper records as a FAIL trial (a NaN would abort the whole sweep).
        from hydra.core.hydra_config import HydraConfig

        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        record_failure(HydraConfig.get().runtime.output_dir, err, overrides)
        return None
    finish_wandb()  # the next job of a multirun starts its own wandb run
    metric = cfg.get("optimized_metric")
    value = result.get("best", result["fit"]).get(metric) if metric else None
    return value


if __name__ == "__main__":
    main()
