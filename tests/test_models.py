"""MS-ResNet family and registry: shapes, state reset, key layout (REFERENCE section 3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from spikingjelly.activation_based import neuron, surrogate

from i2e_train.models import (
    BasicBlock,
    Bottleneck,
    MSResNet,
    create_model,
    is_model,
    list_models,
    register_model,
)

BIG = {"ms_resnet50", "ms_resnet101", "ms_resnet152"}


def events(t: int, b: int, hw: int = 32, c: int = 2, seed: int = 0) -> torch.Tensor:
    """Sparse binary events [T, B, C, H, W]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t, b, c, hw, hw, generator=g) < 0.2).float()


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_registry_lists_the_family():
    names = list_models()
    assert names == sorted(names)
    for n in ("ms_resnet18", "ms_resnet34", "ms_resnet50", "ms_resnet101", "ms_resnet152", "ms_resnet_tiny"):
        assert n in names and is_model(n)
    assert list_models("ms_resnet1*") == ["ms_resnet101", "ms_resnet152", "ms_resnet18"]
    assert list_models(["ms_*34", "ms_*tiny"]) == ["ms_resnet34", "ms_resnet_tiny"]
    assert list_models("deploy/*") == ["deploy/" + n for n in list_models("ms_resnet*")]  # NIR-exportable variants
    assert "sj/sew_resnet18" in names  # SpikingJelly's zoo (models/sj_zoo.py)
    assert not is_model("resnet18")


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError) as err:
        create_model("ms_resnet19")
    msg = str(err.value)
    assert "'ms_resnet19'" in msg and "Did you mean" in msg and "ms_resnet18" in msg
    assert "ms_resnet_tiny" in msg  # the full list of available names


def test_register_model_decorator_and_collisions(monkeypatch):
    from i2e_train.models import registry

    monkeypatch.setattr(registry, "_model_entrypoints", dict(registry._model_entrypoints))

    @register_model
    def _test_only_tiny_variant(num_classes: int = 1000, **kwargs):
        return create_model("ms_resnet_tiny", num_classes=num_classes, widths=(8, 8, 8, 8), **kwargs)

    assert is_model("_test_only_tiny_variant")
    model = create_model("_test_only_tiny_variant", num_classes=3)
    assert model(events(2, 2)).shape == (2, 3)

    def ms_resnet18(num_classes: int = 1000, **kwargs):  # same name, different function
        raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        register_model(ms_resnet18)


def test_model_info_and_overrides():
    m = create_model("ms_resnet18", num_classes=10)
    assert m.model_info["architecture"] == "ms_resnet18"
    assert m.model_info["block"] == "BasicBlock"
    assert m.model_info["layers"] == [2, 2, 2, 2]
    assert m.model_info["widths"] == [64, 128, 256, 512]
    assert m.model_info["num_classes"] == 10
    assert create_model("ms_resnet50").model_info["block"] == "Bottleneck"

    tiny = create_model("ms_resnet_tiny", num_classes=5)
    assert tiny.model_info["layers"] == [1, 1, 1, 1] and tiny.model_info["widths"] == [16, 32, 64, 128]
    assert tiny.fc.in_features == 128
    custom = create_model("ms_resnet_tiny", num_classes=5, layers=(1, 2, 1, 1), widths=(8, 16, 16, 32), in_channels=3)
    assert custom.model_info["layers"] == [1, 2, 1, 1] and len(custom.layer2) == 2
    assert custom.conv1.weight.shape == (8, 3, 7, 7) and custom.fc.weight.shape == (5, 32)
    assert custom(events(2, 2, c=3)).shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# forward / backward / state reset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in list_models("ms_resnet*")],
)
def test_forward_backward_and_state_reset(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    # the big Bottleneck models: one sample, T = 2 (BN in training mode needs T*B > 1 at 1x1)
    t, b = (2, 1) if name in BIG else (3, 2)
    x = events(t, b)
    y = model(x)
    assert y.shape == (b, 7) and torch.isfinite(y).all()
    y.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # states are reset at the start of each forward
        model.eval()
        assert torch.equal(model(x), model(x))


def test_model_can_be_deep_copied_after_training_steps():
    """No membrane tensor holding an autograd graph survives a forward (EMA/SWA deep-copy)."""
    model = create_model("ms_resnet_tiny", num_classes=4)
    x = events(2, 2)
    model(x).sum().backward()
    clone = copy.deepcopy(model)
    loss = model(x).sum()  # graph alive, not yet backpropagated
    copy.deepcopy(model)
    loss.backward()
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), model.eval()(x))


