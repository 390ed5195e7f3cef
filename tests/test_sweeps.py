"""Sweeps: every command line of the wandb sweep specs composes, the Optuna search spaces name real
config keys, and a 2-trial Optuna sweep survives a failing trial, writes its best parameters and
can be continued from its SQLite study."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from i2e_train import config_dir
from i2e_train.config import compose
from i2e_train.sweeps import sweep_values, wandb_sweep_commands

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((config_dir() / "sweep").glob("*.yaml"))
SEARCHES = sorted((config_dir() / "hparams_search").glob("*.yaml"))
FAST = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def hparams_search_override(name: str) -> str:
    """`hparams_search=<name>` when configs/train.yaml has an `hparams_search: null` default,
    `+hparams_search=<name>` (append) while it has none."""
    defaults = yaml.safe_load((config_dir() / "train.yaml").read_text()).get("defaults", [])
    listed = any(isinstance(d, dict) and "hparams_search" in d for d in defaults)
    return f"{'' if listed else '+'}hparams_search={name}"


def _compose_or_skip(overrides: list[str], what: str, **kw):
    """compose("train", overrides); skip ONLY when a config that the overrides do not name
    themselves (one pulled in by an experiment, written concurrently) does not exist yet."""
    try:
        return compose("train", overrides, **kw)
    except MissingConfigException as err:
        missing = err.missing_cfg_file or ""
        named = {f"{o.split('=', 1)[0].lstrip('+~')}/{o.split('=', 1)[1]}" for o in overrides if "=" in o}
        if missing and missing not in named and not (config_dir() / f"{missing}.yaml").exists():
            pytest.skip(f"{what}: config '{missing}.yaml' does not exist yet ({err})")
        raise


def _cli_overrides(command: list[str]) -> list[str]:
    i = command.index("-m")
    assert command[i + 1] == "i2e_train.cli.train", command
    return command[i + 2:]


def _parsed(value: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={value}").value()


# --------------------------------------------------------------------------- wandb sweeps
def test_sweep_command_expansion_matches_the_wandb_agent():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = {"program": "x.py", "method": "random",
            "parameters": {"a.b": {"values": [1, 2]}, "c": {"value": "s"},
                           "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                           "n": {"distribution": "int_uniform", "min": 1, "max": 3}},
            "command": ["${env}", "${interpreter}", "-m", "pkg.mod", "fixed=1", "${args_no_hyphens}"]}
    cmds = wandb_sweep_commands(spec)
    assert len(cmds) == 2 * 1 * 3 * 3
    assert sweep_values("lr", spec["parameters"]["lr"]) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert sweep_values("n", spec["parameters"]["n"]) == [1, 2, 3]
    first = cmds[0]
    assert first[:5] == ["/usr/bin/env", "python", "-m", "pkg.mod", "fixed=1"]
    args = {"a.b": 1, "c": "s", "lr": 1e-4, "n": 1}
    agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    assert first[5:] == agent["args_no_hyphens"]  # formatted exactly as the agent formats them
    default = wandb_sweep_commands({"program": "x.py", "parameters": {"a": {"value": 1}}})
    assert default == [["/usr/bin/env", "python", "x.py", "--a=1"]]


@pytest.mark.parametrize("spec_path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_command_of_a_wandb_sweep_spec_composes(spec_path):
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["metric"] == {"name": "val/top1", "goal": "maximize"}  # a metric the module logs
    assert spec["method"] in ("grid", "random", "bayes")
    assert "${args_no_hyphens}" in spec["command"]
    assert (REPO / spec["program"]).is_file()
    commands = wandb_sweep_commands(spec)
    assert commands
    for command in commands:
        overrides = _cli_overrides(command)
        cfg = _compose_or_skip(overrides, f"{spec_path.name}: {' '.join(overrides)}")
        for key in spec["parameters"]:
            sent = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key)
            assert OmegaConf.select(cfg, key) == _parsed(sent), (key, sent)
        assert "wandb" in cfg.logger, "a wandb sweep needs the wandb logger"
        assert cfg.optimized_metric == spec["metric"]["name"]


# --------------------------------------------------------------------------- Optuna
@pytest.mark.parametrize("search", SEARCHES, ids=[p.stem for p in SEARCHES])
def test_optuna_search_config_and_its_search_space_compose(search):
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep

    base = [hparams_search_override(search.stem)]
    cfg = _compose_or_skip(base, search.name, return_hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper") and sw.direction == "maximize" and sw.n_jobs == 1
    assert sw.storage == f"sqlite:///{cfg.paths.log_dir}/optuna/{Path(sw.storage).name}"
    assert sw.study_name and sw.n_trials > 0 and sw.sampler.seed is not None
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.callbacks.optuna_storage._target_ == "i2e_train.sweeps.OptunaStorage"
    assert cfg.optimized_metric == "val/top1"
    for key, expr in sw.params.items():
        space = _parsed(expr)
        if isinstance(space, ChoiceSweep):
            values = list(space.list)
        else:
            assert isinstance(space, IntervalSweep), (key, expr)
            values = [space.start, space.end]
        for v in values:
            GlobalHydra.instance().clear()
            trial = compose("train", base + [f"{key}={v}"])
            got = OmegaConf.select(trial, key)
            assert (got == pytest.approx(v)) if isinstance(v, float) else (got == v), (key, v, got)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from i2e_train.data.digits import build_digits

    root = tmp_path_factory.mktemp("data")
    build_digits(root / "i2e-digits")
    return root


PROBE = '''
import os
from lightning.pytorch import Callback


class FailFirstTrial(Callback):
    """Raises when the first trial of a sweep process builds its callbacks (SWEEP_PROBE_FAIL=1)."""

    made = 0

    def __init__(self):
        type(self).made += 1
        if type(self).made == 1 and os.environ.get("SWEEP_PROBE_FAIL") == "1":
            raise RuntimeError("sweep probe: this trial fails on purpose")
'''


def _sweep(tmp_path: Path, data_dir: Path, n_trials: int, fail_first: bool) -> subprocess.CompletedProcess:
    (tmp_path / "sweep_probe.py").write_text(PROBE)
    env = dict(os.environ, I2E_ROOT=str(tmp_path), PYTHONWARNINGS="ignore", WANDB_MODE="offline",
               SWEEP_PROBE_FAIL="1" if fail_first else "0",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    args = [sys.executable, "-m", "i2e_train.cli.train", hparams_search_override("demo_optuna"),
            f"hydra.sweeper.n_trials={n_trials}", f"paths.data_dir={data_dir}", *FAST,
            "+callbacks.probe._target_=sweep_probe.FailFirstTrial"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_optuna_sweep_survives_a_failing_trial_writes_best_params_and_continues(tmp_path, data_dir):
    import optuna

    _sweep(tmp_path, data_dir, n_trials=2, fail_first=True)
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    error = (sweep_dir / "0" / "error.txt").read_text()
    assert "sweep probe: this trial fails on purpose" in error and "Traceback" in error
    assert (sweep_dir / "1" / "metrics.json").is_file() and not (sweep_dir / "1" / "error.txt").exists()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "optim.weight_decay"}
    assert 0.0 <= results["best_value"] <= 1.0

    db = tmp_path / "logs" / "optuna" / "demo.db"
    study = optuna.load_study(study_name="demo_lr_wd", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert study.best_trial.params == pytest.approx(results["best_params"])
    assert study.best_value == pytest.approx(results["best_value"])

    # the same command again continues the same study (load_if_exists on the same storage)
    _sweep(tmp_path, data_dir, n_trials=1, fail_first=False)
    study = optuna.load_study(study_name="demo_lr_wd", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and study.trials[2].state == optuna.trial.TrialState.COMPLETE
