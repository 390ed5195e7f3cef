"""i2e-study: runs over seeds x grid cells, skipped when finished, aggregated into table / CSV / plot."""

from __future__ import annotations

import csv
import json
import math

import pytest

from i2e_train.config import compose
from i2e_train.tasks.study import aggregate, run_study, study_runs


def _cfg(root, monkeypatch, *overrides):
    monkeypatch.setenv("I2E_ROOT", str(root))
    return compose("study", list(overrides))


def test_runs_are_the_grid_product_times_the_seeds(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, monkeypatch, "study=sim2real_augment", "seeds=[0,1]")
    runs = study_runs(cfg)
    assert len(runs) == 2 * 2 * 2
    cells = {r["cell_name"] for r in runs}
    assert cells == {"pretrain=none,augment=none", "pretrain=none,augment=nda", "pretrain=i2e,augment=none",
                     "pretrain=i2e,augment=nda"}
    nda = next(r for r in runs if r["cell_name"] == "pretrain=i2e,augment=nda" and r["seed"] == 1)
    assert nda["overrides"] == ["pipeline=mnist2nmnist", "data.augment=[nda]"]
    assert nda["dir"] == tmp_path / "logs" / "study" / "sim2real_augment" / "runs" / "pretrain=i2e,augment=nda" / "seed=1"
    with pytest.raises(ValueError, match="seeds is empty"):
        study_runs(_cfg(tmp_path, monkeypatch, "seeds=[]"))


def test_aggregate_mean_sample_std_and_n():
    recs = [{"cell": {"a": "x"}, "seed": s, "value": v} for s, v in enumerate([0.5, 0.7, 0.9])]
    recs += [{"cell": {"a": "y"}, "seed": 0, "value": 0.25}]
    x, y = aggregate(recs)
    assert (x["a"], x["n"], x["seeds"]) == ("x", 3, [0, 1, 2])
    assert math.isclose(x["mean"], 0.7) and math.isclose(x["std"], 0.2) and (x["min"], x["max"]) == (0.5, 0.9)
    assert (y["n"], y["std"], y["mean"]) == (1, 0.0, 0.25)


def test_interrupted_study_resumes_skipping_finished_runs(tmp_path, monkeypatch):
    """A fake task (value = seed / 10 + 0.5 for nda): the second call runs only what the first did not."""
    cfg = _cfg(tmp_path, monkeypatch, "study=demo", "seeds=[0,1,2]")
    calls = []

    def runner(run, name):
        calls.append((run["cell_name"], run["seed"]))
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed in the 4th run
        value = run["seed"] / 10 + (0.5 if run["cell"]["augment"] == "nda" else 0.0)
        return {"best": {"val/top1": value}}

    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, runner=runner)
    calls.clear()
    out = run_study(cfg, runner=runner)
    assert calls == [("augment=nda", 0), ("augment=nda", 1), ("augment=nda", 2)]
    assert [r["skipped"] for r in out["runs"]] == [True] * 3 + [False] * 3
    folder = tmp_path / "logs" / "study" / "demo"
    table = (folder / "study.md").read_text()
    assert "| augment | val/top1 (mean ± std) | n | min | max |" in table
    assert "| none | 10.00 ± 10.00 | 3 | 0.00 | 20.00 |" in table and "| nda | 60.00 ± 10.00 | 3 | 50.00 | 70.00 |" in table
    rows = list(csv.DictReader((folder / "study.csv").open()))
    assert [(r["augment"], r["n"], r["seeds"]) for r in rows] == [("none", "3", "0 1 2"), ("nda", "3", "0 1 2")]
    assert len(list(csv.DictReader((folder / "runs.csv").open()))) == 6
    assert (folder / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "runs" / "augment=nda" / "seed=2" / "result.json").read_text())["value"] == 0.7


def test_missing_metric_names_what_the_run_has(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, monkeypatch, "study=demo", "seeds=[0]", "study.metric=val/top9")
    with pytest.raises(KeyError, match="no metric 'val/top9'.*val/top1"):
        run_study(cfg, runner=lambda run, name: {"best": {"val/top1": 0.1}})


@pytest.mark.slow
def test_demo_study_three_seeds_end_to_end(tmp_path, monkeypatch):
    """`i2e-study study=demo seeds=[0,1,2]` for real (in-process) at CI size: 6 training runs on
    I2E-Digits of 2 batches each (the study's own 2 epochs per run take minutes: its output is in
    docs/research.md), the table, and a re-run that trains nothing."""
    import time

    short = ["experiment=demo", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
             "+trainer.num_sanity_val_steps=0", "eval_after_fit=false", "~logger", "~callbacks.spike_stats",
             "~callbacks.event_media"]
    arg = "study.overrides=[" + ",".join(f"'{o}'" for o in short) + "]"
    cfg = _cfg(tmp_path, monkeypatch, "study=demo", "seeds=[0,1,2]", arg)
    assert list(cfg.study.overrides) == short and "data.augment=[nda]" in cfg.study.grid.augment.nda
    start = time.perf_counter()
    out = run_study(cfg)
    elapsed = time.perf_counter() - start
    assert [(r["augment"], r["n"]) for r in out["rows"]] == [("none", 3), ("nda", 3)]
    assert all(0.0 <= r["value"] <= 1.0 for r in out["runs"])
    again = run_study(cfg)
    assert all(r["skipped"] for r in again["runs"]) and again["table"] == out["table"]
    print(f"demo study: {elapsed:.1f} s\n{out['table']}")


def test_pipeline_study_runs_compose_the_pipeline_and_give_other_overrides_to_every_stage(tmp_path, monkeypatch):
    import i2e_train.tasks.pipeline as pipeline

    seen = []

    def fake_pipeline(cfg):
        seen.append(cfg)
        return {"stages": {"finetune": {"metrics": {"val/top1": 0.5}}}}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_pipeline)
    cfg = _cfg(tmp_path, monkeypatch, "study=sim2real_augment", "seeds=[3]")
    out = run_study(cfg)
    assert [c.pipeline.name for c in seen] == ["nmnist_scratch", "nmnist_scratch", "mnist2nmnist", "mnist2nmnist"]
    nda = seen[-1]
    assert list(nda.common_overrides) == ["data.augment=[nda]", "seed=3", "++wandb_group=study/sim2real_augment"]
    assert nda.run_dir == str(tmp_path / "logs" / "study" / "sim2real_augment" / "runs" / "pretrain=i2e,augment=nda" / "seed=3")
    assert [r["n"] for r in out["rows"]] == [1, 1, 1, 1]


def test_wandb_logs_the_table_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(tmp_path, monkeypatch, "study=demo", "seeds=[0,1]", "wandb=true")
    run_study(cfg, runner=lambda run, name: {"best": {"val/top1": 0.1 * (run["seed"] + 1)}})
    runs = list((tmp_path / "logs" / "study" / "demo" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
