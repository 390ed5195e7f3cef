"""Evaluation as a library call: a checkpoint (ours, official, safetensors or released) on the
validation split of its data.

Writes to the run folder: metrics.json (top-1, top-5, loss, mean firing rate, SOPs per sample,
checkpoint), confusion_matrix.json, confusion_matrix.png, and the firing rate of every spiking
layer with the synaptic operations per sample (spike_stats.json, spike_rates.png; see
[`SpikeStats`][i2e_train.callbacks.SpikeStats]). A checkpoint written by ``i2e-train`` carries
its model and data config, which are used unless chosen on the command line, once they pass
`check_stored_config` (and with this machine's paths: where data is read and cached is never the
checkpoint's); a released weight picks its own model and data config (`released_overrides`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from i2e_train.callbacks import SpikeStats
from i2e_train.files import atomic_write_json
from i2e_train.tasks.train import make_trainer

log = logging.getLogger(__name__)

__all__ = ["evaluate", "evaluate_from_overrides", "check_eval_run", "checkpoint_config", "latest_checkpoint",
           "released_overrides"]


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


def _stored_config(path: Path, cfg: DictConfig) -> dict | None:
    """The run config an i2e-train checkpoint carries (None for foreign checkpoints). Read as every
    checkpoint is (`load_torch_file`: nothing in it runs, and the stored config is refused unless
    it passes `check_stored_config`)."""
    from i2e_train.models.checkpoint import load_torch_file

    if path.suffix != ".ckpt":
        return None
    ckpt = load_torch_file(path, trusted_config=cfg)
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
            _this_machines_paths(base, stored.get("paths") or {}, cfg)
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


def _this_machines_paths(data: DictConfig, stored_paths: dict, cfg: DictConfig) -> None:
    """Where data is found and cached comes from this run, never from the checkpoint: a stored
    value equal to one of the stored run's ``paths.*`` becomes this run's ``paths.*`` of that name
    (the data configs derive ``root``, ``source`` from them), ``data_dir`` (the caches written) is
    always this run's, and a stored ``cache_dir`` is dropped (the default: under the data's root)."""
    for key, value in OmegaConf.to_container(data, resolve=False).items():
        for name, old in stored_paths.items():
            if isinstance(value, str) and value == old and name != "output_dir" and name in cfg.paths:
                data[key] = cfg.paths[name]
    if "data_dir" in data:
        data.data_dir = cfg.paths.data_dir
    if data.get("cache_dir") is not None:
        data.cache_dir = None


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


def checkpoint_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[DictConfig, str]:
    """The config an evaluation runs and its checkpoint: ``latest`` found, an i2e-train
    checkpoint's stored model and data merged in (after `check_stored_config`),
    the values checked. Reads, writes nothing."""
    from i2e_train.tasks.checks import check_train_config, data_label

    source = str(cfg.ckpt_path)
    if source == "latest":
        source = str(latest_checkpoint(cfg.paths.log_dir))
    if not source.startswith("released:"):
        stored = _stored_config(Path(source), cfg)
        if stored is not None:
            cfg = _merge_stored(cfg, stored, overrides)
    check_train_config(cfg)
    classes, data_classes = cfg.model.get("num_classes"), cfg.data.get("num_classes")
    if classes is not None and data_classes is not None and int(classes) != int(data_classes):
        raise ValueError(f"ckpt_path={source}: the model has {int(classes)} classes, the data evaluated here "
                         f"({data_label(cfg.data)}) {int(data_classes)}; evaluate a checkpoint on the data it was "
                         "trained for (an i2e-train checkpoint: leave data= out, its own data config is used)")
    return cfg, source


def _load(cfg: DictConfig, model, source: str):
    """The checkpoint's weights in ``model``; a classifier of another class count is one line
    (replacing it would evaluate a random classifier)."""
    from i2e_train.models import CheckpointMismatchError, load_checkpoint
    from i2e_train.tasks.checks import data_label

    try:
        return load_checkpoint(model, source, cache_dir=cfg.paths.checkpoint_dir, trusted_config=cfg)
    except CheckpointMismatchError as err:
        if not err.head_only:
            raise
        theirs, ours = err.checkpoint_info.get("num_classes"), cfg.data.num_classes
        raise ValueError(f"ckpt_path={source}: its classifier has {theirs} classes, the data evaluated here "
                         f"({data_label(cfg.data)}) {ours}; evaluate it on the data it was trained for "
                         f"(data=<config> with {theirs} classes)") from None


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Validate ``cfg.ckpt_path`` on ``cfg.data``; ``overrides`` are the command line's (they win
    over the model / data config stored in an i2e-train checkpoint)."""
    cfg, source = checkpoint_config(cfg, overrides)
    L.seed_everything(cfg.seed, workers=True)
    log.info("evaluating %s", source)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    log.info("loaded: %s", _load(cfg, model, source))
    module = instantiate(cfg.module, model=model)
    # firing rates and SOPs per sample of this checkpoint on this data: spike_stats.json, spike_rates.png
    spikes = SpikeStats(output_dir=cfg.paths.output_dir, log_layers=False)
    trainer: L.Trainer = make_trainer(cfg.trainer, logger=False, callbacks=[spikes], enable_checkpointing=False)
    res = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return _write_results(cfg, module, source, {k: float(v) for k, v in res.items()})


def check_eval_run(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """What `evaluate_from_overrides` checks before it writes anything (the entry point runs
    it before Hydra makes the run folder): the checkpoint found and read, its stored config
    checked, the values checked."""
    checkpoint_config(_with_released(cfg, overrides), overrides)


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


def _with_released(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg``, recomposed with a released weight's own model and data config when it names one."""
    from i2e_train.config import compose

    if str(cfg.ckpt_path).startswith("released:"):
        extra = released_overrides(str(cfg.ckpt_path), overrides)
        if extra:
            return compose("eval", list(overrides) + extra)
    return cfg


def evaluate_from_overrides(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """[`evaluate`][i2e_train.tasks.evaluate.evaluate] for a config composed from ``overrides``; a
    released weight recomposes it with its own model and data config first."""
    return evaluate(_with_released(cfg, overrides), overrides=overrides)
