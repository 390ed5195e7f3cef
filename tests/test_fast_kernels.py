"""The fast CPU paths (fused LIF, Conv2d backward, MaxPool2d) give bit-identical results.

Every comparison is against the plain layer they replace (SpikingJelly's ``LIFNode``,
``torch.nn.Conv2d``, ``torch.nn.MaxPool2d``) with ``torch.equal``: no tolerance.
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
from i2e_train.models import layers as fast_layers
from i2e_train.models.layers import Conv2d, MaxPool2d, set_fast_kernels
from i2e_train.models.lif import LIFNode, fused_lif_available, lif_multi_step

pytestmark = pytest.mark.skipif(not fused_lif_available(), reason="numba kernels unavailable")


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


SURROGATES = [surrogate.ATan(2.0), surrogate.PiecewiseQuadratic(1.0), surrogate.SoftSign(2.0), surrogate.SuperSpike(3.0)]


@pytest.mark.parametrize(
    "sg,decay_input,v_reset",
    list(itertools.product(SURROGATES, [False, True], [0.0, None, -0.3])),
    ids=lambda p: type(p).__name__ if isinstance(p, nn.Module) else str(p),
)
def test_fused_lif_bit_identical(sg, decay_input, v_reset):
    torch.manual_seed(0)
    ref, fast = _lif_pair(decay_input=decay_input, v_reset=v_reset, surrogate_function=sg)
    x = torch.randn(6, 3, 5, 37, 11) * 1.2 + 0.5  # N = 3*5*37*11 is not a multiple of any vector width
    x[0, 0, 0, :3, :3] = 1.0  # exactly at threshold after the first charge of a fresh neuron
    g = torch.randn_like(x)
    a, b = _run(ref, x, g), _run(fast, x, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_fused_lif_state_carries_across_calls():
    """Two calls without reset: the second starts from the first's membrane, gradients flow through it."""
    torch.manual_seed(1)
    ref, fast = _lif_pair(decay_input=False, v_reset=0.0, surrogate_function=surrogate.ATan(2.0))
    x1, x2 = torch.randn(4, 2, 300) + 0.4, torch.randn(4, 2, 300) + 0.4
    g = torch.randn(4, 2, 300)
    res = []
    for node in (ref, fast):
        node.reset()
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        s1 = node(a)
        s2 = node(b)
        ((s1 * g).sum() + (s2 * g * 0.5).sum() + node.v.square().sum()).backward()
        res.append((s1, s2, node.v.detach(), a.grad, b.grad))
    for p, q in zip(*res):
        assert torch.equal(p, q)


def test_fused_lif_no_grad_and_fallbacks():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64) + 0.5
    ref, fast = _lif_pair(v_reset=0.0, surrogate_function=surrogate.ATan(2.0))
    with torch.no_grad():
        assert torch.equal(ref(x), fast(x))
    # settings the kernel does not cover run SpikingJelly's path (and so still agree)
    for kw in ({"surrogate_function": surrogate.Sigmoid(4.0)}, {"detach_reset": False}):
        ref, fast = _lif_pair(v_reset=0.0, **{"surrogate_function": surrogate.ATan(2.0), **kw})
        assert not fast._fused_ok(x)
        assert torch.equal(ref(x), fast(x))
    ref, fast = _lif_pair(v_reset=0.0, surrogate_function=surrogate.ATan(2.0))
    assert torch.equal(ref(x.double()), fast(x.double()))  # float64: SpikingJelly's path
    fast.fast = False
    assert not fast._fused_ok(x)


def test_lif_multi_step_rejects_what_it_cannot_do():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="surrogate"):
        lif_multi_step(x, torch.zeros(4), 2.0, False, 1.0, 0.0, surrogate.Sigmoid())
    with pytest.raises(ValueError, match="float32"):
        lif_multi_step(x.double(), torch.zeros(4), 2.0, False, 1.0, 0.0, surrogate.ATan())
    with pytest.raises(ValueError, match="membrane shape"):
        lif_multi_step(x, torch.zeros(5), 2.0, False, 1.0, 0.0, surrogate.ATan())


@pytest.mark.parametrize(
    "n,ci,co,h,k,s,p",
    [(16, 32, 32, 2, 3, 1, 1), (16, 16, 32, 4, 3, 2, 1), (8, 8, 16, 9, 3, 1, 1), (8, 8, 16, 8, 1, 2, 0), (4, 2, 8, 16, 7, 2, 3)],
)
def test_conv2d_bit_identical(n, ci, co, h, k, s, p):
    torch.manual_seed(3)
    ref = nn.Conv2d(ci, co, k, s, p, bias=False)
    fast = Conv2d(ci, co, k, s, p, bias=False)
    fast.load_state_dict(ref.state_dict())
    x = (torch.rand(n, ci, h, h) < 0.2).float()  # spikes, as in MS-ResNet
    out = []
    for m, need_x in itertools.product((ref, fast), (True, False)):
        m.zero_grad()
        xi = x.clone().requires_grad_(need_x)
        y = m(xi)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(4)))
        out.append((y.detach(), m.weight.grad.clone(), xi.grad))
    for a, b in zip(out[:2], out[2:]):
        for p_, q in zip(a, b):
            assert (p_ is None and q is None) or torch.equal(p_, q)


def test_conv2d_gemm_weight_grad_is_checked_per_shape():
    torch.manual_seed(5)
    fast = Conv2d(24, 24, 3, 1, 1, bias=False)
    x = (torch.rand(12, 24, 2, 2) < 0.3).float()
    fast(x.requires_grad_()).sum().backward()
    key = ((12, 24, 2, 2), (24, 24, 3, 3), (1, 1), (1, 1), torch.float32)
    assert key in fast_layers.gemm_weight_grad_decisions()  # decided on the first backward
    # a shape above the small-output limit never takes the GEMM route
    Conv2d(4, 4, 3, 1, 1, bias=False)(torch.rand(2, 4, 8, 8, requires_grad=True)).sum().backward()
    assert not any(k[0] == (2, 4, 8, 8) for k in fast_layers.gemm_weight_grad_decisions())


@pytest.mark.parametrize(
    "shape,k,s,p", [((8, 16, 32, 32), 3, 2, 1), ((3, 5, 17, 13), 3, 2, 1), ((2, 3, 9, 9), 2, 2, 0), ((2, 3, 10, 7), 3, 1, 1)]
)
def test_maxpool_bit_identical(shape, k, s, p):
    torch.manual_seed(6)
    x = torch.randn(shape)
    x[..., 2:7, 1:6] = 0.25  # plateaus: ties everywhere (as after a batch norm of sparse events)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, :3, :3] = -float("inf")
    g = torch.randn_like(F.max_pool2d(x, k, s, p))
    out = []
    for m in (nn.MaxPool2d(k, s, p), MaxPool2d(k, s, p)):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        out.append((y.detach().nan_to_num(), xi.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


def test_ms_resnet_training_identical_with_and_without_fast_kernels():
    """Three SGD steps of MS-ResNet18 (fast paths on vs the plain torch.nn + SpikingJelly network):
    the same losses, logits and weights, to the bit."""
    x = (torch.rand(2, 2, 2, 64, 64, generator=torch.Generator().manual_seed(7)) < 0.1).float()  # [T, B, 2, H, W]
    y = torch.tensor([1, 7])
    runs = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = create_model("ms_resnet18", num_classes=10)
        assert set_fast_kernels(model, fast) > 0
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][key]), key


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
