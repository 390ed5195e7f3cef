"""Studies: one experiment or pipeline over N seeds and a grid of options, aggregated into a table.

A study config (configs/study/*.yaml) names what each run is (``kind: train`` -> an ``i2e-train``
run, ``kind: pipeline`` -> an ``i2e-pipeline`` run), the overrides every run shares, and a grid:
axes of labelled override lists whose product gives the cells, e.g.

    grid:
      pretrain: {none: [...], i2e: [...]}
      augment: {none: [], nda: ["data.augment=[nda]"]}

For pipelines, overrides that start with ``pipeline`` choose or change the pipeline; every
other override is given to every stage (``common_overrides``), as is the seed.

Every (cell, seed) is one run in a fixed folder ``<study_dir>/runs/<cell>/seed=<s>``, composed
with [`i2e_train.config.compose`][i2e_train.config.compose] and run by the existing task ([`i2e_train.tasks.train.train`][i2e_train.tasks.train.train]
or [`i2e_train.tasks.pipeline.run_pipeline`][i2e_train.tasks.pipeline.run_pipeline]), one after the other: the same engine as
``i2e-train`` / ``i2e-pipeline``, no scheduler of its own. A run that finished wrote
``result.json`` and is skipped when the study is run again; an interrupted one resumes from its
``last.ckpt`` (``ckpt_path=last``; pipelines skip finished stages).

The results are aggregated per cell (mean, sample standard deviation, n, min, max of the metric)
into ``study.md`` (a markdown table), ``study.csv`` (one row per cell) and ``runs.csv`` (one row
per run), and a plot ``study.png`` (mean ± std bars, one dot per seed); with ``wandb=true`` the
table and the plot are logged to a wandb run of the study.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from i2e_train.files import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["study_runs", "run_study", "check_study", "aggregate", "markdown_table", "plot_runs"]


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def study_runs(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every (cell, seed) of the study: its cell labels, seed, folder and overrides."""
    study = cfg.study
    if study.kind not in ("train", "pipeline"):
        raise ValueError(f"study {study.name!r}: kind must be 'train' or 'pipeline', got {study.kind!r}")
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise ValueError("seeds is empty: give the seeds to run, e.g. seeds=[0,1,2]")
    grid = OmegaConf.to_container(study.get("grid") or {}, resolve=False)
    axes = [(axis, list(options.items())) for axis, options in grid.items()]
    runs = []
    for combo in itertools.product(*[opts for _, opts in axes]) if axes else [()]:
        cell = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        extra = [o for _, overrides in combo for o in (overrides or [])]
        name = ",".join(f"{a}={v}" for a, v in cell.items()) or "all"
        for seed in seeds:
            folder = Path(cfg.study_dir) / "runs" / name / f"seed={seed}"
            runs.append({"cell": cell, "cell_name": name, "seed": seed, "dir": folder,
                         "overrides": list(study.get("overrides") or []) + extra})
    return runs


def _train_config(run: dict[str, Any], study_name: str) -> DictConfig:
    from i2e_train.config import compose

    # an interrupted run resumes from its last checkpoint; one stopped before any checkpoint (no
    # result.json, nothing to keep) starts again in its own folder
    resume = "ckpt_path=last" if (Path(run["dir"]) / "checkpoints" / "last.ckpt").is_file() else "overwrite=true"
    overrides = run["overrides"] + [f"seed={run['seed']}", f"paths.output_dir={_quote(str(run['dir']))}",
                                    resume, f"++wandb_group=study/{study_name}"]
    return compose("train", overrides)


def _pipeline_config(run: dict[str, Any], study_name: str) -> DictConfig:
    from i2e_train.config import compose

    own = [o for o in run["overrides"] if o.lstrip("+~").startswith("pipeline")]  # pipeline-level
    common = [o for o in run["overrides"] if o not in own] + [f"seed={run['seed']}", f"++wandb_group=study/{study_name}"]
    arg = "common_overrides=[" + ",".join(_quote(o) for o in common) + "]"
    return compose("pipeline", own + [arg, f"run_dir={_quote(str(run['dir']))}"])


