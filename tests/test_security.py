"""Nothing read from a file steers what runs, and every bad input is one line naming it. Each test
is named after what it would break:

- a checkpoint whose stored run config holds ``_target_`` payloads (in every section and nested
  below) is refused by every route (i2e-eval ckpt_path=, plain i2e-eval, init_from, resume, the
  Python API), naming the key, writing nothing and running nothing;
- a pipeline stage's and a study run's record are read back as checked data;
- ``--help`` of every entry point imports neither torch nor Lightning and says what it accepts;
- every value is checked before data loads or a run folder is made, and a refused run leaves none;
- the one-line messages of the cases that used to be poor (a foreign class folder, another class
  count, a damaged last.ckpt, a blocked pickle global, a live run folder, a full disk, noise).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import cli_env, run_cli
from i2e_train.config import compose, group_options
from i2e_train.models import create_model, load_checkpoint
from i2e_train.models.checkpoint import load_torch_file, read_checkpoint
from i2e_train.models.errors import CheckpointFormatError

_ROUTES_WRITE_NOTHING = "nothing written"


def _stored_config(tmp_path: Path) -> dict:
    """The run config ``i2e-train`` stores in a checkpoint (resolved), of the default run."""
    cfg = compose("train", [f"paths.output_dir={tmp_path / 'made'}"])
    return OmegaConf.to_container(cfg, resolve=True)


def _payload(marker: Path) -> dict:
    """``instantiate`` of this would create ``marker`` (open(marker, "w"))."""
    return {"_target_": "builtins.open", "_args_": [str(marker), "w"]}


# Where a payload is planted: a new key of every section, and below existing nodes of each
SECTIONS = ["data", "model", "module", "optim", "scheduler", "trainer", "callbacks", "logger", "paths"]
WITH_CLASS = {"data", "model", "module", "optim", "scheduler", "trainer"}  # a new key there is an argument
NESTED = ["data.augment", "module.batch_transform", "trainer.plugins.0", "callbacks.model_checkpoint",
          "logger.csv", "callbacks.run_info.deeper.still"]


def _plant(config: dict, where: str, payload: dict) -> str:
    """Put ``payload`` at ``where`` (a new key ``evil`` of a section, or replacing a nested node);
    returns the key path the refusal must name."""
    *parents, last = where.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if where in SECTIONS:  # an argument of the section's class holds no _target_; elsewhere the key is unknown
        node[last]["evil"] = payload
        return f"{where}.evil._target_" if where in WITH_CLASS else f"{where}.evil: unknown key"
    if isinstance(node, list):
        node[int(last)] = payload
        return where.rsplit(".", 1)[0] + "[]._target_"
    node[last] = payload
    return f"{where}._target_"


def _checkpoint(path: Path, config: dict) -> Path:
    """A checkpoint as i2e-train writes it (weights_only-clean: tensors, dicts, strings)."""
    sd = {"model." + k: v for k, v in create_model("ms_resnet_tiny", num_classes=10).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "global_step": 2, "pytorch-lightning_version": "2.6.0", "state_dict": sd,
                "i2e_config": config, "num_classes": 10}, path)
    return path


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> dict:
    return _stored_config(tmp_path_factory.mktemp("cfg"))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------- stored configs are data
@pytest.mark.parametrize("where", SECTIONS + NESTED)
def test_target_payload_in_any_section_of_a_stored_config_is_refused_naming_the_key(tmp_path, base_config, where):
    marker = tmp_path / "PAYLOAD_RAN"
    config = copy.deepcopy(base_config)
    key = _plant(config, where, _payload(marker))
    path = _checkpoint(tmp_path / "evil.ckpt", config)
    for read in (load_torch_file, read_checkpoint):
        with pytest.raises(CheckpointFormatError) as err:
            read(path)
        assert f"{path}: refused" in str(err.value) and key in str(err.value), str(err.value)
    assert not marker.exists()


def test_checkpoint_with_payloads_everywhere_is_refused_by_every_in_process_route(tmp_path, base_config, monkeypatch):
    """init_from, resume (ckpt_path=<file> and ckpt_path=last), evaluate (ckpt_path= and latest),
    the Python API: each refuses, names a key and the file, and writes nothing."""
    from helpers import train_in_process
    from i2e_train.tasks.evaluate import evaluate

    marker = tmp_path / "PAYLOAD_RAN"
    config = copy.deepcopy(base_config)
    for where in SECTIONS + NESTED:
        _plant(config, where, _payload(marker))
    path = _checkpoint(tmp_path / "logs" / "train" / "runs" / "planted" / "checkpoints" / "epoch003.ckpt", config)
    _checkpoint(path.with_name("last.ckpt"), config)
    before = _files(tmp_path)
    calls = {
        "read_checkpoint": lambda: read_checkpoint(path),
        "load_checkpoint": lambda: load_checkpoint(create_model("ms_resnet_tiny", num_classes=10), str(path)),
        "create_model": lambda: create_model("ms_resnet_tiny", num_classes=10, pretrained=str(path)),
        "init_from": lambda: train_in_process(tmp_path, monkeypatch, f"init_from={path}", run_dir="a"),
        "resume": lambda: train_in_process(tmp_path, monkeypatch, f"ckpt_path={path}", run_dir="b"),
        "resume last": lambda: train(compose("train", ["ckpt_path=last", f"paths.output_dir={path.parent.parent}"])),
        "eval": lambda: evaluate(compose("eval", [f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'c'}"])),
        "eval latest": lambda: evaluate(compose("eval", [f"paths.log_dir={tmp_path / 'logs'}",
                                                         f"paths.output_dir={tmp_path / 'd'}"])),
    }
    from i2e_train.tasks.train import train

    for name, call in calls.items():
        with pytest.raises(CheckpointFormatError) as err:
            call()
        message = str(err.value)
        assert "refused" in message and "._target_=" in message and path.parent.name in message, (name, message)
    assert not marker.exists()
    assert _files(tmp_path) == before, _ROUTES_WRITE_NOTHING


@pytest.mark.slow
def test_checkpoint_with_payloads_everywhere_is_refused_by_every_entry_point_writing_nothing(tmp_path, base_config):
    """i2e-eval ckpt_path=, plain i2e-eval (the planted file is the newest run's), i2e-train
    init_from= and resume: one error line naming the key and the file; no folder made."""
    marker = tmp_path / "PAYLOAD_RAN"
    config = copy.deepcopy(base_config)
    for where in SECTIONS + NESTED:
        _plant(config, where, _payload(marker))
    run = tmp_path / "logs" / "train" / "runs" / "planted"
    path = _checkpoint(run / "checkpoints" / "epoch003.ckpt", config)
    _checkpoint(run / "checkpoints" / "last.ckpt", config)
    before = _files(tmp_path)
    runs = {
        "eval ckpt_path": ["i2e_train.cli.eval", f"ckpt_path={path}"],
        "eval latest": ["i2e_train.cli.eval"],
        "train init_from": ["i2e_train.cli.train", f"init_from={path}"],
        "train resume": ["i2e_train.cli.train", "ckpt_path=last", f"hydra.run.dir={run}"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=cli_env(tmp_path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 1 and "refused" in last and "._target_=" in last and "checkpoints/" in last, (name, err)
        assert "Traceback" not in err
    assert not marker.exists()
    assert _files(tmp_path) == before, _ROUTES_WRITE_NOTHING


@pytest.mark.parametrize("change, named", [
    (lambda c: c.update(evil=1), "evil: unknown key"),
    (lambda c: c["paths"].update(cache="/elsewhere"), "paths.cache: unknown key"),
    (lambda c: c["callbacks"].update(extra={"every": 1}), "callbacks.extra: unknown key"),
    (lambda c: c["data"].update(augment={"hflip": "${oc.env:HOME}"}), "data.augment.hflip='${oc.env:HOME}': an interpolation"),
    (lambda c: c["optim"].update(_args_=[1]), "optim._args_: our configs set no _args_ there"),
    (lambda c: c["model"].update(_target_="os.system"), "model._target_='os.system': not a class our configs name"),
    (lambda c: c.update(hydra={"run": {"dir": "/x"}}), "hydra: unknown key"),
])
def test_unknown_key_or_interpolation_in_a_stored_config_is_refused_naming_key_and_file(base_config, change, named):
    from i2e_train.schema import StoredConfigError, check_stored_config

    config = copy.deepcopy(base_config)
    change(config)
    with pytest.raises(StoredConfigError) as err:
        check_stored_config(config, "run.ckpt")
    assert str(err.value).startswith("run.ckpt: refused") and named in str(err.value), str(err.value)


def test_arguments_our_classes_take_and_plain_values_stay_accepted(base_config):
    """What a run with +trainer.key=value or data.augment={...} stores is not refused."""
    from i2e_train.schema import check_stored_config

    config = copy.deepcopy(base_config)
    config["trainer"]["num_sanity_val_steps"] = 0
    config["data"]["augment"] = [{"name": "drop_area", "max_ratio": 0.5}, "nda"]
    config["wandb_group"] = "study/demo"
    assert check_stored_config(config, "run.ckpt") == config


def test_where_eval_reads_and_caches_data_comes_from_this_run_not_the_checkpoint(tmp_path, monkeypatch):
    from i2e_train.tasks.evaluate import _merge_stored

    monkeypatch.setenv("I2E_ROOT", str(tmp_path / "here"))
    theirs = ["data=nmnist", "paths.output_dir=x", f"paths.root_dir={tmp_path / 'there'}"]
    stored = OmegaConf.to_container(compose("train", theirs), resolve=True)
    stored["data"].update(data_dir=str(tmp_path / "theirs" / ".ssh"), cache_dir=str(tmp_path / "theirs" / ".config"))
    cfg = _merge_stored(compose("eval", []), stored, [])
    assert cfg.data.root == str(tmp_path / "here" / "data" / "nmnist")  # not <tmp>/there/data/nmnist
    assert cfg.data.data_dir == str(tmp_path / "here" / "data") and cfg.data.cache_dir is None
    cfg = _merge_stored(compose("eval", [f"++data.root={tmp_path}"]), stored, [f"++data.root={tmp_path}"])
    assert cfg.data.root == str(tmp_path)  # the command line still wins


def test_what_the_reading_runs_own_command_line_adds_is_accepted_and_nothing_else(tmp_path):
    """A run with +callbacks.probe._target_=... reads its own checkpoints back (export, resume);
    any other run, and the Python API without a config, refuses that checkpoint."""
    probe = ["+callbacks.probe._target_=sweep_probe.FailFirstTrial", f"paths.output_dir={tmp_path}"]
    mine = compose("train", probe)
    ckpt = _checkpoint(tmp_path / "run.ckpt", OmegaConf.to_container(mine, resolve=True))
    assert read_checkpoint(ckpt, trusted_config=mine).format == "lightning"
    for other in (None, compose("train", [f"paths.output_dir={tmp_path}"]),
                  compose("train", ["+callbacks.probe._target_=builtins.print", f"paths.output_dir={tmp_path}"])):
        with pytest.raises(CheckpointFormatError, match=r"callbacks\.probe: unknown key.*give the same override here"):
            read_checkpoint(ckpt, trusted_config=other)


def _stored_configs():
    """The stored config of every experiment and of every data / model / trainer / logger option."""
    options = [[]] + [[f"experiment={e}"] for e in group_options("experiment")]
    options += [[f"{g}={o}"] for g in ("data", "model", "trainer", "logger", "hparams_search", "debug")
                for o in group_options(g) if (g, o) != ("data", "local")]
    return options


@pytest.mark.parametrize("overrides", _stored_configs(), ids=lambda o: o[0] if o else "default")
def test_every_config_our_groups_make_passes_the_stored_config_check(tmp_path, overrides):
    from i2e_train.schema import check_stored_config

    cfg = compose("train", [*overrides, f"paths.output_dir={tmp_path}"])
    check_stored_config(OmegaConf.to_container(cfg, resolve=True), "run.ckpt")


def test_pipeline_stage_record_is_checked_before_a_later_stage_starts_from_it(tmp_path):
    from i2e_train.schema import StoredConfigError
    from i2e_train.tasks.pipeline import run_pipeline

    run_dir = tmp_path / "pipe"
    (run_dir / "pretrain").mkdir(parents=True)
    record = {"overrides": [], "init_from": None, "init_from_stage": None, "init_digest": None,
              "best_checkpoint": str(tmp_path / "elsewhere.ckpt"), "metrics": {"val/top1": 0.5}, "skipped": False}
    stage_json = run_dir / "pretrain" / "stage.json"
    stage_json.write_text(json.dumps(record))
    cfg = compose("pipeline", ["pipeline=demo", f"run_dir={run_dir}"])
    never = lambda c: pytest.fail("a stage ran")  # noqa: E731
    with pytest.raises(StoredConfigError, match=r"stage\.json: best_checkpoint=.*elsewhere\.ckpt' is outside"):
        run_pipeline(cfg, train=never)
    stage_json.write_text(json.dumps(dict(record, best_checkpoint=None, command="rm -rf /")))
    with pytest.raises(StoredConfigError, match=r"stage\.json: unknown key 'command'"):
        run_pipeline(cfg, train=never)
    stage_json.write_text('{"overrides": [')  # cut short
    with pytest.raises(StoredConfigError, match=r"stage\.json: unreadable .*delete it to run stage 'pretrain' again"):
        run_pipeline(cfg, train=never)
    assert sorted(p.name for p in run_dir.rglob("*")) == ["pretrain", "stage.json"]


def test_study_result_record_of_another_run_or_type_is_refused_naming_the_file(tmp_path, monkeypatch):
    from i2e_train.schema import StoredConfigError
    from i2e_train.tasks.study import run_study, study_runs

    monkeypatch.setenv("I2E_ROOT", str(tmp_path))
    cfg = compose("study", ["study=demo", "seeds=[0]", f"study_dir={tmp_path / 'study'}"])
    run = study_runs(cfg)[0]
    run["dir"].mkdir(parents=True)
    done = run["dir"] / "result.json"
    done.write_text(json.dumps({"cell": run["cell"], "seed": 7, "overrides": [], "metric": "val/top1", "value": 1.0}))
    with pytest.raises(StoredConfigError, match="result.json: records cell .* seed 7 .*not a result of this run"):
        run_study(cfg)
    done.write_text(json.dumps({"cell": run["cell"], "seed": 0, "overrides": [], "metric": "val/top1", "value": "x"}))
    with pytest.raises(StoredConfigError, match=r"result\.json: value='x' is not int or float"):
        run_study(cfg)
    done.write_bytes(b"\xff\xfe")
    with pytest.raises(StoredConfigError, match=r"result\.json: unreadable .*delete it to run it again"):
        run_study(cfg)


# --------------------------------------------------------------------------- --help
_HELP = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning"))
print("HEAVY:", heavy)
"""
HELP_NAMES = {  # entry point -> names its help must list
    "train": ["cifar10/baseline2", "imagenet_augmentation_34", "ms_resnet18", "sj/sew_resnet18", "hparams_search"],
    "eval": ["cifar10_augmentation", "nmnist/transfer", "i2e_cifar10"],
    "convert": ["I2E-CIFAR10", "N-MNIST"],
    "viz": ["I2E-CIFAR10"],
    "pipeline": ["sim2real", "mnist2nmnist", "cifar10dvs/transfer2"],
    "study": ["sim2real_augment", "demo"],
    "export": ["cifar10_augmentation", "deploy/ms_resnet18", "safetensors"],
}


def test_help_of_every_entry_point_imports_neither_torch_nor_lightning(tmp_path):
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {s.removeprefix("i2e-") for s in scripts} == set(HELP_NAMES)  # a new entry point gets its --help
    procs = {name: subprocess.Popen([sys.executable, "-c", _HELP, f"i2e_train.cli.{name}"], cwd=tmp_path,
                                    env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in HELP_NAMES}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "HEAVY: []" in out, (name, out[-2000:], err[-2000:])
        text = out.split("HEAVY:")[0]
        assert text.startswith(f"i2e-{name}: ") and "Examples:" in text, (name, text)
        examples = [ln for ln in text.split("Examples:")[1].split("\n\n")[0].splitlines() if ln.strip()]
        assert 3 <= len(examples) <= 6 and all(ln.strip().startswith(f"i2e-{name}") for ln in examples), examples
        assert all(n in text for n in HELP_NAMES[name]), (name, text)
        if name not in ("train", "eval", "export"):  # only the groups it uses: none of the training groups
            assert "ms_resnet18" not in text and "optim" not in text, (name, text)
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- values before folders
@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr='abc': expected a number > 0"),
    ("optim.lr=-1", "optim.lr=-1.0: the learning rate must be a finite number > 0"),
    ("seed=abc", "seed='abc': expected a whole number in 0..4294967295"),
    ("seed=-1", "seed=-1: expected a whole number in 0..4294967295"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: expected a number >= 0"),
    ("optim.momentum=1.5", "optim.momentum=1.5: expected a number in [0, 1]"),
    ("optim.momentum=0", "optim.momentum=0.0: optim.opt=sgd is SGD with Nesterov momentum"),
    ("scheduler.lr_min=-1", "scheduler.lr_min=-1.0: expected a number >= 0"),
    ("data.val_fraction=1", "data.val_fraction=1.0: expected a number in [0, 1)"),
    ("module.label_smoothing=abc", "module.label_smoothing='abc': expected a number in [0, 1)"),
    ("data.resolution=[32,0]", "data.resolution[1]=0: expected a whole number >= 1"),
    ("optim.lr=nan", "optim.lr=nan: expected a number > 0"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: expected a whole number >= 1"),
    ("data.batch_size=0", "data.batch_size=0: expected a whole number >= 1"),
    ("data.batch_size=abc", "data.batch_size='abc': expected a whole number >= 1"),
    ("model.tau=1", "model.tau=1.0: the LIF time constant must be > 1"),
    ("model.tau=abc", "model.tau='abc': expected a number"),
])
def test_bad_value_is_named_with_its_key_before_any_library_sees_it(override, message):
    from i2e_train.tasks.checks import check_train_config

    with pytest.raises(ValueError) as err:
        check_train_config(compose("train", [override]))
    assert str(err.value).startswith(message), str(err.value)


def _numeric_keys(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numeric_keys(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for v in node:
            yield from _numeric_keys(v, path + "[]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path


def test_every_numeric_key_of_every_recipe_has_a_rule(tmp_path):
    from i2e_train.tasks.checks import RULES, UNCHECKED, check_train_config

    found = set()
    for overrides in _stored_configs():
        cfg = compose("train", [*overrides, f"paths.output_dir={tmp_path}"])
        check_train_config(cfg)  # every recipe's own values pass
        found |= set(_numeric_keys(OmegaConf.to_container(cfg, resolve=True)))
    missing = sorted(k for k in found if k not in RULES and k not in UNCHECKED)
    assert not missing, f"numeric keys without a rule in i2e_train/tasks/checks.py: {missing}"


@pytest.mark.slow
def test_refused_value_is_one_line_and_leaves_no_run_folder(tmp_path):
    runs = {"optim.lr=abc": "optim.lr='abc'", "optim.lr=-1": "optim.lr=-1.0", "seed=abc": "seed='abc'"}
    procs = {o: subprocess.Popen([sys.executable, "-m", "i2e_train.cli.train", o], cwd=tmp_path, env=cli_env(tmp_path),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for o in runs}
    for override, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1, err
        assert lines[0].startswith(f"i2e-train: error: {runs[override]}: expected") or "learning rate" in lines[0], err
        assert not out.strip()
    assert not (tmp_path / "logs").exists() and not (tmp_path / "data").exists()  # no folder, no data read


@pytest.mark.slow
def test_run_failing_after_hydra_made_its_folder_removes_it_but_never_a_folder_it_did_not_make(tmp_path):
    proc = run_cli("i2e_train.cli.train", f"data.path={tmp_path / 'typo'}", "debug=fast", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "typo" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "logs").exists()  # the run folder and the folders made with it
    mine = tmp_path / "mine"
    mine.mkdir()
    proc = run_cli("i2e_train.cli.train", f"data.path={tmp_path / 'typo'}", "debug=fast", f"hydra.run.dir={mine}",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1 and mine.is_dir() and (mine / ".hydra").is_dir()  # existed before: kept as it is


# --------------------------------------------------------------------------- the formerly poor cases
def test_nmnist_extra_class_folder_is_named_and_exclude_classes_leaves_it_out(tmp_path):
    from i2e_train.data.real_events import ClassMatchError, RealEventsDataModule
    from test_real_events import make_nmnist, write_atis

    make_nmnist(tmp_path, train=1, test=1)
    for split in ("Train", "Test"):
        write_atis(tmp_path / "NMNIST" / split / "ten" / "00000.bin", [3] * 9, [4] * 9, [1] * 9, list(range(9)))

    def dm(**kw):
        return RealEventsDataModule(name="N-MNIST", root=str(tmp_path), batch_size=2, num_workers=0,
                                    build_workers=0, progress=False, **kw)

    plain = dm()
    plain.prepare_data()
    with pytest.raises(ClassMatchError, match=r"not among the twin's: \['ten'\].*data\.exclude_classes"):
        plain.setup()
    excluded = dm(exclude_classes=["ten"])
    excluded.setup()
    assert sorted({r.label for r in excluded.recordings}) == [str(d) for d in range(10)]


def test_eval_of_another_class_count_is_one_line_without_replace_head(tmp_path, monkeypatch):
    from i2e_train.tasks.evaluate import evaluate

    monkeypatch.setenv("I2E_ROOT", str(tmp_path))
    weights = tmp_path / "w100.pth"
    torch.save(create_model("ms_resnet_tiny", num_classes=100).state_dict(), weights)
    with pytest.raises(ValueError) as err:  # a foreign file: the model is the config's (10 classes)
        evaluate(compose("eval", [f"ckpt_path={weights}", f"paths.output_dir={tmp_path / 'e'}"]))
    message = str(err.value)
    assert message.startswith(f"ckpt_path={weights}: its classifier has 100 classes") and "10" in message
    assert "replace_head" not in message and "\n" not in message
    ours = _checkpoint(tmp_path / "ours.ckpt", _stored_config(tmp_path))  # ours: its stored model has 10
    overrides = [f"ckpt_path={ours}", "data=i2e_cifar100", f"paths.output_dir={tmp_path / 'e'}"]
    with pytest.raises(ValueError, match=r"the model has 10 classes, the data evaluated here \(I2E-CIFAR100\) 100"):
        evaluate(compose("eval", overrides), overrides)
    assert not (tmp_path / "e").exists()


def test_resume_with_another_class_count_or_model_names_both_before_anything_is_written(tmp_path):
    from i2e_train.tasks.train import train

    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", _stored_config(tmp_path))
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"trained for 10 classes, this run's data I2E-CIFAR100 has 100.*init_from="):
        train(compose("train", [f"ckpt_path={ckpt}", "data=i2e_cifar100", f"paths.output_dir={tmp_path / 'new'}"]))
    with pytest.raises(ValueError, match=r"is of model ms_resnet_tiny, this run builds ms_resnet18"):
        train(compose("train", [f"ckpt_path={ckpt}", "model=ms_resnet18", f"paths.output_dir={tmp_path / 'new'}"]))
    assert _files(tmp_path) == before


def test_resumed_callback_state_naming_a_remote_file_is_refused(tmp_path):
    """Lightning deletes the older checkpoints a restored ModelCheckpoint state names; remotely anywhere."""
    from i2e_train.tasks.train import _resume_path

    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", _stored_config(tmp_path))
    state = torch.load(ckpt, weights_only=True)
    state["callbacks"] = {"ModelCheckpoint{'monitor': 'val/top1'}": {"dirpath": str(ckpt.parent),
                                                                    "best_model_path": "s3://bucket/precious.bin"}}
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"refused: the state of its callback ModelCheckpoint.*'s3://bucket/precious"):
        _resume_path(compose("train", [f"ckpt_path={ckpt}"]), None)


def test_damaged_last_ckpt_names_the_newest_epoch_checkpoint_to_resume_from_and_that_works(tmp_path):
    from i2e_train.models.errors import CheckpointDamagedError
    from i2e_train.tasks.runs import check_run_folder
    from i2e_train.tasks.train import _resume_path

    run = tmp_path / "run"
    good = _checkpoint(run / "checkpoints" / "epoch004.ckpt", _stored_config(tmp_path))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = compose("train", ["ckpt_path=last", f"paths.output_dir={run}"])
    with pytest.raises(CheckpointDamagedError) as err:
        _resume_path(cfg, run)
    assert str(err.value).startswith(f"{last}: not a readable torch checkpoint")
    assert f"hydra.run.dir={run} ckpt_path={good}" in str(err.value)
    check_run_folder(run, str(good), overwrite=False)  # the advice is accepted: resuming the run in place
    assert _resume_path(compose("train", [f"ckpt_path={good}", f"paths.output_dir={run}"]), run) == str(good)


def test_pickle_with_a_blocked_global_is_refused_naming_the_object_not_called_truncated(tmp_path):
    import pickle

    class _System:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "w.pth"
    path.write_bytes(pickle.dumps({"state_dict": _System()}, protocol=2))
    with pytest.raises(CheckpointFormatError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused: it holds the Python object '{os.system.__module__}.system'"), message
    assert "truncated" not in message


def test_live_run_folder_refusal_advises_only_what_works_while_it_runs(tmp_path):
    from i2e_train.tasks.runs import RunFolderError, check_run_folder

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (tmp_path / "RUNNING").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        for ckpt, overwrite in ((None, False), (None, True), ("last", False)):
            with pytest.raises(RunFolderError) as err:
                check_run_folder(tmp_path, ckpt, overwrite)
            message = str(err.value)
            assert f"pid {sleeper.pid}" in message and "leave hydra.run.dir out" in message
            assert "Resume it with" not in message and "pass overwrite=true" not in message, message
    finally:
        sleeper.kill()
        sleeper.wait()


def test_disk_full_while_saving_a_checkpoint_says_disk_full_naming_the_file(tmp_path, monkeypatch):
    """torch.save turns a failed write() into "[enforce fail at inline_container.cc] unexpected pos";
    the error names the disk and the file, and the previous checkpoint stays."""
    from i2e_train import files
    from i2e_train.recovery import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(4)}, target)
    real_open = open

    class _Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 256:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(files, "open", lambda p, mode: _Full(real_open(p, mode)), raising=False)
    with pytest.raises(OSError) as err:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, target)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert str(err.value).startswith(f"[Errno {errno.ENOSPC}] disk full: No space left on device while writing {target}")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_normal_run_prints_no_summary_notice_no_zero_flops_and_no_bar_after_the_error(tmp_path, caplog, capsys):
    import logging

    from i2e_train.callbacks import ModelSummary, StepLossProgressBar
    from i2e_train.tasks.train import make_trainer

    caplog.set_level(logging.INFO)
    cfg = compose("train", [f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"])
    trainer = make_trainer(cfg.trainer, callbacks=[ModelSummary(max_depth=1), StepLossProgressBar()], logger=False)
    assert "already configured with model summary" not in caplog.text
    assert sum(isinstance(c, ModelSummary) for c in trainer.callbacks) == 1
    ModelSummary.summarize([(" ", ["0"]), ("Name", ["model"]), ("Type", ["MSResNet"]), ("Params", ["309 K"]),
                            ("Mode", ["train"]), ("FLOPs", ["0"])], 309_000, 309_000, 1.24, {"train": 67, "eval": 0},
                           total_flops=0)
    out = capsys.readouterr().out
    assert "MSResNet" in out and "Total params" in out and "FLOPs" not in out


@pytest.mark.slow
def test_error_line_is_the_last_line_of_a_run_stopped_mid_epoch(tmp_path):
    """A NaN loss stops the run in the middle of an epoch: the open progress bar is closed before
    the error line, not printed after it when the process exits."""
    proc = subprocess.run([sys.executable, "-m", "i2e_train.cli.train", "optim.lr=1e30", "trainer.max_epochs=1",
                           "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
                           "+trainer.num_sanity_val_steps=0", "~logger"],
                          cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stdout.rstrip().splitlines()[-1].startswith("i2e-train: error: non-finite training loss"), \
        proc.stdout[-1500:]
