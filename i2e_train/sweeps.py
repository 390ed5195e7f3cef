"""Hyper-parameter sweeps: what the Optuna sweeper and wandb sweep agents need from us.

* `OptunaStorage`: a Hydra callback (``hydra.callbacks`` of ``configs/hparams_search/*``)
  that creates the folder of a ``sqlite:///...`` storage before the sweeper opens it (SQLite
  creates the file, never its folder) and, at the end, logs where the best parameters are.
* `in_multirun` / `record_failure`: a trial of a ``-m`` run that raises is written
  to ``<trial folder>/error.txt`` (with its traceback) and returns ``None`` instead of a value:
  hydra-optuna-sweeper 1.3 then marks it ``FAIL`` in the study and goes on with the next trial.
  (A NaN would stop the whole sweep: optuna 2.10's ``tell`` refuses it and the sweeper's
  fallback ``tell(FAIL, values=[nan])`` raises again.)
* `wandb_sweep_commands`: the command lines a ``wandb agent`` would run for a sweep spec
  (``configs/sweep/*.yaml``), grid values expanded and distributions sampled at a few points,
  for dry runs and tests (a wandb sweep itself always needs a wandb server).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from i2e_train.files import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["OptunaStorage", "in_multirun", "record_failure", "sqlite_path", "sweep_values", "wandb_sweep_commands",
           "WANDB_DEFAULT_COMMAND"]


# --------------------------------------------------------------------------- Optuna
def sqlite_path(storage: Any) -> Path | None:
    """The database file of a ``sqlite:///<path>`` storage URL (None for other storages)."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return None
    return Path(storage[len("sqlite:///"):])


class OptunaStorage(HydraCallback):
    """Create the folder of the sweeper's SQLite storage at the start of a multirun; at the end,
    log the study, the storage and the ``optimization_results.yaml`` holding the best parameters."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        db = sqlite_path(config.hydra.sweeper.get("storage"))
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            log.info("Optuna study %r stored in %s (same study_name + storage continues it)",
                     config.hydra.sweeper.get("study_name"), db)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        results = Path(config.hydra.sweep.dir) / "optimization_results.yaml"
        if results.is_file():
            log.info("best parameters: %s", results)


def in_multirun() -> bool:
    """True inside a job launched by a Hydra sweep (``-m`` / ``hydra.mode=MULTIRUN``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(output_dir: str | Path, error: BaseException, overrides: Iterable[str] = ()) -> Path:
    """Write ``<output_dir>/error.txt``: the trial's overrides and the traceback of ``error``."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    path = atomic_write_text(Path(output_dir) / "error.txt", "overrides: " + " ".join(overrides) + "\n\n" + text)
    log.error("trial failed (%s: %s); traceback in %s", type(error).__name__, error, path)
    return path


# --------------------------------------------------------------------------- wandb sweeps
WANDB_DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def sweep_values(name: str, spec: Mapping[str, Any], samples: int = 3) -> list[Any]:
    """Values of one wandb sweep parameter: ``value``, every entry of ``values``, or for a
    distribution ``samples`` points from ``min`` to ``max`` (geometric for log distributions,
    rounded for ``int_uniform`` / ``q_*``)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "parameters" in spec:
        raise ValueError(f"sweep parameter {name!r}: nested parameters are not supported by i2e-train's CLI")
    dist = spec.get("distribution")
    if dist is None:
        dist = "int_uniform" if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int) else "uniform"
    if "min" not in spec or "max" not in spec:
        raise ValueError(f"sweep parameter {name!r}: distribution {dist!r} needs min and max (got {dict(spec)})")
    lo, hi = spec["min"], spec["max"]
    if dist == "log_uniform":  # min / max are exponents (natural log)
        lo, hi = math.exp(lo), math.exp(hi)
    n = max(1, int(samples))
    fracs = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    if dist in ("log_uniform", "log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
        vals = [math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) for f in fracs]
    elif dist in ("uniform", "q_uniform", "int_uniform", "normal", "q_normal", "log_normal"):
        vals = [lo + f * (hi - lo) for f in fracs]
    else:
        raise ValueError(f"sweep parameter {name!r}: unknown distribution {dist!r}")
    vals = [float(f"{v:.12g}") for v in vals]  # 0.001, not 0.0010000000000000002
    vals[0], vals[-1] = (vals[0], vals[-1]) if n == 1 else (float(lo), float(hi))
    if dist == "int_uniform":
        return sorted({int(round(v)) for v in vals})
    if dist.startswith("q_"):
        q = spec.get("q", 1)
        vals = [round(v / q) * q for v in vals]
    return vals


def _flag_lists(args: Mapping[str, Any]) -> dict[str, list[str]]:
    """The argument macros of a wandb agent, formatted as it formats them (``f"{k}={v}"``)."""
    flags = [f"{k}={v}" for k, v in args.items()]
    return {
        "args": ["--" + f for f in flags],
        "args_no_hyphens": flags,
        "args_append_hydra": ["+" + f for f in flags],
        "args_override_hydra": ["++" + f for f in flags],
        "args_no_boolean_flags": [("--" + k) if v is True else "--" + f"{k}={v}"
                                  for (k, v), f in zip(args.items(), flags) if v is not False],
        "args_json": [json.dumps(dict(args))],
        "args_no_equals": [x for k, v in args.items() for x in (f"--{k}", str(v))],
    }


def wandb_sweep_commands(spec: Mapping[str, Any] | str | Path, samples: int = 3,
                         interpreter: str = "python") -> list[list[str]]:
    """Every command line a ``wandb agent`` would run for ``spec`` (a sweep config or its YAML
    file): the cartesian product of the parameter values (`sweep_values`), substituted into
    the spec's ``command`` (wandb's default when absent) the way the agent does it."""
    if not isinstance(spec, Mapping):
        import yaml

        spec = yaml.safe_load(Path(spec).read_text())
    params = dict(spec.get("parameters") or {})
    names = list(params)
    grids = [sweep_values(n, params[n], samples) for n in names]
    command = list(spec.get("command") or WANDB_DEFAULT_COMMAND)
    out = []
    for combo in itertools.product(*grids):
        macros = _flag_lists(dict(zip(names, combo)))
        macros.update(env=["/usr/bin/env"], interpreter=[interpreter], program=[str(spec.get("program", ""))])
        line: list[str] = []
        for chunk in command:
            chunk = str(chunk)
            if chunk.startswith("${") and chunk.endswith("}"):
                key = chunk[2:-1]
                if key not in macros:
                    raise ValueError(f"unknown wandb sweep macro {chunk} in command {command}")
                line += macros[key]
            else:
                line.append(chunk)
        out.append(line)
    return out
