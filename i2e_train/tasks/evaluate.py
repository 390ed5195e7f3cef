"""Evaluation as a library call: a checkpoint (ours, official, safetensors or released) on the
validation split of its data.

Writes to the run folder: metrics.json (top-1, top-5, loss, mean firing rate, SOPs per sample,
checkpoint), confusion_matrix.json, confusion_matrix.png, and the firing rate of every spiking
layer with the synaptic operations per sample (spike_stats.json, spike_rates.png; see
[`SpikeStats`][i2e_train.callbacks.SpikeStats]). A checkpoint written by ``i2e-train`` carries its model and data config,
which are used unless chosen on the command line; a released weight picks its own model and data
config (`released_overrides`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from i2e_train.callbacks import SpikeStats
from i2e_train.files import atomic_write_json
from i2e_train.tasks.train import make_trainer

log = logging.getLogger(__name__)

__all__ = ["evaluate", "evaluate_from_overrides", "latest_checkpoint", "released_overrides"]


def latest_checkpoint(log_dir: str | Path) -> Path:
    """Best checkpoint of the most recent `i2e-train` run under ``log_dir``."""
    runs = sorted(Path(log_dir).glob("train/runs/*/checkpoints"), key=lambda p: p.stat().st_mtime)
    for ckpt_dir in reversed(runs):
        best = sorted(ckpt_dir.glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            return best[-1]
    raise FileNotFoundError(
        f"ckpt_path=latest: no checkpoint found under {Path(log_dir) / 'train/runs'}; run i2e-train first "
        "or pass ckpt_path=<file> / ckpt_path=released:<name>"
    )


def _stored_config(path: Path) -> dict | None:
    """The run config an i2e-train checkpoint carries (None for foreign checkpoints). Read as every
    checkpoint is (`load_torch_file`: nothing in it runs)."""
    from i2e_train.models.checkpoint import load_torch_file

    if path.suffix != ".ckpt":
        return None
    ckpt = load_torch_file(path)
    return ckpt.get("i2e_config") if isinstance(ckpt, dict) else None


def _merge_stored(cfg: DictConfig, stored: dict, overrides: Sequence[str]) -> DictConfig:
    """Model and data from the checkpoint's config unless chosen on the command line; a command
    line value inside them (``data.path=...``, ``model.tau=3.0``) replaces the stored one at its
    own key (its value as composed, so typed as Hydra typed it)."""
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for group in ("model", "data"):
        if group in chosen or group not in stored:
            continue
        base = OmegaConf.create(stored[group])
        if group == "data":
            _earlier_recipe_preprocessing(base)
        for o in overrides:
            key = o.split("=", 1)[0]
            name = key.lstrip("+~")
            if not name.startswith(group + "."):
                continue
            inner = name[len(group) + 1:]
            if key.startswith("~"):
                parent, _, leaf = inner.rpartition(".")
                node = OmegaConf.select(base, parent) if parent else base
                if isinstance(node, DictConfig) and leaf in node:
                    node.pop(leaf)
            else:
                OmegaConf.update(base, inner, OmegaConf.select(cfg, name), force_add=True)
        cfg[group] = base
    cfg.module.num_classes = cfg.data.num_classes
    return cfg


def _earlier_recipe_preprocessing(data: DictConfig) -> None:
    """An online-mode run made before the recipe audit stored no ``interpolation``: its images
    were resized with PIL bicubic, so it is evaluated that way (docs/recipes.md)."""
    if str(data.get("_target_", "")).endswith("ImageDataModule") and "interpolation" not in data:
        log.info("checkpoint from before the recipe audit: data.interpolation=pil_bicubic (its training preprocessing)")
        data.interpolation = "pil_bicubic"


def _write_results(cfg: DictConfig, module, source: str, metrics: dict[str, float]) -> dict[str, Any]:
    from i2e_train.plots import plot_confusion

    out_dir = Path(cfg.paths.output_dir)
    result = {"checkpoint": source, "data": cfg.data.name, "model": cfg.model.name, **metrics}
    atomic_write_json(out_dir / "metrics.json", result)
    if module.last_confusion is not None:
        cm = module.last_confusion.tolist()
        atomic_write_json(out_dir / "confusion_matrix.json", cm, indent=None)
        plot_confusion(cm, out_dir / "confusion_matrix.png", title=f"{cfg.data.name}: {Path(source).name}")
    print(f"checkpoint: {source}\nvalidation top-1: {100 * metrics['val/top1']:.2f}%  "
          f"top-5: {100 * metrics['val/top5']:.2f}%  loss: {metrics['val/loss']:.4f}\nresults: {out_dir}")
    return result


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Validate ``cfg.ckpt_path`` on ``cfg.data``; ``overrides`` are the command line's (they win
    over the model / data config stored in an i2e-train checkpoint)."""
    from i2e_train.models import load_checkpoint

    L.seed_everything(cfg.seed, workers=True)
    source = str(cfg.ckpt_path)
    if source == "latest":
        source = str(latest_checkpoint(cfg.paths.log_dir))
    if not source.startswith("released:"):
        stored = _stored_config(Path(source))
        if stored is not None:
            cfg = _merge_stored(cfg, stored, overrides)
    from i2e_train.tasks.checks import check_train_config

    check_train_config(cfg)
    log.info("evaluating %s", source)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    log.info("loaded: %s", load_checkpoint(model, source, cache_dir=cfg.paths.checkpoint_dir))
    module = instantiate(cfg.module, model=model)
    # firing rates and SOPs per sample of this checkpoint on this data: spike_stats.json, spike_rates.png
    spikes = SpikeStats(output_dir=cfg.paths.output_dir, log_layers=False)
    trainer: L.Trainer = make_trainer(cfg.trainer, logger=False, callbacks=[spikes], enable_checkpointing=False)
    res = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return _write_results(cfg, module, source, {k: float(v) for k, v in res.items()})


def released_overrides(source: str, overrides: Sequence[str]) -> list[str]:
    """`model=` and `data=` for a released weight, unless chosen on the command line."""
    from i2e_train.models.released import find_released

    info = find_released(source)
    if info is None:
        return []
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = []
    if "model" not in chosen:
        extra.append(f"model={info.model}")
    if "data" not in chosen:
        extra.append(f"data={info.data_config}")
    return extra


def evaluate_from_overrides(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """[`evaluate`][i2e_train.tasks.evaluate.evaluate] for a config composed from ``overrides``; a released weight recomposes it
    with its own model and data config first."""
    from i2e_train.config import compose

    if str(cfg.ckpt_path).startswith("released:"):
        extra = released_overrides(str(cfg.ckpt_path), overrides)
        if extra:
            cfg = compose("eval", list(overrides) + extra)
    return evaluate(cfg, overrides=overrides)
