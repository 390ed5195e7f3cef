"""NIR export: batch-norm folding, refusals, and the deployable network re-imported by SpikingJelly
and snnTorch (their own NIR importers) on the demo's validation set."""

from __future__ import annotations

import json
from pathlib import Path

import nir
import pytest
import torch
from torch import nn

from helpers import compose_in, run_cli, train_in_process
from i2e_train.models import create_model, load_checkpoint
from i2e_train.models.nir_export import (DT, NIRExportError, deploy_graph, export_nir, fold_batch_norm, read_nir,
                                         run_snntorch, run_spikingjelly)
from i2e_train.tasks.export_nir import LOGIT_TOL, export


def _random_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> nn.BatchNorm2d:
    """Running statistics and affine parameters far from the identity (a fold that forgot a term shows)."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


def _events(t: int, b: int, hw: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t, b, 2, hw, hw, generator=g) < 0.2).float()  # [T, B, 2, H, W]


# ---------------------------------------------------------------------------------------------
# batch-norm folding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias, affine", [(False, True), (True, True), (False, False)])
def test_fold_batch_norm_equals_conv_then_bn_in_eval_mode(bias, affine):
    """float64: equal to rounding (1e-12); float32 (as exported): within 1e-5 relative, 1e-5 absolute."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        torch.manual_seed(1)
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias).to(dtype)
        bn = _random_bn(nn.BatchNorm2d(6, affine=affine), g).to(dtype)
        x = torch.randn(3, 4, 9, 9, generator=g).to(dtype)
        folded = fold_batch_norm(conv, bn)
        assert type(folded) is nn.Conv2d and folded.bias is not None and folded.weight.dtype == dtype
        with torch.no_grad():
            torch.testing.assert_close(folded(x), bn(conv(x)), rtol=tol, atol=tol)


def test_fold_refuses_a_batch_norm_without_running_statistics():
    bn = nn.BatchNorm2d(6, track_running_stats=False)
    with pytest.raises(NIRExportError, match=r"model.layer1.0.conv1: BatchNorm2d without running statistics"):
        fold_batch_norm(nn.Conv2d(4, 6, 3), bn, "model.layer1.0.conv1")


