"""i2e-eval on a released-weight name: model and data picked from the table, results written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import compose_in, save_official_checkpoint
from i2e_train.codec import encode_record
from i2e_train.data.writer import shard_name, write_shard
from i2e_train.models import create_model
from i2e_train.tasks.evaluate import evaluate_from_overrides


@pytest.mark.slow
def test_eval_released_name_uses_its_model_and_data(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("ms_resnet18", num_classes=10).eval()
    save_official_checkpoint(model, tmp_path / "checkpoints" / "cifar10_baseline.pth.tar")
    rng = np.random.default_rng(0)
    events = rng.random((6, 8, 2, 128, 128)) < 0.06
    labels = [0, 1, 2, 3, 4, 5]
    names = [str(i) for i in range(10)]
    for split in ("train", "validation"):
        write_shard(tmp_path / "i2e" / "I2E-CIFAR10" / shard_name(split, 0, 1),
                    [f"{lab}/{i}.npy" for i, lab in enumerate(labels)], labels,
                    [encode_record(e) for e in events], names)
    overrides = ["ckpt_path=released:cifar10_baseline", f"data.path={tmp_path / 'i2e'}", "data.num_workers=0",
                 "data.batch_size=3"]
    cfg = compose_in(tmp_path, monkeypatch, "eval", overrides)
    assert cfg.model.name == "ms_resnet_tiny" and cfg.data.name == "I2E-Digits"  # before the released name picks
    result = evaluate_from_overrides(cfg, overrides + [f"paths.output_dir={tmp_path / 'run'}"])
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == result and metrics["model"] == "ms_resnet18" and metrics["data"] == "I2E-CIFAR10"
    with torch.no_grad():
        logits = model(torch.from_numpy(events).float().transpose(0, 1))
    expected = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert metrics["val/top1"] == pytest.approx(expected, abs=1e-6)
    cm = json.loads((run / "confusion_matrix.json").read_text())
    assert np.asarray(cm).sum() == 6
    from PIL import Image

    with Image.open(run / "confusion_matrix.png") as png:
        assert png.format == "PNG" and min(png.size) > 100
    # firing rates and SOPs of the released weight on this data: the stem reads the events themselves
    stats = json.loads((run / "spike_stats.json").read_text())
    conv1 = next(s for s in stats["synapses"] if s["name"] == "conv1")
    assert conv1["input_rate"] == pytest.approx(events.mean(), rel=1e-9) and conv1["spiking_input"]
    assert stats["sops_per_sample"] > 0 and metrics["spikes/sops_per_sample"] == pytest.approx(stats["sops_per_sample"])
    assert (run / "spike_rates.png").is_file()
