"""The memory ladder (none, bits, recompute, least, auto) changes nothing but memory and work.

Every comparison is with ``torch.equal`` against mode none: losses, every parameter gradient, BN
running statistics and weights after several SGD steps, on the compiled CPU kernels and on the
tensor-operation path a GPU runs (``I2E_CPU_KERNELS=0``). The ladder's order is asserted on the
exact measures of ``benchmarks/memory.py`` at a tiny size; ``auto`` on stated budgets.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from i2e_train.models import bitpack, create_model, recompute
from i2e_train.models.lif import fused_lif_available
from i2e_train.models.memory import (
    MEMORY_MODES,
    check_memory_mode,
    memory_mode,
    set_memory,
)
from i2e_train.models.memory_plan import LADDER, choose_memory, predict_peaks

pytestmark = pytest.mark.skipif(not fused_lif_available(), reason="numba kernels unavailable")
ROOT = Path(__file__).resolve().parents[1]
RUNGS = ("bits", "recompute", "least")


@pytest.fixture(params=["kernel", "torch"])
def cpu_kernels(request, monkeypatch):
    """Run a test with the compiled CPU kernels and with the tensor-operation path (CUDA's)."""
    monkeypatch.setenv("I2E_CPU_KERNELS", "1" if request.param == "kernel" else "0")
    return request.param


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 33, 100, 65536 + 45, 200_003])
def test_pack_roundtrip_and_format(n, cpu_kernels):
    x = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3).float()
    bits, layout = bitpack.pack_spikes(x)
    ref = np.packbits(x.numpy().astype(np.uint8), bitorder="little")  # one format on every path
    assert bits.dtype == torch.uint8 and np.array_equal(bits.numpy(), ref)
    back = bitpack.unpack_spikes(bits, layout)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))  # +0.0 / +1.0 bit patterns


@pytest.mark.parametrize("bad", [-0.0, 0.5, 2.0, float("nan"), float("inf")])
def test_pack_refuses_values_other_than_spikes(bad, cpu_kernels):
    x = (torch.rand(4, 3, 70) < 0.5).float()
    x[1, 2, 33] = bad
    assert bitpack.pack_spikes(x) is None
    if cpu_kernels == "torch":  # trusted input skips the check on the tensor-operation path only
        assert bitpack.pack_spikes(x, trusted=True) is not None
    assert bitpack.pack_spikes(x.long()) is None


def test_pack_keeps_shape_dtype_and_memory_format(cpu_kernels):
    x = (torch.rand(3, 5, 7, 9) < 0.4).float()
    cl = x.to(memory_format=torch.channels_last)
    for t in (x, cl, x.double(), x[:, :, None]):
        bits, layout = bitpack.pack_spikes(t)
        back = bitpack.unpack_spikes(bits, layout)
        assert back.shape == t.shape and back.dtype == t.dtype and back.stride() == t.stride()
        assert torch.equal(back, t)
    assert bitpack.pack_spikes(x.transpose(1, 3)) is None  # other strides: not packed


# ---------------------------------------------------------------------------------------------
# whole networks
# ---------------------------------------------------------------------------------------------


