"""Memory modes (spikes saved as bits, recomputation, block checkpointing) change nothing but memory.

Every comparison is with ``torch.equal`` against the path they replace: losses, every parameter
gradient, BN running statistics and weights after several SGD steps, for the fast CPU paths, the
plain torch.nn + SpikingJelly network and the tensor-operation (CUDA) packing path forced on CPU.
"""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import surrogate
from torch import nn

from i2e_train.models import bitpack, create_model
from i2e_train.models.layers import Conv2d, MaxPool2d, set_fast_kernels
from i2e_train.models.lif import LIFNode, fused_lif_available
from i2e_train.models.memory import MEMORY_MODES, check_memory_mode, set_memory

pytestmark = pytest.mark.skipif(not fused_lif_available(), reason="numba kernels unavailable")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["kernel", "torch"])
def pack_path(request, monkeypatch):
    """Run a test with the numba packing kernel and with the tensor-operation path (CUDA's)."""
    monkeypatch.setattr(bitpack, "FORCE_TORCH", request.param == "torch")
    return request.param


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 33, 100, 65536 + 45, 200_003])
def test_pack_roundtrip_and_format(n, pack_path):
    x = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3).float()
    bits, layout = bitpack.pack_spikes(x)
    ref = np.packbits(x.numpy().astype(np.uint8), bitorder="little")  # one format on every path
    assert bits.dtype == torch.uint8 and np.array_equal(bits.numpy(), ref)
    back = bitpack.unpack_spikes(bits, layout)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))  # +0.0 / +1.0 bit patterns


@pytest.mark.parametrize("bad", [-0.0, 0.5, 2.0, float("nan"), float("inf")])
def test_pack_refuses_values_other_than_spikes(bad, pack_path):
    x = (torch.rand(4, 3, 70) < 0.5).float()
    x[1, 2, 33] = bad
    assert bitpack.pack_spikes(x) is None
    if pack_path == "torch":  # trusted input skips the check on the tensor-operation path only
        assert bitpack.pack_spikes(x, trusted=True) is not None
    assert bitpack.pack_spikes(x.long()) is None