def test_calls_are_independent_of_previous_inputs():
    torch.manual_seed(0)
    model = create_model("ms_resnet_tiny", num_classes=4).eval()
    xa, xb = events(4, 2, seed=1), events(4, 2, seed=2)
    with torch.no_grad():
        alone = model(xb)
        model(xa)
        model(events(3, 5, hw=40))  # another T, batch and resolution in between
        assert torch.equal(model(xb), alone)


@pytest.mark.parametrize("t", [1, 2, 5])
def test_any_number_of_timesteps(t):
    model = create_model("ms_resnet_tiny", num_classes=3).eval()
    with torch.no_grad():
        assert model(events(t, 2)).shape == (2, 3)


def test_logits_are_the_time_mean_of_per_step_outputs():
    torch.manual_seed(0)
    model = create_model("ms_resnet_tiny", num_classes=6).eval()
    x = events(3, 2)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, 2, 128, 1, 1)
        spikes = model.forward_head(feats, pre_logits=True)
        assert spikes.shape == (3, 2, 128)
        assert set(spikes.unique().tolist()) <= {0.0, 1.0}  # the head LIF emits binary spikes
        expected = model.fc(spikes).mean(0)
        torch.testing.assert_close(model(x), expected)


def test_rejects_bad_input_shapes():
    model = create_model("ms_resnet_tiny", num_classes=3)
    with pytest.raises(ValueError, match=r"\[T, B, C, H, W\]"):
        model(torch.zeros(2, 2, 32, 32))
    with pytest.raises(ValueError, match="2 input channels"):
        model(torch.zeros(2, 2, 3, 32, 32))


