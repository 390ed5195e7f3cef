"""`i2e-eval`: evaluate a checkpoint (ours, official, safetensors or released) on its data.

Writes to the run folder: metrics.json (top-1, top-5, loss, checkpoint), confusion_matrix.json
and confusion_matrix.png.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from i2e_train.cli._hydra import entry_point
from i2e_train.files import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["evaluate", "main", "latest_checkpoint"]


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
    """The run config an i2e-train checkpoint carries (None for foreign checkpoints)."""
    if path.suffix != ".ckpt":
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("i2e_config") if isinstance(ckpt, dict) else None


def _merge_stored(cfg: DictConfig, stored: dict, overrides: Sequence[str]) -> DictConfig:
    """Model and data from the checkpoint's config unless chosen on the command line."""
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for group in ("model", "data"):
        if group in chosen or group not in stored:
            continue
        base = OmegaConf.create(stored[group])
        dotted = [o for o in overrides if o.lstrip("+~").startswith(group + ".")]
        cfg[group] = OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in dotted]))
    cfg.module.num_classes = cfg.data.num_classes
    return cfg


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from i2e_train.models import load_checkpoint
    from i2e_train.plots import plot_confusion

    L.seed_everything(cfg.seed, workers=True)
    source = str(cfg.ckpt_path)
    if source == "latest":
        source = str(latest_checkpoint(cfg.paths.log_dir))
    if not source.startswith("released:"):
        stored = _stored_config(Path(source))
        if stored is not None:
            cfg = _merge_stored(cfg, stored, overrides)
    log.info("evaluating %s", source)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    report = load_checkpoint(model, source, cache_dir=cfg.paths.checkpoint_dir)
    log.info("loaded: %s", report)
    module = instantiate(cfg.module, model=model)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    res = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in res.items()}
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": source, "data": cfg.data.name, "model": cfg.model.name, **metrics}
    atomic_write_json(out_dir / "metrics.json", result)
    if module.last_confusion is not None:
        cm = module.last_confusion.tolist()
        atomic_write_json(out_dir / "confusion_matrix.json", cm, indent=None)
        plot_confusion(cm, out_dir / "confusion_matrix.png", title=f"{cfg.data.name}: {Path(source).name}")
    print(f"checkpoint: {source}\nvalidation top-1: {100 * metrics['val/top1']:.2f}%  "
          f"top-5: {100 * metrics['val/top5']:.2f}%  loss: {metrics['val/loss']:.4f}\nresults: {out_dir}")
    return result


# Data config (configs/data/<name>.yaml) on which each released model is evaluated: models fed
# by the converter are evaluated on the released I2E validation data (converted in eval mode).
RELEASED_DATA = {"I2E-CIFAR10": "i2e_cifar10", "I2E-CIFAR100": "i2e_cifar100",
                 "I2E-ImageNet": "i2e_imagenet", "CIFAR10-DVS": "cifar10dvs"}


def released_overrides(source: str, overrides: Sequence[str]) -> list[str]:
    """`model=` and `data=` for a released weight, unless chosen on the command line."""
    from i2e_train.models.pretrained import find_released

    info = find_released(source)
    if info is None:
        return []
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = []
    if "model" not in chosen:
        extra.append(f"model={info.model}")
    if "data" not in chosen:
        extra.append(f"data={RELEASED_DATA[info.dataset]}")
    return extra


@entry_point("eval")
def main(cfg: DictConfig) -> float:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    if str(cfg.ckpt_path).startswith("released:"):
        extra = released_overrides(str(cfg.ckpt_path), overrides)
        if extra:
            cfg = hydra.compose(config_name="eval", overrides=overrides + extra)
    result = evaluate(cfg, overrides=overrides)
    return result["val/top1"]


if __name__ == "__main__":
    main()