def test_folded_network_equals_the_network_in_eval_mode():
    """The whole single-step copy (every BN folded, pools, LIFs, the 1x1-convolution head), run for T
    steps, gives the network's logits: the spikes are the same, the head sums in another order."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = create_model("deploy/ms_resnet_tiny", num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn(m, g)
            with torch.no_grad():
                m.bias.abs_().add_(0.5)  # membranes above threshold often enough: every stage spikes
    model.eval()
    x = _events(6, 4)
    with torch.no_grad():
        ref = model(x)
        spikes = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_state()
    assert 0.05 < spikes.mean() < 0.95  # the head's neurons fire: the logits depend on every layer
    torch.testing.assert_close(deploy_graph(model, (32, 32)).run(x), ref, rtol=0, atol=LOGIT_TOL)


# ---------------------------------------------------------------------------------------------
# what NIR cannot express: one line naming the layer and the alternative
# ---------------------------------------------------------------------------------------------


def test_standard_ms_resnet_is_refused_naming_its_max_pooling(tmp_path):
    with pytest.raises(NIRExportError, match=r"^model\.maxpool is max pooling \(MaxPool2d, kernel 3\): NIR has no max "
                                             r"pooling; train the deployable variant model=deploy/ms_resnet18 "):
        export_nir(create_model("ms_resnet18", num_classes=10), tmp_path / "m.nir", (32, 32), 8)
    assert not any(tmp_path.iterdir())  # nothing written


def test_refusals_name_the_layer():
    soft = create_model("deploy/ms_resnet_tiny", num_classes=10, v_reset=None)
    with pytest.raises(NIRExportError, match=r"model.layer1.0.sn1 resets by subtraction .*model.v_reset=0.0"):
        deploy_graph(soft, (32, 32))
    other = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2))
    with pytest.raises(NIRExportError, match=r"Sequential is not an MS-ResNet \(and model.1 is max pooling"):
        deploy_graph(other, (32, 32))
    from i2e_train.i2e import I2E

    with_converter = create_model("deploy/ms_resnet_tiny", num_classes=10)
    with_converter.i2e = I2E()
    with pytest.raises(NIRExportError, match=r"model.i2e is the I2E converter .*NIR cannot express it"):
        deploy_graph(with_converter, (32, 32))


def test_cli_refuses_the_standard_model_in_one_line(tmp_path):
    from i2e_train.models import export_safetensors

    ckpt = export_safetensors(create_model("ms_resnet_tiny", num_classes=10), tmp_path / "std.safetensors")
    out = tmp_path / "out"
    proc = run_cli("i2e_train.cli.export", f"ckpt_path={ckpt}", "model=ms_resnet_tiny", f"hydra.run.dir={out}",
                   cwd=tmp_path, check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("i2e-export: error: model.maxpool is max pooling"), proc.stderr
    assert "model=deploy/ms_resnet_tiny" in lines[-1] and not (out / "model.nir").exists()


# ---------------------------------------------------------------------------------------------
# the deployable variant
# ---------------------------------------------------------------------------------------------


def test_deploy_variant_takes_the_standard_weights_and_trains():
    standard = create_model("ms_resnet_tiny", num_classes=10)
    model = create_model("deploy/ms_resnet_tiny", num_classes=10)
    model.load_state_dict(standard.state_dict(), strict=True)  # only the (weightless) pooling differs
    assert type(model.maxpool) is nn.AvgPool2d and model.model_info["architecture"] == "deploy/ms_resnet_tiny"
    y = model(_events(2, 2))
    y.sum().backward()
    assert y.shape == (2, 10) and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("memory", ["none", "bits", "recompute", "least"])
def test_deploy_variant_training_step_on_fake_cuda(memory):
    """The GPU path of the average-pooling stem (tests/fakecuda.py): a training step in every
    memory mode without a host synchronisation or copy."""
    from fakecuda import HostTraffic, fake_cuda, fake_module
    from i2e_train.module import SNNClassifier

    def build():
        module = SNNClassifier(create_model("deploy/ms_resnet_tiny", num_classes=4), num_classes=4, memory=memory,
                               optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
        module.configure_model()
        return module

    with fake_cuda() as mode:
        module = fake_module(mode, build)
        batch = ((torch.rand(2, 2, 2, 32, 32, device="cuda") < 0.1).float(), torch.zeros(2, dtype=torch.long, device="cuda"))
        traffic = HostTraffic()
        with traffic:
            loss = module.training_step(batch, 0)
        assert loss.is_cuda and loss.shape == ()
        traffic.assert_clean(f"deploy/ms_resnet_tiny memory={memory}")


@pytest.mark.parametrize("name", ["ms_resnet18", "ms_resnet50"])
def test_deploy_configs_compose_and_export_the_bottleneck_too(name, tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from i2e_train.config import compose

    GlobalHydra.instance().clear()
    assert compose("train", [f"model=deploy/{name}"]).model.name == f"deploy/{name}"
    GlobalHydra.instance().clear()
    model = create_model(f"deploy/{name}", num_classes=5, widths=(4, 8, 8, 8), layers=(2, 1, 1, 1)).eval()
    graph = read_nir(export_nir(model, tmp_path / "m.nir", (32, 32), 4))
    lifs = sum(isinstance(m, _lif()) for m in model.modules())
    assert sum(isinstance(n, nir.LIF) for n in graph.nodes.values()) == lifs


def _lif():
    from spikingjelly.activation_based import neuron

    return neuron.LIFNode


# ---------------------------------------------------------------------------------------------
# acceptance: train briefly, export, re-import in SpikingJelly and snnTorch, compare on the demo
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """deploy/ms_resnet_tiny trained for 20 batches of the demo; (root, best checkpoint)."""
    root = tmp_path_factory.mktemp("nir")
    with pytest.MonkeyPatch.context() as mp:
        result, _ = train_in_process(root, mp, "model=deploy/ms_resnet_tiny", "trainer.max_epochs=1",
                                     "+trainer.limit_train_batches=20", "+trainer.num_sanity_val_steps=0", "~logger",
                                     "~callbacks.spike_stats", "~callbacks.event_media", "eval_after_fit=false")
    return root, result["best_checkpoint"]


@pytest.mark.slow
def test_exported_graph_runs_the_same_in_spikingjelly_and_snntorch(trained, monkeypatch):
    root, ckpt = trained
    out = root / "export"
    cfg = compose_in(root, monkeypatch, "export", [f"ckpt_path={ckpt}", "check=[spikingjelly,snntorch]"],
                     run_dir="export")
    result = export(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["model.nir", "nir_check.json"]  # only in the named folder
    report = json.loads((out / "nir_check.json").read_text())
    assert report == json.loads(json.dumps(result["check"]))
    assert report["samples"] == 360 and report["network_top1"] > 0.3  # all validation digits; it has learnt
    sj, snn = report["spikingjelly"], report["snntorch"]
    # SpikingJelly fires at H >= v_threshold like the network: the same logits, the same top-1 on every sample
    assert sj["over_tolerance"] == 0 and sj["max_abs_diff"] <= LOGIT_TOL and sj["same_top1_as_network"] == 360
    # snnTorch follows NIR (fire at H > v_threshold): the network under that rule, to the tolerance
    assert snn["over_tolerance"] == 0 and snn["max_abs_diff"] <= LOGIT_TOL
    assert snn["same_top1_as_network"] == 360 and snn["top1"] == sj["top1"] == report["network_top1"]

    graph = read_nir(out / "model.nir")  # the file as written: structure and metadata
    kinds = {type(n).__name__ for n in graph.nodes.values()}
    assert kinds == {"Input", "Output", "Conv2d", "AvgPool2d", "LIF"}  # no BatchNorm, no MaxPool, no Flatten
    readers = [dst for _, dst in graph.edges]
    assert max(readers.count(d) for d in set(readers)) == 2  # residual sums: two edges into a reader
    meta = graph.metadata
    assert meta["timesteps"] == 8 and list(meta["input_shape"]) == [2, 32, 32] and meta["dt"] == DT
    assert meta["architecture"] == "deploy/ms_resnet_tiny" and meta["data"] == "I2E-Digits"
    lif = graph.nodes["layer1_0_sn1"]  # tau = 2 steps, decay_input=False, hard reset to 0
    assert float(lif.tau.flat[0]) == pytest.approx(2 * DT) and float(lif.r.flat[0]) == 2.0
    assert float(lif.v_leak.flat[0]) == 0.0 == float(lif.v_reset.flat[0]) and float(lif.v_threshold.flat[0]) == 1.0


@pytest.mark.slow
def test_importers_match_the_network_directly(trained):
    """The same comparison without i2e-export's check: our network in eval mode against the file
    imported by SpikingJelly's import_from_nir and snnTorch's import_from_nir, on validation events."""
    from hydra.utils import instantiate

    from i2e_train.config import compose

    root, ckpt = trained
    model = create_model("deploy/ms_resnet_tiny", num_classes=10)
    load_checkpoint(model, ckpt)
    model.eval()
    path = export_nir(model, root / "direct.nir", (32, 32), 8)
    dm = instantiate(compose("train", [f"paths.data_dir={root / 'data'}"]).data)
    dm.setup("validate")
    events, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)  # [8, 32, 2, 32, 32]
    with torch.no_grad():
        ref = model(events)
    torch.testing.assert_close(run_spikingjelly(path, events), ref, rtol=0, atol=LOGIT_TOL)
    strict = deploy_graph(model, (32, 32)).strict_threshold().run(events)
    torch.testing.assert_close(run_snntorch(path, events), strict, rtol=0, atol=LOGIT_TOL)
    assert torch.equal(run_snntorch(path, events).argmax(1), ref.argmax(1))


def test_non_spiking_head_is_exported_as_it_runs(tmp_path):
    """With ``sn1 = nn.Identity()`` fc reads the pooled membranes: the graph has no head LIF and
    SpikingJelly's import of it gives the network's logits."""
    torch.manual_seed(0)
    model = create_model("deploy/ms_resnet_tiny", num_classes=5, widths=(8, 8, 8, 8))
    model.sn1 = nn.Identity()
    model.eval()
    path = export_nir(model, tmp_path / "m.nir", (32, 32), 3)
    graph = read_nir(path)
    assert "sn1" not in graph.nodes and ("avgpool", "fc") in [tuple(e) for e in graph.edges]
    x = _events(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(run_spikingjelly(path, x), model(x), rtol=0, atol=LOGIT_TOL)


def test_read_nir_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.nir: no such NIR file"):
        read_nir(tmp_path / "no_such.nir")


def test_nir_file_is_written_whole_at_the_named_path(tmp_path):
    model = create_model("deploy/ms_resnet_tiny", num_classes=3, widths=(4, 4, 4, 4)).eval()
    target = tmp_path / "m.nir"
    assert export_nir(model, target, (16, 16), 2) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nir"]  # no temporary left beside it
    assert Path(target).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # HDF5: arrays and strings, no code


def test_deploy_study_compares_the_two_stems_on_the_same_recipe(tmp_path, monkeypatch):
    """configs/study/deploy.yaml: per seed one run of each stem, the same overrides but the model."""
    from i2e_train.config import compose
    from i2e_train.tasks.study import study_runs

    monkeypatch.setenv("I2E_ROOT", str(tmp_path))
    runs = study_runs(compose("study", ["study=deploy", "seeds=[0,1,2]"]))
    assert sorted((r["cell_name"], r["seed"]) for r in runs) == [(f"stem={s}", k) for s in ("avgpool", "maxpool")
                                                                 for k in range(3)]
    for r in runs:
        cfg = compose("train", [*r["overrides"], f"seed={r['seed']}"])
        model = "deploy/ms_resnet_tiny" if r["cell"]["stem"] == "avgpool" else "ms_resnet_tiny"
        assert cfg.model.name == model and cfg.trainer.max_epochs == 2 and cfg.data.name == "I2E-Digits"


@pytest.mark.parametrize("option, message", [("check=[norse]", r"check=\['norse'\]: unknown importer 'norse'"),
                                             ("check_batches=0", r"check_batches=0: expected a whole number >= 1"),
                                             ("format=onnx", r"format=onnx: expected nir or safetensors")])
def test_bad_export_options_are_refused_before_anything_is_written(option, message, tmp_path, monkeypatch):
    from i2e_train.models import export_safetensors

    ckpt = export_safetensors(create_model("deploy/ms_resnet_tiny", num_classes=10), tmp_path / "m.safetensors")
    cfg = compose_in(tmp_path, monkeypatch, "export", [f"ckpt_path={ckpt}", option], run_dir="out")
    with pytest.raises(ValueError, match=message):
        export(cfg)
    assert not (tmp_path / "out").exists()
