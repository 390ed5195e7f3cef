"""Training as a library call: ``train(cfg)`` builds data, model and trainer from a composed
config, fits, validates the best checkpoint and writes the run's results.

``i2e-train`` (`i2e_train.cli.train`) only parses the command line and calls
`train_for_sweep`; the pipeline and the tests call [`train`][i2e_train.tasks.train.train] with configs composed by
[`i2e_train.config.compose`][i2e_train.config.compose].
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from i2e_train.files import atomic_write_json
from i2e_train.models.checkpoint import state_digest
from i2e_train.recovery import recovery_callbacks

log = logging.getLogger(__name__)

__all__ = ["train", "train_for_sweep", "build_module"]


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
    """The checkpoint to resume from, checked before Lightning reads it: it must be a readable
    checkpoint holding only tensors and plain values (read as Lightning will, ``weights_only=True``)."""
    from i2e_train.models.checkpoint import load_torch_file

    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(str(ckpt))
    state = load_torch_file(path)  # CheckpointFormatError naming the file: missing, text, truncated, refused
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise ValueError(f"ckpt_path={ckpt}: {path} is not a Lightning checkpoint of i2e-train (it resumes a run); "
                         "to start from its weights use init_from=<file> instead")
    log.info("resuming from %s", path)
    return str(path)


def _trainer(cfg: DictConfig, out_dir: Path) -> L.Trainer:
    """The Lightning Trainer of ``cfg`` with its loggers, callbacks and the recovery callbacks."""
    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses an LR monitor without a logger; nothing to monitor into
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    callbacks = recovery_callbacks(out_dir) + callbacks  # exact resume (RNG), NaN/Inf stop, bad_records.json
    return make_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def make_trainer(trainer_cfg: DictConfig, callbacks: list | None = None, **kwargs) -> L.Trainer:
    """``lightning.Trainer`` of a trainer config; its ``cuda_math`` block (gpu / ddp configs: the
    official scripts' cudnn.benchmark and TF32 settings) becomes a [`CudaMath`][i2e_train.callbacks.CudaMath]."""
    from i2e_train.callbacks import CudaMath

    tcfg = trainer_cfg.copy()
    OmegaConf.set_struct(tcfg, False)
    cuda_math = tcfg.pop("cuda_math", None)
    callbacks = list(callbacks or [])
    if cuda_math:
        callbacks.append(CudaMath(**OmegaConf.to_container(cuda_math, resolve=True)))
    return instantiate(tcfg, callbacks=callbacks, **kwargs)


def _write_results(cfg: DictConfig, module, result: dict[str, Any], out_dir: Path) -> None:
    """Rank 0: shareable weights + model card of the best checkpoint, and metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if "best" in result:
        from i2e_train.tasks.export import export_run

        result["weights"] = str(export_run(module.model, result["best_checkpoint"], cfg, result["best"], out_dir)[0])
    atomic_write_json(out_dir / "metrics.json", result)
    if "best" in result:
        top1 = result["best"].get("val/top1")
        log.info("best checkpoint %s: val/top1 = %.4f", result["best_checkpoint"], top1)
        print(f"best checkpoint: {result['best_checkpoint']}\nvalidation top-1 of the best checkpoint: "
              f"{100 * top1:.2f}%")


def _claim_folder(cfg: DictConfig, out_dir: Path) -> None:
    """Mark the (checked) run folder as running; ``overwrite=true`` first removes the earlier run's
    checkpoints and metrics, so nothing of it is mixed into this one."""
    from i2e_train.tasks.runs import mark_running

    if cfg.get("overwrite", False) and cfg.get("ckpt_path") != "last":
        for old in [*(out_dir / "checkpoints").glob("*.ckpt"), out_dir / "metrics.json"]:
            log.info("overwrite=true: removing %s of the earlier run", old)
            old.unlink(missing_ok=True)
    mark_running(out_dir)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final metrics (floats) and the best checkpoint path.

    Refused before anything is written: invalid config values (`i2e_train.tasks.checks`), a
    run folder holding another run, a checkpoint to resume that is missing or unreadable."""
    from i2e_train.tasks.checks import check_train_config
    from i2e_train.tasks.runs import check_run_folder, primary_process, unmark_running

    check_train_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    primary = primary_process()
    if primary:
        check_run_folder(out_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
    resume = _resume_path(cfg)
    if primary:
        _claim_folder(cfg, out_dir)
    try:
        return _train(cfg, out_dir, resume)
    finally:
        if primary:
            unmark_running(out_dir)


def _train(cfg: DictConfig, out_dir: Path, resume: str | None) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    init_digest = state_digest(module.model.state_dict())  # proves which weights a run started from
    trainer = _trainer(cfg, out_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    result: dict[str, Any] = {"best_checkpoint": best, "fit": metrics, "init_digest": init_digest}
    if cfg.get("eval_after_fit") and best and not trainer.fast_dev_run:
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        result["best"] = {k: float(v) for k, v in val[0].items()}
    if trainer.is_global_zero:
        _write_results(cfg, module, result, out_dir)
    return result


def train_for_sweep(cfg: DictConfig) -> float | None:
    """[`train`][i2e_train.tasks.train.train], returning ``cfg.optimized_metric`` (the value a sweeper optimises).

    Inside a multirun a failing job writes ``error.txt`` to its folder, says so on stderr and
    returns None, which the Optuna sweeper records as a FAIL trial, so one failed trial does not
    end a sweep (its folder has no ``metrics.json``: tests/test_all_experiments.py checks both).
    """
    from i2e_train.sweeps import in_multirun, record_failure
    from i2e_train.tracking import finish_wandb

    try:
        result = train(cfg)
    except Exception as err:
        finish_wandb(exit_code=1)
        if not in_multirun():
            raise
        from hydra.core.hydra_config import HydraConfig

        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        path = record_failure(HydraConfig.get().runtime.output_dir, err, overrides)
        print(f"i2e-train: job {HydraConfig.get().job.num} failed: {type(err).__name__}: {err} (traceback in {path}); "
              "the sweep goes on", file=sys.stderr, flush=True)
        return None
    finish_wandb()  # the next job of a multirun starts its own wandb run
    metric = cfg.get("optimized_metric")
    return result.get("best", result["fit"]).get(metric) if metric else None
