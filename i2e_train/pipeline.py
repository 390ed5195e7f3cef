"""Multi-stage recipes: run training stages in order, feeding checkpoints forward.

A pipeline config (configs/pipeline/*.yaml) lists named stages, each a set of `i2e-train`
overrides (typically one `experiment=...`), optionally `init_from: <earlier stage name>` (that
stage's best checkpoint) or any checkpoint path / released:<name>. The run folder holds one
sub-folder per stage and `pipeline.json`, which records what each stage ran and which
checkpoint fed which stage. A stage that finished (its `stage.json` exists) is skipped on
re-run; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig

from i2e_train.files import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["run_pipeline", "state_digest"]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of a state dict's tensors (order independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(str(v.dtype).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_pipeline(
    cfg: DictConfig,
    compose: Callable[[str, Sequence[str]], DictConfig],
    train: Callable[[DictConfig], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``cfg.pipeline.stages`` in order; ``compose(config_name, overrides)`` builds each stage."""
    if train is None:
        from i2e_train.cli.train import train
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "pipeline.json"
    manifest: dict[str, Any] = {"pipeline": cfg.pipeline.name, "stages": {}}
    stages = cfg.pipeline.stages
    if not stages:
        raise ValueError(f"pipeline {cfg.pipeline.name!r} has no stages")
    for name, stage in stages.items():
        stage_dir = run_dir / name
        done = stage_dir / "stage.json"
        if done.is_file():
            record = json.loads(done.read_text())
            record["skipped"] = True
            manifest["stages"][name] = record
            log.info("stage %s finished earlier: skipped (%s)", name, record.get("best_checkpoint"))
            continue
        overrides = list(stage.get("overrides") or []) + list(cfg.get("common_overrides") or [])
        init = stage.get("init_from")
        init_path = None
        if init:
            if init in manifest["stages"]:
                init_path = manifest["stages"][init]["best_checkpoint"]
                if not init_path:
                    raise RuntimeError(f"stage {name!r} starts from stage {init!r}, which saved no checkpoint")
            elif init in stages:
                raise ValueError(f"stage {name!r} starts from stage {init!r}, which comes later in the pipeline")
            else:
                init_path = str(init)
            overrides.append(f"init_from={_quote(init_path)}")
            overrides.append(f"replace_head={str(bool(stage.get('replace_head', False))).lower()}")
        overrides += [f"paths.output_dir={_quote(str(stage_dir))}", f"task_name={name}", "ckpt_path=last"]
        log.info("stage %s: i2e-train %s", name, " ".join(overrides))
        stage_cfg = compose("train", overrides)
        result = train(stage_cfg)
        record = {
            "overrides": overrides,
            "init_from": init_path,
            "init_from_stage": init if init in manifest["stages"] else None,
            "init_digest": result.get("init_digest"),
            "best_checkpoint": result.get("best_checkpoint"),
            "metrics": result.get("best", result.get("fit")),
            "skipped": False,
        }
        atomic_write_json(done, record)
        manifest["stages"][name] = record
        atomic_write_json(manifest_path, manifest)
    atomic_write_json(manifest_path, manifest)
    return manifest
