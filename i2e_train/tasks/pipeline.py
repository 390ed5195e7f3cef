"""Multi-stage recipes: run training stages in order, feeding checkpoints forward.

A pipeline config (configs/pipeline/*.yaml) lists named stages, each a set of `i2e-train`
overrides (typically one `experiment=...`), optionally `init_from: <earlier stage name>` (that
stage's best checkpoint) or any checkpoint path / released:<name>. The run folder holds one
sub-folder per stage and `pipeline.json`, which records what each stage ran and which
checkpoint fed which stage. A stage that finished (its `stage.json` exists) is skipped on
re-run; an interrupted one resumes from its last checkpoint. Every stage is checked before the
first one runs (`check_pipeline`); a `stage.json` is read back as data, checked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from i2e_train.files import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["run_pipeline", "check_pipeline"]


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _init_path(name: str, stage: DictConfig, stages: DictConfig, done: dict[str, Any]) -> str | None:
    """The checkpoint stage ``name`` starts from: an earlier stage's best, a path, or None."""
    init = stage.get("init_from")
    if not init:
        return None
    if init in done:
        if not done[init]["best_checkpoint"]:
            raise RuntimeError(f"stage {name!r} starts from stage {init!r}, which saved no checkpoint")
        return done[init]["best_checkpoint"]
    if init in stages:
        raise ValueError(f"stage {name!r} starts from stage {init!r}, which comes later in the pipeline")
    return str(init)


def _stage_overrides(cfg: DictConfig, name: str, stage: DictConfig, init_path: str | None, stage_dir: Path
                     ) -> list[str]:
    """The ``i2e-train`` overrides of one stage: its own, the common ones, its initial weights
    and its fixed run folder (a re-run resumes it from ``last.ckpt`` when there is one)."""
    overrides = list(stage.get("overrides") or []) + list(cfg.get("common_overrides") or [])
    if init_path is not None:
        overrides.append(f"init_from={_quote(init_path)}")
        overrides.append(f"replace_head={str(bool(stage.get('replace_head', False))).lower()}")
    resume = ["ckpt_path=last"] if (stage_dir / "checkpoints" / "last.ckpt").is_file() else []
    return overrides + [f"paths.output_dir={_quote(str(stage_dir))}", f"task_name={name}", *resume]


def _run_stage(cfg: DictConfig, name: str, stage: DictConfig, done: dict[str, Any], run_dir: Path,
               train: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    from i2e_train.config import compose

    init_path = _init_path(name, stage, cfg.pipeline.stages, done)
    overrides = _stage_overrides(cfg, name, stage, init_path, run_dir / name)
    log.info("stage %s: i2e-train %s", name, " ".join(overrides))
    result = train(compose("train", overrides))
    record = {
        "overrides": overrides,
        "init_from": init_path,
        "init_from_stage": stage.get("init_from") if stage.get("init_from") in done else None,
        "init_digest": result.get("init_digest"),
        "best_checkpoint": result.get("best_checkpoint"),
        "metrics": result.get("best", result.get("fit")),
        "skipped": False,
    }
    atomic_write_json(run_dir / name / "stage.json", record)
    return record


# stage.json: what a finished stage ran and where its best checkpoint is (read back on a re-run)
_STAGE_FIELDS = {"overrides": (list,), "init_from": (str, type(None)), "init_from_stage": (str, type(None)),
                 "init_digest": (str, type(None)), "best_checkpoint": (str, type(None)),
                 "metrics": (dict, type(None)), "skipped": (bool,)}


def _finished_stage(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The record of a stage that finished earlier (None when it has not), checked as data: its
    keys and types (`read_record`), numbers as metrics, and a best
    checkpoint inside the stage's own folder (the next stage starts from it)."""
    from i2e_train.schema import StoredConfigError, read_record

    path = run_dir / name / "stage.json"
    record = read_record(path, _STAGE_FIELDS, f"run stage {name!r} again")
    if record is None:
        return None
    bad = [k for k, v in (record.get("metrics") or {}).items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    best = record.get("best_checkpoint")
    if bad or (best and not Path(best).resolve().is_relative_to((run_dir / name).resolve())):
        what = f"metrics {bad} are not numbers" if bad else f"best_checkpoint={best!r} is outside {run_dir / name}"
        raise StoredConfigError(f"{path}: {what}; delete it to run stage {name!r} again")
    return record


def check_pipeline(cfg: DictConfig) -> None:
    """Every stage checked before anything runs or is written (``i2e-pipeline`` runs this before
    Hydra makes the pipeline's folder; `run_pipeline` again): finished stages' records, and
    each other stage's composed ``train`` config, as `check_train_run`
    checks it (values, initial weights when a file, an interrupted stage's checkpoint)."""
    from i2e_train.config import compose
    from i2e_train.tasks.train import check_train_run

    stages, run_dir = cfg.pipeline.stages, Path(cfg.run_dir)
    if not stages:
        raise ValueError(f"pipeline {cfg.pipeline.name!r} has no stages")
    earlier: list[str] = []
    for name, stage in stages.items():
        init = stage.get("init_from")
        if init in stages and init not in earlier:
            raise ValueError(f"stage {name!r} starts from stage {init!r}, which comes later in the pipeline")
        earlier.append(name)
        if _finished_stage(run_dir, name) is not None:
            continue
        init_path = None if not init or init in stages else str(init)
        stage_dir = run_dir / name
        overrides = _stage_overrides(cfg, name, stage, init_path, stage_dir)
        if init in stages:  # that stage's best checkpoint, not there yet: read when this stage starts
            overrides.append("init_from=null")
        stage_cfg = compose("train", overrides)
        check_train_run(stage_cfg, stage_dir if stage_dir.is_dir() else None)


def run_pipeline(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``cfg.pipeline.stages`` in order; each stage is the ``train`` config composed from its
    overrides and run by ``train`` ([`i2e_train.tasks.train.train`][i2e_train.tasks.train.train] by
    default). Returns the manifest written to ``<run_dir>/pipeline.json``. Everything is checked
    first (`check_pipeline`)."""
    if train is None:
        from i2e_train.tasks.train import train
    check_pipeline(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"pipeline": cfg.pipeline.name, "stages": {}}
    for name, stage in cfg.pipeline.stages.items():
        finished = _finished_stage(run_dir, name)
        if finished is not None:
            record = dict(finished, skipped=True)
            log.info("stage %s finished earlier: skipped (%s)", name, record.get("best_checkpoint"))
        else:
            record = _run_stage(cfg, name, stage, manifest["stages"], run_dir, train)
        manifest["stages"][name] = record
        atomic_write_json(run_dir / "pipeline.json", manifest)
    return manifest


def report(manifest: dict[str, Any]) -> str:
    """One line per stage: done or skipped, its best checkpoint, where it started from."""
    lines = []
    for name, rec in manifest["stages"].items():
        state = "skipped (done earlier)" if rec.get("skipped") else "done"
        lines.append(f"{name}: {state}; best checkpoint {rec.get('best_checkpoint')}; init from {rec.get('init_from')}")
    return "\n".join(lines)