def _train_run(run: dict[str, Any], study_name: str) -> dict[str, Any]:
    from i2e_train.tasks.train import train

    return train(_train_config(run, study_name))


def _pipeline_run(run: dict[str, Any], study_name: str) -> dict[str, Any]:
    from i2e_train.tasks.pipeline import run_pipeline

    return run_pipeline(_pipeline_config(run, study_name))


# result.json: a finished run's metric (read back on a re-run, aggregated into the table)
_RESULT_FIELDS = {"cell": (dict,), "seed": (int,), "overrides": (list,), "metric": (str,), "value": (int, float)}


def _finished_run(run: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a run that finished earlier (None when it has not), checked as data: its keys
    and types (`read_record`), and that it is this run's (cell and seed)."""
    from i2e_train.schema import StoredConfigError, read_record

    path = run["dir"] / "result.json"
    record = read_record(path, _RESULT_FIELDS, "run it again")
    if record is None:
        return None
    if record["cell"] != run["cell"] or record["seed"] != run["seed"] or not math.isfinite(record["value"]):
        raise StoredConfigError(f"{path}: records cell {record['cell']} seed {record['seed']} value "
                                f"{record['value']}, not a result of this run (cell {run['cell']}, seed {run['seed']}); "
                                "delete it to run it again")
    return record


def check_study(cfg: DictConfig) -> None:
    """Every run checked before anything runs or is written (``i2e-study`` runs this before Hydra
    makes the study's folder; `run_study` again): the study's kind and seeds, the finished
    runs' records, and one composed config per cell of the others (`check_train_run`,
    `check_pipeline`)."""
    from i2e_train.tasks.pipeline import check_pipeline
    from i2e_train.tasks.train import check_train_run

    checked = set()
    for run in study_runs(cfg):
        if _finished_run(run) is not None or run["cell_name"] in checked:
            continue
        checked.add(run["cell_name"])
        if cfg.study.kind == "pipeline":
            check_pipeline(_pipeline_config(run, cfg.study.name))
        else:
            check_train_run(_train_config(run, cfg.study.name), run["dir"] if run["dir"].is_dir() else None)


def _metric(result: dict[str, Any], kind: str, metric: str, stage: str | None) -> float:
    if kind == "pipeline":
        stages = result["stages"]
        metrics = stages[stage or list(stages)[-1]]["metrics"]
    else:
        metrics = result.get("best", result.get("fit", {}))
    if metric not in metrics:
        raise KeyError(f"the run has no metric {metric!r} (it has {sorted(metrics)}); set study.metric")
    return float(metrics[metric])


def _run_one(cfg: DictConfig, run: dict[str, Any], runner: Callable | None) -> dict[str, Any]:
    """One run, or its earlier result when it finished before (``result.json``)."""
    done = run["dir"] / "result.json"
    record = _finished_run(run)
    if record is not None:
        log.info("%s seed %d finished earlier: skipped", run["cell_name"], run["seed"])
        return dict(record, skipped=True)
    study = cfg.study
    log.info("study %s: %s seed %d -> %s", study.name, run["cell_name"], run["seed"], run["dir"])
    runner = runner or (_pipeline_run if study.kind == "pipeline" else _train_run)
    run["dir"].mkdir(parents=True, exist_ok=True)
    result = runner(run, study.name)
    record = {"cell": run["cell"], "seed": run["seed"], "overrides": run["overrides"],
              "metric": study.metric, "value": _metric(result, study.kind, study.metric, study.get("stage"))}
    atomic_write_json(done, record)
    return dict(record, skipped=False)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell (in first-seen order): mean, sample std (n - 1; 0 for one run), n, min, max, seeds."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault(json.dumps(r["cell"], sort_keys=False), []).append(r)
    rows = []
    for key, rs in cells.items():
        vals = [float(r["value"]) for r in rs]
        n = len(vals)
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        rows.append({**json.loads(key), "mean": mean, "std": std, "n": n, "min": min(vals), "max": max(vals),
                     "seeds": [r["seed"] for r in rs]})
    return rows


def markdown_table(rows: list[dict[str, Any]], axes: list[str], metric: str, scale: float = 100.0) -> str:
    """The aggregated rows as a markdown table (the metric in percent by default)."""
    head = [*axes, f"{metric} (mean ± std)", "n", "min", "max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[a]) for a in axes] + [f"{scale * r['mean']:.2f} ± {scale * r['std']:.2f}", str(r["n"]),
                                             f"{scale * r['min']:.2f}", f"{scale * r['max']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: (" ".join(map(str, r[c])) if isinstance(r[c], list) else r[c]) for c in columns})
    return buf.getvalue()


def _plot(rows: list[dict[str, Any]], records: list[dict[str, Any]], axes: list[str], metric: str) -> bytes:
    """Mean ± std per cell as bars, each seed's value as a dot; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = ["\n".join(f"{a}={r[a]}" for a in axes) or "all" for r in rows]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.4 * len(rows)), 3.2))
    xs = list(range(len(rows)))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=4, color="#9ecae1")
    for x, r in zip(xs, rows):
        vals = [100 * rec["value"] for rec in records if all(rec["cell"].get(a) == r[a] for a in axes)]
        ax.scatter([x] * len(vals), vals, color="#08519c", s=12, zorder=3)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def plot_runs(records: list[dict[str, Any]], axes: list[str], metric: str) -> bytes:
    """``study.png`` of per-run records (``{"cell": {axis: label}, "seed": s, "value": v}``, the rows
    of ``runs.csv``): the plot a study writes, drawn again from its values."""
    return _plot(aggregate(records), records, axes, metric)


def _log_wandb(cfg: DictConfig, rows: list[dict[str, Any]], columns: list[str], png: Path) -> None:
    import wandb

    run = wandb.init(project=cfg.get("wandb_project", "i2e-train"), name=f"study-{cfg.study.name}",
                     job_type="study", group=f"study/{cfg.study.name}", dir=str(cfg.study_dir),
                     config=OmegaConf.to_container(cfg.study, resolve=True))
    run.log({"study/table": wandb.Table(columns=columns, data=[[r[c] if not isinstance(r[c], list) else
                                                                 str(r[c]) for c in columns] for r in rows]),
             "study/plot": wandb.Image(str(png))})
    run.finish()


def _write(cfg: DictConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    out = Path(cfg.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = list((cfg.study.get("grid") or {}).keys())
    rows = aggregate(records)
    metric = cfg.study.metric
    table = markdown_table(rows, axes, metric)
    atomic_write_text(out / "study.md", f"# Study {cfg.study.name}: {metric}, seeds {list(cfg.seeds)}\n\n{table}")
    columns = [*axes, "mean", "std", "n", "min", "max", "seeds"]
    atomic_write_text(out / "study.csv", _csv(rows, columns))
    run_rows = [{**r["cell"], "seed": r["seed"], "value": r["value"]} for r in records]
    atomic_write_text(out / "runs.csv", _csv(run_rows, [*axes, "seed", "value"]))
    png = atomic_write_bytes(out / "study.png", _plot(rows, records, axes, metric))
    if cfg.get("wandb"):
        _log_wandb(cfg, rows, columns, png)
    return {"rows": rows, "table": table, "dir": str(out)}


def run_study(cfg: DictConfig, runner: Callable | None = None) -> dict[str, Any]:
    """Run every (cell, seed) of ``cfg.study`` not finished yet, then aggregate and write the
    table, CSVs and plot into ``cfg.study_dir``. ``runner(run, study_name)`` replaces the task
    (tests). Returns ``{"rows", "table", "dir", "runs"}``. Everything is checked first
    (`check_study`; with the real tasks only)."""
    if runner is None:
        check_study(cfg)
    records = [_run_one(cfg, run, runner) for run in study_runs(cfg)]
    out = _write(cfg, records)
    out["runs"] = records
    return out