def _train(arch: str, x: torch.Tensor, y: torch.Tensor, mode: str, steps: int = 3, channels_last: bool = False):
    """Losses, per-step gradients and the final state dict of ``steps`` SGD steps (momentum)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
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


@pytest.mark.parametrize("mode", RUNGS)
@pytest.mark.parametrize("arch,hw", [("ms_resnet_tiny", 32), ("ms_resnet50", 32)])
def test_training_is_bit_identical_in_every_rung(arch, hw, mode, cpu_kernels):
    """BasicBlock and Bottleneck networks, every loss, gradient and buffer."""
    x, y = _events(3, 2, hw), torch.tensor([1, 7])
    _assert_same(_train(arch, x, y, "none"), _train(arch, x, y, mode))


def test_ms_resnet18_at_the_benchmark_resolution_in_every_rung(cpu_kernels):
    x, y = _events(2, 2, 64), torch.tensor([1, 7])
    ref = _train("ms_resnet18", x, y, "none", 2)
    for mode in RUNGS:
        _assert_same(ref, _train("ms_resnet18", x, y, mode, 2))


def test_channels_last_in_every_rung(cpu_kernels):
    """Channels-last activations (the GPU layout) are kept, packed and recomputed in that layout."""
    x, y = _events(2, 2, 32), torch.tensor([5, 6])
    ref = _train("ms_resnet_tiny", x, y, "none", 1, channels_last=True)
    for mode in RUNGS:
        _assert_same(ref, _train("ms_resnet_tiny", x, y, mode, 1, channels_last=True))


def test_segments_run_their_backward_in_channel_slices(monkeypatch):
    """recompute / least: the stem's batch norm -> max pooling, and in the large first stage each
    batch norm -> LIF, is one autograd node whose backward runs a few channels at a time (uneven
    slices here), with the plain layers' gradients; bits recomputes no batch norm."""
    monkeypatch.setattr(recompute, "_SEGMENT_CHUNKS", 3)  # 16 channels: slices of 6, 6, 4
    slices = []
    real = recompute._segment_slice
    monkeypatch.setattr(recompute, "_segment_slice", lambda seg, c, g, w, b, sl: slices.append(
        ("pool" if seg.pool is not None else "lif", sl.stop - sl.start)) or real(seg, c, g, w, b, sl))
    x, y = _events(2, 2, 32), torch.tensor([3, 4])
    ref = _train("ms_resnet_tiny", x, y, "none", 2)
    for mode in ("recompute", "least"):
        slices.clear()
        _assert_same(ref, _train("ms_resnet_tiny", x, y, mode, 2))
        stem = [n for kind, n in slices if kind == "pool"]
        assert stem == [6, 6, 4] * 2
        assert ("lif", 6) in slices  # layer1's bn1 -> sn2 (16 channels at a quarter of the stem's elements)
    slices.clear()
    _train("ms_resnet_tiny", x, y, "bits", 1)
    assert slices == []


def test_non_binary_input_and_no_grad_paths():
    """Non-event input is kept as it is (and still matches); no_grad and eval give the same logits."""
    x, y = torch.randn(2, 2, 2, 32, 32), torch.tensor([0, 5])
    _assert_same(_train("ms_resnet_tiny", x, y, "none", 2), _train("ms_resnet_tiny", x, y, "least", 2))
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


def _kept(mode: str, dtype=None) -> int:
    torch.manual_seed(0)
    model = create_model("ms_resnet18", num_classes=10)
    set_memory(model, mode)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return recompute.kept_bytes(lambda: F.cross_entropy(model(_events(4, 2, 64)), torch.tensor([1, 2])), params)


def test_each_rung_keeps_less_in_fp32_and_no_more_under_bf16(cpu_kernels):
    """What one forward leaves for the backward falls down the ladder; bf16 autocast keeps no more
    than float32 in every rung (the engine casts spikes itself: nothing falls back)."""
    kept = {mode: _kept(mode) for mode in ("none", *RUNGS)}
    # none: per neuron H and its spikes, per batch norm its input; bits: spikes derived from H;
    # recompute: convolution outputs of the later stages and every other block input
    assert kept["bits"] < 0.7 * kept["none"]
    assert kept["recompute"] < 0.5 * kept["bits"]
    assert kept["least"] <= kept["recompute"]
    for mode in RUNGS:
        assert _kept(mode, torch.bfloat16) <= kept[mode], mode


def test_models_stay_copyable_after_training_in_every_rung():
    x, y = _events(2, 2, 32), torch.tensor([1, 2])
    for mode in RUNGS:
        model = _train("ms_resnet_tiny", x, y, mode, 1)[3]
        copy.deepcopy(model)  # no neuron state left pointing into a graph


def test_memory_mode_is_validated():
    assert check_memory_mode("bits") == "bits"
    assert check_memory_mode("bits+checkpoint") == "least"  # the earlier name of the leanest mode
    with pytest.raises(ValueError, match="'none', 'bits', 'recompute', 'least', 'auto'"):
        check_memory_mode("bit")
    with pytest.raises(ValueError, match="unknown memory mode 'checkpoint'"):
        set_memory(create_model("ms_resnet_tiny"), "checkpoint")
    from i2e_train.module import SNNClassifier

    with pytest.raises(ValueError, match="memory mode"):
        SNNClassifier(create_model("ms_resnet_tiny", num_classes=3), num_classes=3, memory="all")
    with pytest.raises(ValueError, match="module.memory_budget=-1"):
        SNNClassifier(create_model("ms_resnet_tiny", num_classes=3), num_classes=3, memory_budget=-1)
    module = SNNClassifier(create_model("ms_resnet_tiny", num_classes=3), num_classes=3)
    module.configure_model()
    assert memory_mode(module.model) == "bits"


