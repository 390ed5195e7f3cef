"""i2e-pipeline: stages run in order, stage 2 starts from stage 1's weights, re-runs skip."""

from __future__ import annotations

import json

import pytest
import torch

from i2e_train.config import compose, expand_nested_globs, group_options
from i2e_train.models import state_digest

FAST = ("common_overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=3',"
        "'+trainer.limit_val_batches=2','~logger']")


def _run(root, monkeypatch) -> str:
    """``i2e-pipeline pipeline=demo`` in-process (the CLI itself: tests/test_all_experiments.py)."""
    from i2e_train.tasks.pipeline import report, run_pipeline

    monkeypatch.setenv("I2E_ROOT", str(root))
    return report(run_pipeline(compose("pipeline", ["pipeline=demo", FAST])))


@pytest.mark.slow
def test_pipeline_feeds_stage1_best_checkpoint_into_stage2_and_skips_on_rerun(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch)
    run_dir = tmp_path / "logs" / "pipeline" / "demo"
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    pre, fine = manifest["stages"]["pretrain"], manifest["stages"]["finetune"]
    assert fine["init_from_stage"] == "pretrain" and fine["init_from"] == pre["best_checkpoint"]
    ckpt = torch.load(pre["best_checkpoint"], map_location="cpu", weights_only=True)
    stage1 = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert fine["init_digest"] == state_digest(stage1), "stage 2 starts from exactly stage 1's best weights"
    assert pre["init_digest"] != fine["init_digest"]
    stamp = (run_dir / "pretrain" / "stage.json").stat().st_mtime_ns
    out = _run(tmp_path, monkeypatch)
    again = json.loads((run_dir / "pipeline.json").read_text())
    assert all(s["skipped"] for s in again["stages"].values())
    assert (run_dir / "pretrain" / "stage.json").stat().st_mtime_ns == stamp
    assert out.splitlines() == [f"pretrain: skipped (done earlier); best checkpoint {pre['best_checkpoint']}; init from None",
                                f"finetune: skipped (done earlier); best checkpoint {fine['best_checkpoint']}; "
                                f"init from {pre['best_checkpoint']}"]


def test_experiment_glob_expands_over_nested_folders():
    names = group_options("experiment")
    assert "cifar10/baseline1" in names and "demo" in names
    (arg,) = expand_nested_globs(["experiment=glob(*)"])
    assert arg.split("=", 1)[1].split(",") == names
    (arg,) = expand_nested_globs(["experiment=glob(cifar10dvs/*,exclude=[*transfer1])"])
    assert arg == "experiment=cifar10dvs/baseline,cifar10dvs/transfer2"