def test_pack_keeps_shape_dtype_and_memory_format(pack_path):
    x = (torch.rand(3, 5, 7, 9) < 0.4).float()
    cl = x.to(memory_format=torch.channels_last)
    for t in (x, cl, x.double(), x[:, :, None]):
        bits, layout = bitpack.pack_spikes(t)
        back = bitpack.unpack_spikes(bits, layout)
        assert back.shape == t.shape and back.dtype == t.dtype and back.stride() == t.stride()
        assert torch.equal(back, t)
    assert bitpack.pack_spikes(x.transpose(1, 3)) is None  # other strides: not packed


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sg,decay_input,v_reset",
    list(itertools.product([surrogate.ATan(2.0), surrogate.SoftSign(2.0)], [False, True], [0.0, None])),
    ids=str,
)
def test_lif_saving_its_input_is_bit_identical(sg, decay_input, v_reset):
    """H recomputed in the backward from the input: the same spikes, membranes and gradients,
    also when the state carries over from an earlier call (two calls, one backward)."""
    torch.manual_seed(0)
    x1 = torch.randn(6, 3, 5, 37, 11) * 1.2 + 0.5
    x2, g = torch.randn_like(x1) + 0.4, torch.randn_like(x1)
    runs = []
    for save_input in (False, True):
        node = LIFNode(tau=2.0, v_threshold=1.0, v_reset=v_reset, decay_input=decay_input,
                       surrogate_function=sg, detach_reset=True, step_mode="m")  # fmt: skip
        node.save_input = save_input
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        s1, s2 = node(a), node(b)
        ((s1 * g).sum() + (s2 * g).sum() * 0.5 + node.v.square().sum()).backward()
        runs.append((s1, s2, node.v.detach(), a.grad, b.grad))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_conv2d_with_packed_input_is_bit_identical(fast, binary, pack_path):
    torch.manual_seed(3)
    ref = nn.Conv2d(8, 16, 3, 1, 1, bias=False)
    conv = Conv2d(8, 16, 3, 1, 1, bias=False)
    conv.load_state_dict(ref.state_dict())
    conv.fast, conv.pack_input = fast, "events"
    x = (torch.rand(6, 8, 9, 9) < 0.2).float() if binary else torch.randn(6, 8, 9, 9)
    g = torch.randn(6, 16, 9, 9)
    out = []
    for m in (ref, conv):
        xi = x.clone().requires_grad_()
        y = m(xi)
        if m is conv:  # what the backward keeps: bits for spikes, the float tensor otherwise
            assert y.grad_fn.saved_tensors[0].dtype == (torch.uint8 if binary else torch.float32)
        y.backward(g)
        out.append((y.detach(), m.weight.grad, xi.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [True, False])
def test_maxpool_compact_indices_are_bit_identical(fast):
    torch.manual_seed(6)
    x = torch.randn(3, 5, 17, 13)
    x[..., 2:7, 1:6] = 0.25  # ties
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, :3, :3] = -float("inf")
    pool = MaxPool2d(3, 2, 1)
    pool.fast, pool.compact_indices = fast, True
    out = []
    for m in (nn.MaxPool2d(3, 2, 1), pool):
        xi = x.clone().requires_grad_()
        y = m(xi)
        if m is pool:
            assert y.grad_fn.saved_tensors[0].dtype == (torch.int8 if fast else torch.int32)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        out.append((y.detach().nan_to_num(), xi.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_maxpool_backward_reads_only_the_input_shape():
    """What the int32-index path relies on: ATen's max-pooling backward reads the input's shape,
    not its values (a NaN-filled stand-in gives the same gradient)."""
    x = torch.randn(2, 3, 11, 9)
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    g = torch.randn_like(y)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False, idx)
    ref = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *args)
    assert torch.equal(ref, torch.ops.aten.max_pool2d_with_indices_backward(g, torch.full_like(x, float("nan")), *args))


def test_maxpool_large_window_keeps_plane_indices():
    pool = MaxPool2d(12, 4, 0)
    pool.compact_indices = True  # 144-pixel windows do not fit int8 offsets: int32 plane indices
    x = torch.randn(2, 3, 30, 30, requires_grad=True)
    y = pool(x)
    assert y.grad_fn.saved_tensors[0].dtype == torch.int32
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    F.max_pool2d(xr, 12, 4, 0).sum().backward()
    assert torch.equal(x.grad, xr.grad)


# ---------------------------------------------------------------------------------------------
# whole networks
# ---------------------------------------------------------------------------------------------


