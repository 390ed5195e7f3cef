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

__all__ = ["train", "train_for_sweep", "build_module", "check_train_run"]


def build_module(cfg: DictConfig, with_optim: bool = True):
    """Model (with its initial weights) wrapped in the SNNClassifier described by ``cfg``."""
    from i2e_train.models import load_checkpoint

    model = instantiate(cfg.model)
    if cfg.get("init_from"):
        report = load_checkpoint(model, cfg.init_from, replace_head=bool(cfg.get("replace_head", False)),
                                 cache_dir=cfg.paths.checkpoint_dir, trusted_config=cfg)
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


def _resume_path(cfg: DictConfig, output_dir: str | Path | None) -> str | None:
    """The checkpoint to resume from, checked before Lightning reads it: a readable checkpoint
    holding only tensors and plain values (read as Lightning will, ``weights_only=True``; its
    stored run config checked, `i2e_train.schema`), of a run of this run's model and classes."""
    from i2e_train.models.checkpoint import load_torch_file
    from i2e_train.models.errors import CheckpointDamagedError

    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last" and output_dir is None:
        raise ValueError("ckpt_path=last resumes a run folder: pass it as hydra.run.dir=<logs/train/runs/...>")
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(str(ckpt))
    try:
        state = load_torch_file(path, trusted_config=cfg)  # CheckpointFormatError naming the file: missing, text, ...
    except CheckpointDamagedError as err:
        raise type(err)(f"{err}{_earlier_checkpoint(path)}") from None
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise ValueError(f"ckpt_path={ckpt}: {path} is not a Lightning checkpoint of i2e-train (it resumes a run); "
                         "to start from its weights use init_from=<file> instead")
    _check_same_run(cfg, state, path)
    _check_callback_paths(state, path)
    log.info("resuming from %s", path)
    return str(path)


def _earlier_checkpoint(path: Path) -> str:
    """For a damaged checkpoint in a run folder: how to resume from the newest good one there."""
    others = sorted((p for p in path.parent.glob("epoch*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
    if not others:
        return ""
    run = path.parent.parent
    return (f". Resume from the run's newest epoch checkpoint instead: hydra.run.dir={run} "
            f"ckpt_path={others[-1]}")


def _check_same_run(cfg: DictConfig, state: dict, path: Path) -> None:
    """``ckpt_path`` continues the run the checkpoint was saved by: the same model and class count
    (else Lightning's strict load fails with a list of size mismatches)."""
    from i2e_train.tasks.checks import data_label

    stored = state.get("i2e_config") or {}
    fix = f"ckpt_path continues that run; to start a new one from its weights use init_from={path}"
    name, want = (stored.get("model") or {}).get("name"), cfg.model.get("name")
    if name and want and name != want:
        raise ValueError(f"ckpt_path={path}: the checkpoint is of model {name}, this run builds {want} "
                         f"(model=...); {fix}")
    classes, want = state.get("num_classes"), cfg.data.get("num_classes")
    if classes is not None and want is not None and int(classes) != int(want):
        raise ValueError(f"ckpt_path={path}: the checkpoint was trained for {int(classes)} classes, this run's data "
                         f"{data_label(cfg.data)} has {int(want)}; {fix} replace_head=true")


def _check_callback_paths(state: dict, path: Path) -> None:
    """On resume Lightning's ModelCheckpoint takes the checkpoint files its stored state names and
    later deletes the older ones: locally only inside its own folder, on a remote filesystem
    anywhere. So a resumed state may name local files only."""
    for name, cb in (state.get("callbacks") or {}).items():
        if not isinstance(cb, dict):
            continue
        named = [cb.get(k) for k in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path")]
        named += list(cb.get("best_k_models") or {})
        remote = [v for v in named if isinstance(v, str) and "://" in v]
        if remote:
            raise ValueError(f"ckpt_path={path}: refused: the state of its callback {name} names {remote[0]!r}, not a "
                             "local file (resuming would let Lightning delete it); resume from a checkpoint of your "
                             "own run")


def _check_init_from(cfg: DictConfig) -> None:
    """The initial weights, when a file, read now (before anything is written): missing, damaged
    and refused files are named here, not after the data is loaded."""
    from i2e_train.models.checkpoint import read_checkpoint
    from i2e_train.models.released import find_released

    init = cfg.get("init_from")
    if not init or find_released(str(init)) is not None:  # released: read from the cache or the hub when loaded
        return
    try:
        read_checkpoint(str(init), trusted_config=cfg)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"init_from={init}: {err}") from None


def check_train_run(cfg: DictConfig, output_dir: str | Path | None) -> str | None:
    """Everything a training run checks before it writes anything (the entry point runs it before
    Hydra makes the run folder; `train` again): the config values
    (`check_train_config`), the run folder when it exists, the
    checkpoint to resume and the initial weights. Returns the checkpoint to resume from."""
    from i2e_train.tasks.checks import check_train_config
    from i2e_train.tasks.runs import check_run_folder, primary_process

    check_train_config(cfg)
    if output_dir is not None and primary_process():
        check_run_folder(output_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
    resume = _resume_path(cfg, output_dir)
    _check_init_from(cfg)
    return resume


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
    if "enable_model_summary" not in tcfg and any(isinstance(c, L.pytorch.callbacks.ModelSummary) for c in callbacks):
        tcfg.enable_model_summary = False  # the callbacks print it; else Lightning says so on every run
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
    from i2e_train.tasks.runs import mark_running, resumes_in_place

    if cfg.get("overwrite", False) and not resumes_in_place(out_dir, cfg.get("ckpt_path")):
        for old in [*(out_dir / "checkpoints").glob("*.ckpt"), out_dir / "metrics.json"]:
            log.info("overwrite=true: removing %s of the earlier run", old)
            old.unlink(missing_ok=True)
    mark_running(out_dir)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final metrics (floats) and the best checkpoint path.

    Refused before anything is written (`check_train_run`): invalid config values, a run
    folder holding another run, a checkpoint to resume or initial weights that are missing,
    unreadable or refused."""
    from i2e_train.tasks.runs import primary_process, unmark_running

    out_dir = Path(cfg.paths.output_dir)
    primary = primary_process()
    resume = check_train_run(cfg, out_dir)
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
