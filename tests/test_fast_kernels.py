"""Our LIF operator (the compiled CPU kernel, or SpikingJelly's operators with I2E_CPU_KERNELS=0)
gives SpikingJelly's neuron to the bit.

Every comparison is against SpikingJelly's ``LIFNode`` with ``torch.equal``: no tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

from i2e_train import kernels
from i2e_train.models import create_model
from i2e_train.models.lif import (
    LIFNode,
    LIFParams,
    fused_lif_available,
    lif_multi_step,
    set_fast_kernels,
    with_spikingjelly_neurons,
)

pytestmark = pytest.mark.skipif(not fused_lif_available(), reason="numba kernels unavailable")


@pytest.fixture(params=["kernel", "operators"])
def lif_path(request, monkeypatch):
    """Run a test on the compiled CPU kernel and on SpikingJelly's operators (the CUDA path's)."""
    monkeypatch.setenv("I2E_CPU_KERNELS", "1" if request.param == "kernel" else "0")
    return request.param


def _lif_pair(**kw):
    kw = {"tau": 2.0, "v_threshold": 1.0, "detach_reset": True, "step_mode": "m", **kw}
    return neuron.LIFNode(**kw), LIFNode(**kw)


def _run(node, x, g):
    """Spikes, final membrane and input gradient of one multi-step call from a fresh state."""
    node.reset()
    xi = x.clone().requires_grad_()
    spikes = node(xi)
    ((spikes * g).sum() + node.v.sum()).backward()
    return spikes.detach(), node.v.detach(), xi.grad


SURROGATES = [surrogate.ATan(2.0), surrogate.PiecewiseQuadratic(1.0), surrogate.SoftSign(2.0), surrogate.SuperSpike(3.0),
              surrogate.Sigmoid(4.0)]  # fmt: skip


@pytest.mark.parametrize(
    "sg,decay_input,v_reset",
    list(itertools.product(SURROGATES, [False, True], [0.0, None, -0.3])),
    ids=lambda p: type(p).__name__ if isinstance(p, nn.Module) else str(p),
)
def test_lif_operator_bit_identical(sg, decay_input, v_reset, lif_path):
    torch.manual_seed(0)
    ref, ours = _lif_pair(decay_input=decay_input, v_reset=v_reset, surrogate_function=sg)
    x = torch.randn(6, 3, 5, 37, 11) * 1.2 + 0.5  # N = 3*5*37*11 is not a multiple of any vector width
    x[0, 0, 0, :3, :3] = 1.0  # exactly at threshold after the first charge of a fresh neuron
    g = torch.randn_like(x)
    a, b = _run(ref, x, g), _run(ours, x, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_lif_state_carries_across_calls(lif_path):
    """Two calls without reset: the second starts from the first's membrane, gradients flow through it."""
    torch.manual_seed(1)
    ref, ours = _lif_pair(decay_input=False, v_reset=0.0, surrogate_function=surrogate.ATan(2.0))
    x1, x2 = torch.randn(4, 2, 300) + 0.4, torch.randn(4, 2, 300) + 0.4
    g = torch.randn(4, 2, 300)
    res = []
    for node in (ref, ours):
        node.reset()
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        s1 = node(a)
        s2 = node(b)
        ((s1 * g).sum() + (s2 * g * 0.5).sum() + node.v.square().sum()).backward()
        res.append((s1, s2, node.v.detach(), a.grad, b.grad))
    for p, q in zip(*res):
        assert torch.equal(p, q)


def test_lif_no_grad_and_settings_the_operator_does_not_cover(lif_path):
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64) + 0.5
    ref, ours = _lif_pair(v_reset=0.0, surrogate_function=surrogate.ATan(2.0))
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))
    for kw in ({"detach_reset": False}, {"store_v_seq": True}):  # SpikingJelly's own path: still the same
        ref, ours = _lif_pair(v_reset=0.0, **{"surrogate_function": surrogate.ATan(2.0), **kw})
        assert ours.operator_params() is None
        assert torch.equal(ref(x), ours(x))
    ref, ours = _lif_pair(v_reset=0.0, surrogate_function=surrogate.ATan(2.0))
    assert torch.equal(ref(x.double()), ours(x.double()))  # float64: SpikingJelly's path


def test_the_compiled_kernel_runs_only_where_it_applies(monkeypatch):
    """CPU float32 with a surrogate it evaluates; not with I2E_CPU_KERNELS=0, node.fast False or Sigmoid."""
    lif = kernels.load("lif")
    calls = []
    real = lif.lif_forward
    monkeypatch.setattr(lif, "lif_forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 2, 40)

    def run(**kw):
        node = LIFNode(**{"tau": 2.0, "surrogate_function": surrogate.ATan(), "detach_reset": True, "step_mode": "m",
                          **kw})  # fmt: skip
        node(x)
        return node

    node = run()
    assert len(calls) == 1
    monkeypatch.setenv("I2E_CPU_KERNELS", "0")
    run()
    assert len(calls) == 1
    monkeypatch.delenv("I2E_CPU_KERNELS")
    run(surrogate_function=surrogate.Sigmoid())
    assert set_fast_kernels(node, False) == 1
    node.reset()
    node(x)
    assert len(calls) == 1


def test_lif_multi_step_rejects_a_membrane_of_another_shape():
    p = LIFParams(2.0, False, 1.0, 0.0, 1, 2.0)
    with pytest.raises(ValueError, match="membrane shape"):
        lif_multi_step(torch.randn(3, 4), torch.zeros(5), p)


def test_ms_resnet_training_identical_to_the_official_network(monkeypatch):
    """Three SGD steps of MS-ResNet18: SpikingJelly's neurons, our operator on the compiled kernel
    and on SpikingJelly's operators: the same losses and weights, to the bit."""
    x = (torch.rand(2, 2, 2, 64, 64, generator=torch.Generator().manual_seed(7)) < 0.1).float()  # [T, B, 2, H, W]
    y = torch.tensor([1, 7])
    runs = []
    for variant in ("official", "kernel", "operators"):
        monkeypatch.setenv("I2E_CPU_KERNELS", "0" if variant == "operators" else "1")
        torch.manual_seed(0)
        model = create_model("ms_resnet18", num_classes=10)
        if variant == "official":
            with_spikingjelly_neurons(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0])
        for key, value in runs[0][1].items():
            assert torch.equal(value, other[1][key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, torch.int32, torch.uint8])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5, 7), (8, 16, 64, 16, 16)])
def test_kernel_outputs_are_aligned_contiguous_host_tensors(dtype, shape):
    t = kernels.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert t.data_ptr() % 64 == 0
    t.fill_(1)  # writable, and its numpy view is the same memory (the kernels write through it)
    if t.numel():
        t.numpy().reshape(-1)[0] = 7
        assert t.reshape(-1)[0].item() == 7 and t.sum().item() == t.numel() + 6
