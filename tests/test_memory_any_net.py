"""Memory modes on any network through the engine (i2e_train.models.recompute): SpikingJelly's
SEW-ResNet and Spiking VGG, a small user-written network and the model zoo, on the path CUDA takes.
Losses and gradients equal mode none to the bit (fp32) in every rung; under bf16 autocast every
rung keeps no more than in fp32; the forward never synchronises (fake CUDA) and the backward is
traced on meta."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from i2e_train.models import bitpack, create_model
from i2e_train.models.lif import set_fast_kernels
from i2e_train.models.memory import MEMORY_MODES, set_memory
from i2e_train.models.recompute import kept_bytes

RUNGS = ("bits", "recompute", "least")
I2E_NEURON = {"tau": 2.0, "decay_input": False, "v_threshold": 1.0, "v_reset": 0.0, "detach_reset": True,
              "surrogate": "atan", "surrogate_alpha": 2.0}  # fmt: skip


def _lif():
    return neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True, step_mode="m")


class UserNet(nn.Module):
    """A user's own network: conv -> BN -> LIF, max pooling, a spiking residual, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.sn1 = layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif()
        self.pool = layer.MaxPool2d(2)
        self.conv2, self.bn2, self.sn2 = layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif()
        self.fc = layer.Linear(8 * 8 * 8, 10)
        functional.set_step_mode(self, "m")

    def forward(self, x):  # [T, B, 2, 16, 16] -> [B, 10]
        functional.reset_net(self)
        s = self.pool(self.sn1(self.bn1(self.conv1(x))))  # [T, B, 8, 8, 8]
        s = s + self.sn2(self.bn2(self.conv2(s)))  # spikes added: 0, 1, 2
        out = self.fc(s.flatten(2)).mean(0)
        functional.reset_net(self)
        return out


def _sew():
    from spikingjelly.activation_based.model import sew_resnet

    net = sew_resnet.SEWResNet(sew_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, cnf="ADD",
                               spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.ATan(), detach_reset=True)  # fmt: skip
    net.conv1 = layer.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    functional.set_step_mode(net, "m")
    return _Mean(net)


def _vgg():
    from spikingjelly.activation_based.model import spiking_vgg

    net = spiking_vgg.SpikingVGG([8, "M", 16], batch_norm=True, num_classes=10, spiking_neuron=neuron.LIFNode,
                                 surrogate_function=surrogate.ATan(), detach_reset=True)  # fmt: skip
    net.features[0] = layer.Conv2d(2, 8, 3, padding=1)
    net.classifier = nn.Sequential(layer.Linear(16 * 7 * 7, 32), _lif(), layer.Dropout(0.3), layer.Linear(32, 10))
    functional.set_step_mode(net, "m")
    return _Mean(net)