def _train(arch: str, x: torch.Tensor, y: torch.Tensor, fast: bool, mode: str, steps: int = 3):
    """Losses, per-step gradients and the final state dict of ``steps`` SGD steps (momentum)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    set_fast_kernels(model, fast)
    set_memory(model, mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), grads, model.state_dict(), model


def _assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        for k in ga:
            assert torch.equal(ga[k], gb[k]), k
    for k, v in a[2].items():
        assert torch.equal(v, b[2][k]), k


def _events(t: int, b: int, hw: int, seed: int = 7) -> torch.Tensor:
    return (torch.rand(t, b, 2, hw, hw, generator=torch.Generator().manual_seed(seed)) < 0.15).float()


@pytest.mark.parametrize("mode", ["bits", "bits+checkpoint"])
@pytest.mark.parametrize("arch,hw", [("ms_resnet_tiny", 32), ("ms_resnet50", 32)])
def test_training_is_bit_identical_in_every_mode(arch, hw, mode, pack_path):
    """Fast paths: BasicBlock and Bottleneck networks, every loss, gradient and buffer."""
    x, y = _events(3, 2, hw), torch.tensor([1, 7])
    _assert_same(_train(arch, x, y, True, "none"), _train(arch, x, y, True, mode))


@pytest.mark.parametrize("mode", ["bits", "bits+checkpoint"])
def test_plain_layers_in_every_mode_equal_the_official_network(mode, pack_path):
    """fast_kernels off (torch.nn + SpikingJelly, the CUDA layers) with the memory modes on."""
    x, y = _events(2, 2, 32), torch.tensor([3, 4])
    _assert_same(_train("ms_resnet_tiny", x, y, False, "none"), _train("ms_resnet_tiny", x, y, False, mode))


def test_channels_last_in_every_mode(pack_path):
    """Channels-last activations (the GPU layout) are packed and rebuilt in that layout."""
    x, y = _events(2, 2, 32), torch.tensor([5, 6])

    def run(mode):
        torch.manual_seed(0)
        model = create_model("ms_resnet_tiny", num_classes=10).to(memory_format=torch.channels_last)
        set_memory(model, mode)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    ref = run("none")
    for mode in ("bits", "bits+checkpoint"):
        loss, grads = run(mode)
        assert torch.equal(loss, ref[0]) and all(torch.equal(a, b) for a, b in zip(grads, ref[1]))


def test_ms_resnet18_training_bit_identical_to_the_official_network():
    """The benchmark's network at 64x64: official (plain, none) vs fast paths in every mode."""
    x, y = _events(2, 2, 64), torch.tensor([1, 7])
    official = _train("ms_resnet18", x, y, False, "none")
    for mode in MEMORY_MODES:
        _assert_same(official, _train("ms_resnet18", x, y, True, mode))


def test_event_stem_in_channel_chunks_is_bit_identical(monkeypatch):
    """The stem's fused function (bits modes, CPU): its backward in uneven chunks of channels gives
    the plain layers' gradients; hooks on the stem's layers, or non-event input, take the plain path."""
    from i2e_train.models import event_stem as stem

    x, y = _events(3, 2, 32), torch.tensor([4, 8])  # stem [6, 16, 16, 16]: 6 KiB per channel
    monkeypatch.setattr(stem, "CHUNK_BYTES", 3 * 6 * 16 * 16 * 4)  # 3 channels: 16 = 5 x 3 + 1
    chunks = []
    backward = stem.maxpool_backward
    monkeypatch.setattr(stem, "maxpool_backward", lambda g, i, geo: chunks.append(i.shape[1]) or backward(g, i, geo))
    ref = _train("ms_resnet_tiny", x, y, True, "none")
    for mode in ("bits", "bits+checkpoint"):
        chunks.clear()
        _assert_same(ref, _train("ms_resnet_tiny", x, y, True, mode))
        assert chunks == [3, 3, 3, 3, 3, 1] * 3  # three steps, each through the fused stem
    model = create_model("ms_resnet_tiny", num_classes=10)
    set_memory(model, "bits")
    flat = x.flatten(0, 1)
    assert stem.event_stem_ok(model.conv1, model.bn1, model.maxpool, flat)
    assert stem.event_stem(model.conv1, model.bn1, model.maxpool, flat + 0.5) is None  # not events
    model.bn1.register_forward_hook(lambda m, i, o: None)
    assert not stem.event_stem_ok(model.conv1, model.bn1, model.maxpool, flat)
    assert not stem.event_stem_ok(model.conv1, model.bn1, model.maxpool, flat.requires_grad_())


def test_bn_lif_fused_path_and_recomputed_region_agree():
    """bn -> LIF: the fused function (CPU fast path) and the checkpointed region (taken when the
    neuron has a forward hook, whose calls it keeps) give the plain network's training."""
    from i2e_train.models.bn_lif import bn_lif_ok

    model = create_model("ms_resnet_tiny", num_classes=10)
    block = model.layer1[0]
    x = torch.randn(2, 2, 16, 8, 8, requires_grad=True)
    assert bn_lif_ok(block.bn1, block.sn2, x)
    calls = []
    block.sn2.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    assert not bn_lif_ok(block.bn1, block.sn2, x)
    x, y = _events(2, 2, 32), torch.tensor([2, 9])
    ref = _train("ms_resnet_tiny", x, y, True, "none")
    torch.manual_seed(0)
    hooked = create_model("ms_resnet_tiny", num_classes=10)
    hooked.layer2[0].sn2.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    set_memory(hooked, "bits")
    loss = F.cross_entropy(hooked(x), y)
    loss.backward()
    assert torch.equal(loss.detach(), ref[0][0]) and calls  # forward (and recomputation) calls seen
    for k, p in hooked.named_parameters():
        assert torch.equal(p.grad, ref[1][0][k]), k


