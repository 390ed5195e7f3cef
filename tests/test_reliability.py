"""Reliability and security (issue 24): each test is named after what it would break.

- a crafted checkpoint (its payload writes a marker file) is refused by every entry point and API,
  and the payload never runs;
- run folders are never shared nor overwritten; temporaries are removed only by their owner;
- i2e-eval overrides land at their key; nested experiment names are listed; README pipeline forms parse;
- bad config values and files are one error line naming the key or path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli_env, run_cli, train_in_process
from i2e_train.models import create_model, load_checkpoint
from i2e_train.models.checkpoint import load_torch_file, read_checkpoint
from i2e_train.models.errors import CheckpointFormatError

FAST = ["debug=fast", "~logger"]


class _Payload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def _malicious(path: Path, marker: Path, lightning: bool = True) -> Path:
    """A checkpoint that looks like ours (real tensors, the keys Lightning writes) plus the payload."""
    sd = {"model." + k: v for k, v in create_model("ms_resnet_tiny", num_classes=10).state_dict().items()}
    obj = {"epoch": 1, "global_step": 2, "state_dict": sd, "hyper_parameters": {"x": _Payload(marker)}}
    if lightning:
        obj["pytorch-lightning_version"] = "2.6.0"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture()
def bad(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _malicious(tmp_path / "evil" / "last.ckpt", marker)
    yield path, marker
    assert not marker.exists(), "the checkpoint's payload ran"


def _refused(err) -> None:
    msg = str(err.value)
    assert "refused" in msg and "exec" in msg and "safetensors" in msg, msg


def test_malicious_checkpoint_never_runs_through_the_apis(bad, tmp_path):
    path, _ = bad
    for call in (lambda p: read_checkpoint(p), lambda p: load_torch_file(p),
                 lambda p: load_checkpoint(create_model("ms_resnet_tiny", num_classes=10), p),
                 lambda p: create_model("ms_resnet_tiny", num_classes=10, pretrained=p)):
        for name in ("last.ckpt", "w.pth.tar", "w.pth", "w.pt"):
            target = path.with_name(name)
            if not target.exists():
                target.write_bytes(path.read_bytes())
            with pytest.raises(CheckpointFormatError) as err:
                call(target)
            _refused(err)


def test_malicious_checkpoint_never_runs_as_a_released_weight(bad, tmp_path, monkeypatch):
    path, _ = bad
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "checkpoints"
    (cache / "deep").mkdir(parents=True)
    (cache / "deep" / "cifar10_baseline.pth.tar").write_bytes(path.read_bytes())  # not an expected place
    from i2e_train.models.errors import ReleasedWeightsUnavailable

    with pytest.raises(ReleasedWeightsUnavailable, match="not in"):
        create_model("ms_resnet18", pretrained="released:cifar10_baseline", cache_dir=cache)
    (cache / "cifar10_baseline.pth").write_bytes(path.read_bytes())  # the expected place: read, and refused
    with pytest.raises(CheckpointFormatError) as err:
        create_model("ms_resnet18", pretrained="released:cifar10_baseline", cache_dir=cache)
    _refused(err)


def test_malicious_checkpoint_never_runs_through_init_from_resume_eval_and_pipeline(bad, tmp_path, monkeypatch):
    path, _ = bad
    with pytest.raises(CheckpointFormatError) as err:
        train_in_process(tmp_path, monkeypatch, *FAST, f"init_from={path}")
    _refused(err)
    with pytest.raises(CheckpointFormatError) as err:
        train_in_process(tmp_path, monkeypatch, *FAST, f"ckpt_path={path}", run_dir="resume")
    _refused(err)
    assert not (tmp_path / "resume").exists()  # refused before anything was written

    from i2e_train.config import compose
    from i2e_train.tasks.evaluate import evaluate

    with pytest.raises(CheckpointFormatError) as err:
        evaluate(compose("eval", [f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'eval'}"]))
    _refused(err)

    from i2e_train.tasks.pipeline import run_pipeline

    cfg = compose("pipeline", ["pipeline=demo", f"run_dir={tmp_path / 'pipe'}", f"common_overrides=[debug=fast,'init_from={path}']"])
    with pytest.raises(CheckpointFormatError) as err:
        run_pipeline(cfg)
    _refused(err)


def test_malicious_checkpoint_is_one_error_line_at_the_cli(bad, tmp_path):
    path, _ = bad
    proc = run_cli("i2e_train.cli.train", *FAST, f"init_from={path}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("i2e-train: error: ") and "refused" in lines[-1] and str(path) in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


TINY = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "~logger", "eval_after_fit=false"]


def test_finished_run_is_not_overwritten_and_resumes_from_checkpoints_read_weights_only(tmp_path, monkeypatch):
    """Our .ckpt files (hyper-parameters, callback states, optimiser, schedule, RNG) hold nothing
    weights_only=True refuses; a finished run folder is refused unless resumed or overwritten."""
    from i2e_train.tasks.runs import RunFolderError

    _, run = train_in_process(tmp_path, monkeypatch, "trainer.max_epochs=1", *TINY)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "i2e_config"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and read_checkpoint(last).format == "lightning"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds checkpoints.*ckpt_path=last.*overwrite=true"):
        train_in_process(tmp_path, monkeypatch, "trainer.max_epochs=1", *TINY)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # nothing touched
    train_in_process(tmp_path, monkeypatch, "trainer.max_epochs=2", *TINY, "ckpt_path=last")
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["epoch"] > ckpt["epoch"] and resumed["global_step"] == 2 * ckpt["global_step"]