class _Mean(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        functional.reset_net(self.net)
        out = self.net(x).mean(0)
        functional.reset_net(self.net)
        return out


def _ms_tiny():
    model = create_model("ms_resnet_tiny", num_classes=10)
    set_fast_kernels(model, False)
    return model


def _zoo_sew():
    model = create_model("sj/sew_resnet", num_classes=10, in_channels=2, resolution=32, layers=[1, 1, 1, 1],
                         **I2E_NEURON)  # as model=sj/sew_resnet builds it from configs/neuron/lif.yaml
    set_fast_kernels(model, False)
    return model


NETS = {"user": (UserNet, 16), "sew": (_sew, 32), "vgg": (_vgg, 16), "ms_resnet_tiny": (_ms_tiny, 32),
        "zoo_sew": (_zoo_sew, 32)}  # fmt: skip


def _events(hw: int, t: int = 2, b: int = 2) -> torch.Tensor:
    return (torch.rand(t, b, 2, hw, hw, generator=torch.Generator().manual_seed(3)) < 0.2).float()


def _train(name: str, mode: str, steps: int = 2):
    make, hw = NETS[name]
    torch.manual_seed(0)
    model = make()
    set_memory(model, mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _events(hw), torch.tensor([1, 7])
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return out, model.state_dict()


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("I2E_CPU_KERNELS", "0")


@pytest.mark.parametrize("mode", RUNGS)
@pytest.mark.parametrize("name", list(NETS))
def test_any_network_trains_bit_identically(name, mode, torch_path):
    (ref, ref_state), (got, got_state) = _train(name, "none"), _train(name, mode)
    for (la, ga), (lb, gb) in zip(ref, got):
        assert torch.equal(la, lb)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert all(torch.equal(v, got_state[k]) for k, v in ref_state.items())  # BN statistics moved once


def _kept(name: str, mode: str, dtype=None) -> int:
    make, hw = NETS[name]
    torch.manual_seed(0)
    model = make()
    set_memory(model, mode)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return kept_bytes(lambda: model(_events(hw, 4)), params)


@pytest.mark.parametrize("name", list(NETS))
def test_every_rung_keeps_less_in_fp32_and_no_more_under_bf16_autocast(name, torch_path):
    kept = {mode: _kept(name, mode) for mode in ("none", *RUNGS)}
    # SpikingJelly's own neurons (user, sew, vgg) keep what they save, their spikes become bits;
    # our LIF (ms_resnet_tiny, zoo_sew) keeps H, from which its spikes come back (SEW: not its sums of spikes)
    assert kept["bits"] < (0.7 if name == "ms_resnet_tiny" else 0.9) * kept["none"]
    assert kept["least"] <= kept["recompute"] < 0.8 * kept["bits"]
    for mode in RUNGS:  # no silent fallback under autocast: at most what fp32 keeps
        assert _kept(name, mode, torch.bfloat16) <= kept[mode], mode


def test_bf16_autocast_keeps_spikes_as_bf16_bits(torch_path, monkeypatch):
    """least: spikes of SpikingJelly's neurons under bf16 autocast are packed in bf16 (nothing falls back)."""
    packed = []
    pack = bitpack.pack_spikes
    monkeypatch.setattr(bitpack, "pack_spikes", lambda x, trusted=False: packed.append(x.dtype) or pack(x, trusted))
    torch.manual_seed(0)
    model = UserNet()
    set_memory(model, "least")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(_events(16)).float().sum()
    loss.backward()
    assert torch.bfloat16 in packed


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_forward_on_fake_cuda_never_synchronises(mode):
    """Under FakeTensorMode on device cuda any host synchronisation (item, bool, nonzero, a host
    list to the device) raises; the forward and the packing run through."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
        model = UserNet()  # parameters made on the fake device
        set_memory(model, mode)
        x = torch.zeros(2, 2, 2, 16, 16, device="cuda")
        out = model(x)
        assert out.shape == (2, 10) and out.device.type == "cuda"


def test_compile_says_it_runs_the_plain_forward():
    from i2e_train.module import SNNClassifier

    module = SNNClassifier(UserNet(), num_classes=10, compile=True)
    with pytest.warns(UserWarning, match="plain forward, memory mode 'bits' does not apply"):
        module.configure_model()
    quiet = SNNClassifier(UserNet(), num_classes=10, compile=True, memory="none")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.configure_model()


@pytest.mark.parametrize("mode", RUNGS)
def test_backward_traced_on_meta_never_synchronises(mode):
    """The backward (recomputations, unpacking, the stem's slices) on the meta device: no host read."""
    from fakecuda import HostTraffic

    torch.manual_seed(0)
    model = UserNet().to("meta")
    set_memory(model, mode)
    x = torch.zeros(2, 2, 2, 16, 16, device="meta")
    with HostTraffic() as traffic:
        F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device="meta")).backward()
    traffic.assert_clean(f"UserNet memory={mode} (meta)")


def test_engine_runs_only_with_gradients_and_stops_after_the_forward(monkeypatch):
    from i2e_train.models import recompute

    seen = []
    real_start = recompute.start
    monkeypatch.setattr(recompute, "start", lambda x, owner, rung: seen.append(rung.name) or real_start(x, owner, rung))
    model = create_model("ms_resnet_tiny", num_classes=10)
    set_memory(model, "recompute")
    x = _events(32)
    with torch.no_grad():
        model(x)
    assert recompute.active() is None
    model(x).sum().backward()
    assert seen == ["recompute", "recompute"] and recompute.active() is None  # no tape without gradients
    set_memory(model, "none")
    model(x).sum().backward()
    assert seen == ["recompute", "recompute"]


class InPlaceNet(nn.Module):
    """Spikes and a batch norm's output written in place before they are saved."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.sn1 = layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif()
        self.conv2, self.bn2, self.sn2 = layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif()
        self.fc = layer.Linear(8 * 16 * 16, 10)
        functional.set_step_mode(self, "m")

    def forward(self, x):  # [T, B, 2, 16, 16] -> [B, 10]
        functional.reset_net(self)
        s = self.sn1(self.bn1(self.conv1(x)))
        s += x[:, :, :1]  # spikes + events: values 0, 1, 2 in the spikes' storage
        h = self.bn2(self.conv2(s))
        h.mul_(1.5)  # a recomputable output changed in place
        out = self.fc(self.sn2(h).flatten(2)).mean(0)
        functional.reset_net(self)
        return out


def test_tensors_written_in_place_are_kept_as_they_are(torch_path):
    def train(mode):
        torch.manual_seed(0)
        model = InPlaceNet()
        set_memory(model, mode)
        loss = F.cross_entropy(model(_events(16)), torch.tensor([1, 7]))
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (la, ga), (lb, gb) = train("none"), train("bits")
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_sums_of_spikes_are_not_kept(torch_path, monkeypatch):
    """SEW-ResNet's ADD connection (spikes + spikes, values 0, 1, 2) is recomputed from the spikes
    (least: the zoo's SEW-ResNet keeps under a fifth of what autograd keeps); not watching the sums
    keeps every block's input."""
    from i2e_train.models import recompute

    none, kept = _kept("zoo_sew", "none"), _kept("zoo_sew", "least")
    assert kept < 0.2 * none
    monkeypatch.setattr(recompute, "_ADDS", set())  # sums not watched: each block's input is kept
    assert _kept("zoo_sew", "least") > 1.8 * kept
