"""Data parallel on 2 CPU processes (gloo): the Hydra entry point under Lightning's subprocess
launcher, metrics synced across ranks, files written by rank 0 only."""

from __future__ import annotations

import json

import pytest

from helpers import cli_env, run_cli


def _run(args, cwd):
    # one OpenMP thread per rank; run_cli's own process group ends rank 1 too if a collective hangs
    return run_cli(*args, cwd=cwd, timeout=400, env=cli_env(cwd, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_validates_like_one_process(tmp_path):
    run = tmp_path / "ddp"
    # data.batch_size is the global batch: each rank loads 8. The 3 validation batches of the 2 ranks
    # (rank r gets samples r, r + 2, ...) are the first 48 samples, the 3 batches of 16 of one process.
    proc = _run(["i2e_train.cli.train", "trainer=ddp_cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "+trainer.limit_val_batches=3", "data.batch_size=16", "data.on_bad_record=skip",
                 f"hydra.run.dir={run}"], tmp_path)
    out = proc.stdout + proc.stderr
    assert "Starting with 2 processes" in out and "GLOBAL_RANK: 1" in out
    assert out.count("validation top-1 of the best checkpoint") == 1  # printed by rank 0 only

    trained = json.loads((run / "metrics.json").read_text())
    best = trained["best_checkpoint"]
    assert best.startswith(str(run / "checkpoints"))

    _run(["i2e_train.cli.eval", f"ckpt_path={best}", "+trainer.limit_val_batches=3", "trainer.devices=1",
          f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert trained["best"]["val/top1"] == pytest.approx(single["val/top1"], abs=1e-6)
    assert trained["best"]["val/top5"] == pytest.approx(single["val/top5"], abs=1e-6)
    assert trained["best"]["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)

    # one run folder shared by both processes; everything in it written once, by rank 0
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    assert [f for f in files if f.endswith("metrics.csv")] == ["csv/metrics.csv"]
    assert json.loads((run / "bad_records.json").read_text()) == {"total": 0, "counts": {}, "examples": []}
    rank1 = [f for f in files if "process_1" in f or "rank_1" in f or "rank1" in f]
    assert rank1 == ["train_ddp_process_1.log"], files  # rank 1's own console log, nothing else
    assert not (run / ".hydra" / "overrides.yaml").read_text().count("train_ddp_process")