def test_non_binary_input_and_no_grad_paths():
    """Non-event input is kept as it is (and still matches); no_grad and eval give the same logits."""
    x, y = torch.randn(2, 2, 2, 32, 32), torch.tensor([0, 5])
    _assert_same(_train("ms_resnet_tiny", x, y, True, "none", 2), _train("ms_resnet_tiny", x, y, True, "bits+checkpoint", 2))
    ref = create_model("ms_resnet_tiny", num_classes=10)
    events = _events(2, 3, 32)
    for mode in MEMORY_MODES:
        model = copy.deepcopy(ref)
        set_memory(model, mode)
        with torch.no_grad():
            assert torch.equal(model(events), ref(events))
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(events), ref.eval()(events))
        ref.train()


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages kept for the backward after one forward (outside any
    recomputed region: what the graph holds between forward and backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_each_mode_keeps_less_and_the_model_stays_copyable():
    x = _events(4, 2, 64)
    saved = {}
    for mode in MEMORY_MODES:
        torch.manual_seed(0)
        model = create_model("ms_resnet18", num_classes=10)
        set_memory(model, mode)
        saved[mode] = _saved_bytes(model, x)
        copy.deepcopy(model)  # no neuron state left pointing into a graph after a recomputation
    # none: per block H1, s1, bn1 input, H2, s2, bn2 input, and the stem's batch-norm input; bits: the
    # block input, the two batch-norm inputs and bits, the stem's events as bits and its argmax;
    # checkpoint: the block inputs (measured: 0.40x and 0.36x)
    assert saved["bits"] < 0.45 * saved["none"]
    assert saved["bits+checkpoint"] < 0.4 * saved["bits"]


def test_memory_mode_is_validated():
    assert check_memory_mode("bits") == "bits"
    with pytest.raises(ValueError, match="'none', 'bits', 'bits\\+checkpoint'"):
        check_memory_mode("bit")
    with pytest.raises(ValueError, match="unknown memory mode 'checkpoint'"):
        set_memory(create_model("ms_resnet_tiny"), "checkpoint")
    from i2e_train.module import SNNClassifier

    with pytest.raises(ValueError, match="memory mode"):
        SNNClassifier(create_model("ms_resnet_tiny", num_classes=3), num_classes=3, memory="all")
    module = SNNClassifier(create_model("ms_resnet_tiny", num_classes=3), num_classes=3)
    module.configure_model()
    assert module.model.memory == "bits" and module.model.layer1[0].conv1.pack_input == "spikes"
    assert module.model.conv1.pack_input == "events" and module.model.maxpool.compact_indices


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--archs", "ms_resnet_tiny",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    rows = json.loads(out.read_text())["memory"]
    assert [r["variant"] for r in rows][:2] == ["official", "memopt"]
    assert all(r["losses_identical"] and r["peak_mib"] > 0 for r in rows)
    assert all(r["kept_bf16_mib"] <= r["kept_fp32_mib"] for r in rows if r["variant"].endswith("/torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["bits", "bits+checkpoint"])
def test_cuda_modes_equal_none(mode, monkeypatch):
    """On CUDA (deterministic kernels): the same losses and gradients as mode none there."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, y = _events(3, 2, 32).cuda(), torch.tensor([1, 7]).cuda()

    def run(m):
        torch.manual_seed(0)
        model = create_model("ms_resnet_tiny", num_classes=10).cuda()
        set_memory(model, m)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (la, ga), (lb, gb) = run("none"), run(mode)
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