def test_membrane_shortcut_adds_pre_spike_values():
    """With the residual branch zeroed, a block passes real-valued membrane input unchanged;
    a spike shortcut would binarise it."""
    model = create_model("ms_resnet_tiny", num_classes=3, zero_init_residual=True).eval()
    block = model.layer1[0]
    assert block.downsample is None
    x = torch.randn(3, 2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    assert torch.count_nonzero(block.bn2.weight) == 0

    bottleneck = create_model("ms_resnet50", num_classes=3, zero_init_residual=True)
    assert torch.count_nonzero(bottleneck.layer1[1].bn3.weight) == 0


def test_neuron_defaults_and_overrides():
    model = create_model("ms_resnet18", num_classes=10)
    lifs = [m for m in model.modules() if isinstance(m, neuron.LIFNode)]
    # 2 per block * 8 blocks + 3 downsample + head
    assert len(lifs) == 2 * 8 + 3 + 1
    for lif in lifs:
        assert lif.step_mode == "m"
        assert lif.tau == 2.0 and lif.v_threshold == 1.0 and lif.v_reset == 0.0
        assert lif.decay_input is False and lif.detach_reset is True
        assert isinstance(lif.surrogate_function, surrogate.ATan) and lif.surrogate_function.alpha == 2.0

    custom = create_model(
        "ms_resnet_tiny", tau=4.0, v_threshold=0.5, v_reset=None, decay_input=True, surrogate="sigmoid", surrogate_alpha=4.0
    )
    for lif in (m for m in custom.modules() if isinstance(m, neuron.LIFNode)):
        assert lif.tau == 4.0 and lif.v_threshold == 0.5 and lif.v_reset is None and lif.decay_input
        assert isinstance(lif.surrogate_function, surrogate.Sigmoid) and lif.surrogate_function.alpha == 4.0
    with pytest.raises(ValueError, match="unknown surrogate 'nope'"):
        create_model("ms_resnet_tiny", surrogate="nope")


def test_lif_dynamics_match_the_i2e_settings():
    """decay_input=False, hard reset to 0: H[t] = V[t-1] - V[t-1]/tau + X[t]; spike when H >= 1."""
    lif = create_model("ms_resnet_tiny").sn1
    x = torch.full((4, 1), 0.6)
    # H: 0.6, 0.9, 1.05 (spike, reset to 0), 0.6
    assert lif(x).flatten().tolist() == [0.0, 0.0, 1.0, 0.0]


def test_initialisation():
    torch.manual_seed(0)
    model = create_model("ms_resnet18", num_classes=10)
    w = model.layer4[1].conv2.weight  # fan_in = 512 * 9
    assert math.isclose(w.std().item(), math.sqrt(2.0 / (512 * 9)), rel_tol=0.03)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_reset_classifier():
    model = create_model("ms_resnet_tiny", num_classes=10)
    model.reset_classifier(4)
    assert model.fc.weight.shape == (4, 128) and model.num_classes == 4 and model.model_info["num_classes"] == 4
    x = events(2, 2)
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------
# key layout (written by hand from REFERENCE section 3)
# ---------------------------------------------------------------------------------------------


def _bn(prefix: str, c: int) -> dict[str, list[int]]:
    return {
        f"{prefix}.weight": [c],
        f"{prefix}.bias": [c],
        f"{prefix}.running_mean": [c],
        f"{prefix}.running_var": [c],
        f"{prefix}.num_batches_tracked": [],
    }


def _basic(prefix: str, cin: int, cout: int, downsample: bool) -> dict[str, list[int]]:
    keys = {f"{prefix}.conv1.weight": [cout, cin, 3, 3], **_bn(f"{prefix}.bn1", cout)}
    keys |= {f"{prefix}.conv2.weight": [cout, cout, 3, 3], **_bn(f"{prefix}.bn2", cout)}
    if downsample:
        keys |= {f"{prefix}.downsample.1.weight": [cout, cin, 1, 1], **_bn(f"{prefix}.downsample.2", cout)}
    return keys


def test_ms_resnet18_state_dict_layout():
    expected = {"conv1.weight": [64, 2, 7, 7], **_bn("bn1", 64)}
    expected |= _basic("layer1.0", 64, 64, False)
    expected |= _basic("layer1.1", 64, 64, False)
    expected |= _basic("layer2.0", 64, 128, True)
    expected |= _basic("layer2.1", 128, 128, False)
    expected |= _basic("layer3.0", 128, 256, True)
    expected |= _basic("layer3.1", 256, 256, False)
    expected |= _basic("layer4.0", 256, 512, True)
    expected |= _basic("layer4.1", 512, 512, False)
    expected |= {"fc.weight": [10, 512], "fc.bias": [10]}
    # a few entries spelled out in full, as they appear in the released files
    assert expected["layer1.0.conv1.weight"] == [64, 64, 3, 3]
    assert expected["layer2.0.downsample.1.weight"] == [128, 64, 1, 1]
    assert expected["layer2.0.downsample.2.running_mean"] == [128]
    assert expected["layer4.1.bn2.num_batches_tracked"] == []

    got = {k: list(v.shape) for k, v in create_model("ms_resnet18", num_classes=10).state_dict().items()}
    assert got == expected
    assert len(got) == 122


def test_ms_resnet34_and_bottleneck_keys():
    sd34 = create_model("ms_resnet34", num_classes=1000).state_dict()
    assert "layer3.5.conv2.weight" in sd34 and "layer3.6.conv1.weight" not in sd34
    assert "layer1.0.downsample.1.weight" not in sd34
    assert sd34["fc.weight"].shape == (1000, 512)

    sd50 = {k: list(v.shape) for k, v in create_model("ms_resnet50", num_classes=10).state_dict().items()}
    spots = {
        "conv1.weight": [64, 2, 7, 7],
        "layer1.0.conv1.weight": [64, 64, 1, 1],
        "layer1.0.conv2.weight": [64, 64, 3, 3],
        "layer1.0.conv3.weight": [256, 64, 1, 1],
        "layer1.0.bn3.running_var": [256],
        "layer1.0.downsample.1.weight": [256, 64, 1, 1],
        "layer1.0.downsample.2.num_batches_tracked": [],
        "layer1.1.conv1.weight": [64, 256, 1, 1],
        "layer2.0.conv2.weight": [128, 128, 3, 3],
        "layer2.0.downsample.1.weight": [512, 256, 1, 1],
        "layer4.2.conv3.weight": [2048, 512, 1, 1],
        "fc.weight": [10, 2048],
        "fc.bias": [10],
    }
    for key, shape in spots.items():
        assert sd50[key] == shape, key
    assert "layer3.5.conv3.weight" in sd50 and "layer3.6.conv1.weight" not in sd50
    assert not any(".sn" in k for k in sd50)  # neurons hold no state-dict entries


def test_block_classes_are_exported():
    assert BasicBlock.expansion == 1 and Bottleneck.expansion == 4
    model = MSResNet(BasicBlock, [1, 1, 1, 1], num_classes=2, widths=(8, 8, 16, 16))
    assert model(events(2, 2)).shape == (2, 2)
    with pytest.raises(ValueError, match="4 entries"):
        MSResNet(BasicBlock, [1, 1, 1], num_classes=2)
