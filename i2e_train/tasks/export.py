"""Shareable results of a training run: safetensors weights and a small model card.

``export_run`` loads the best checkpoint's network weights, writes ``model.safetensors``
(loadable with ``load_checkpoint``) and ``MODEL_CARD.md`` + ``model_card.json`` describing the
architecture, classes, converter ratio and order, T, data config and metrics; every training run
calls it, and ``i2e-export format=safetensors`` for any checkpoint (`i2e_train.tasks.export_nir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from i2e_train.files import atomic_write_json, atomic_write_text

__all__ = ["model_card", "export_run"]


def model_card(cfg: DictConfig, metrics: Mapping[str, float], checkpoint: str) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    encoder = data.get("encoder") or {}
    ratio, order = encoder.get("ratio", data.get("ratio")), encoder.get("order", data.get("order"))
    if ratio is None and str(data.get("_target_", "")).endswith("I2EDataModule"):
        from i2e_train.data.catalog import (
            CATALOG,  # pre-converted data: the catalog's converter settings
        )

        info = CATALOG.get(data.get("name"))
        ratio, order = (info.ratio, info.order) if info is not None else (None, None)
    return {
        "architecture": cfg.model.name,
        "num_classes": int(cfg.data.num_classes),
        "input": "events [T, B, 2, H, W]",
        "timesteps": int(cfg.data.timesteps),
        "resolution": list(cfg.data.resolution),
        "converter_ratio": ratio,
        "converter_order": order,
        "data": data.get("name"),
        "data_config": data,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "checkpoint": checkpoint,
        "init_from": cfg.get("init_from"),
        "tags": list(cfg.get("tags") or []),
    }


def export_run(model: nn.Module, best_checkpoint: str, cfg: DictConfig, metrics: Mapping[str, float],
               out_dir: str | Path) -> tuple[Path, Path]:
    """Write <out_dir>/model.safetensors and MODEL_CARD.md (+ model_card.json) for the best weights."""
    from i2e_train.models import export_safetensors, load_checkpoint

    out_dir = Path(out_dir)
    load_checkpoint(model, best_checkpoint, trusted_config=cfg)  # this run's own checkpoint
    card = model_card(cfg, metrics, best_checkpoint)
    weights = export_safetensors(model, out_dir / "model.safetensors",
                                 {k: v for k, v in card.items() if k != "data_config"})
    atomic_write_json(out_dir / "model_card.json", card)
    lines = [
        f"# {card['architecture']} on {card['data']}",
        "",
        "Spiking MS-ResNet (I2E variant) trained with i2e-train.",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("architecture", "num_classes", "input", "timesteps", "resolution", "converter_ratio",
                "converter_order", "data", "init_from", "checkpoint"):
        lines.append(f"| {key} | {card[key]} |")
    for key, value in card["metrics"].items():
        lines.append(f"| {key} | {value:.4f} |")
    lines += ["", "Load it with:", "", "```python", "from i2e_train.models import create_model, load_checkpoint",
              f"model = create_model({card['architecture']!r}, num_classes={card['num_classes']})",
              'load_checkpoint(model, "model.safetensors")', "```", ""]
    return weights, atomic_write_text(out_dir / "MODEL_CARD.md", "\n".join(lines))