# ---------------------------------------------------------------------------------------------
# the ladder, measured; auto
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> dict:
    """``benchmarks/memory.py --quick`` (MS-ResNet tiny, T=2, 32x32, batch 2): every exact measure."""
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    chart = out.with_suffix(".png")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--json", str(out),
                    "--chart", str(chart)], check=True, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert chart.stat().st_size > 5000
    return {r["variant"]: r for r in json.loads(out.read_text())["memory"]}


@pytest.mark.slow
def test_the_ladder_is_ordered_on_exact_measures(ladder):
    """Peaks fall and work rises down the ladder; every loss equals the official network's."""
    assert list(ladder) == ["official", "memopt", "none", "bits", "recompute", "least"]
    assert all(r["losses_identical"] for r in ladder.values())
    peak = {k: r["peak"] for k, r in ladder.items()}
    assert peak["official"] > peak["none"] > peak["bits"] > peak["recompute"]
    assert peak["least"] <= 1.01 * peak["recompute"]
    assert ladder["bits"]["flops"] == ladder["none"]["flops"] == ladder["official"]["flops"]
    assert ladder["none"]["flops"] < ladder["recompute"]["flops"] <= ladder["least"]["flops"]
    assert ladder["bits"]["bytes"] <= 1.1 * ladder["official"]["bytes"]
    for mode in ("none", *RUNGS):  # the dry run sees the live tensors; the exact peak adds kernel workspaces
        assert 0.85 * peak[mode] <= ladder[mode]["predicted"] <= peak[mode], mode


def test_predictions_fall_down_the_ladder_and_auto_follows_the_budget():
    model = create_model("ms_resnet18", num_classes=10)
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    shape = (4, 8, 2, 64, 64)
    peaks = predict_peaks(model, shape, optimizer=sgd)
    assert list(peaks) == list(LADDER)
    assert peaks["none"] > peaks["bits"] > peaks["recompute"]
    assert peaks["least"] <= 1.01 * peaks["recompute"]  # where both peak in the first stage they coincide
    params = sum(p.numel() * 4 for p in model.parameters())
    assert peaks["least"] > 3 * params  # parameters, momentum and gradients are part of it
    leanest = min(LADDER, key=lambda m: (peaks[m], LADDER.index(m)))  # nothing fits: the lowest peak, fastest first
    for budget, expected in ((peaks["none"], "none"), (peaks["none"] - 1, "bits"), (peaks["bits"] - 1, "recompute"),
                             (peaks["least"] - 1, leanest)):  # fmt: skip
        mode, _ = choose_memory(model, shape, budget, optimizer=sgd)
        assert mode == expected and memory_mode(model) == expected
    half = predict_peaks(model, shape, optimizer=sgd, precision="16-mixed", modes=["bits"])
    assert half["bits"] < peaks["bits"]  # half-precision activations


def test_snnclassifier_chooses_its_memory_before_the_first_step(tmp_path):
    """memory=auto with a stated budget: the choice is made on the first batch's shape and used."""
    import lightning as L
    from torch.utils.data import DataLoader

    from i2e_train.module import SNNClassifier

    x, y = _events(2, 4, 32), torch.tensor([1, 2, 3, 4])
    data = DataLoader([(x[:, i], y[i]) for i in range(4)], batch_size=4,
                      collate_fn=lambda b: (torch.stack([e for e, _ in b], 1), torch.stack([t for _, t in b])))  # fmt: skip
    model = create_model("ms_resnet_tiny", num_classes=10)
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    peaks = predict_peaks(model, x.shape, optimizer=sgd)
    module = SNNClassifier(model, num_classes=10, optimizer=sgd, memory="auto",
                           memory_budget=(peaks["bits"] - 1) / 2**30)  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, train_dataloaders=data)
    assert module.memory_chosen == "recompute" and memory_mode(module.model) == "recompute"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", RUNGS)
def test_cuda_rungs_equal_none(mode, monkeypatch):
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
