"""The I2E converter against the official algorithm, hand-computed cases and its contracts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import to_dtype

from i2e_train.i2e import (
    DIRECTION_GROUPS,
    I2E,
    ORDER_PRESETS,
    cell_offset,
    resolve_order,
)


def official_i2e(images: torch.Tensor, ratio: float, order: int) -> torch.Tensor:
    """The official converter's approach: V = max over RGB, replicate pad, one float32 conv2d
    with the eight canonical {-1, +1} kernels, dynamic threshold, '>=' comparisons."""
    x = to_dtype(images, torch.float32, scale=True) if images.dtype == torch.uint8 else images.float()
    v = x.max(dim=1, keepdim=True)[0]  # [B, 1, H, W]
    kernels = torch.zeros(8, 1, 3, 3)
    for t, g in enumerate(ORDER_PRESETS[order]):
        a, b = DIRECTION_GROUPS[g][0]
        kernels[t, 0, (a - 1) // 3, (a - 1) % 3] = -1.0
        kernels[t, 0, (b - 1) // 3, (b - 1) % 3] = 1.0
    resp = F.conv2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), kernels)  # [B, 8, H, W]
    rng = v.amax(dim=(1, 2, 3), keepdim=True) - v.amin(dim=(1, 2, 3), keepdim=True)
    thr = ratio * rng
    on, off = (resp >= thr).float(), (-resp >= thr).float()
    return torch.stack([on, off], dim=2).transpose(0, 1)  # [8, B, 2, H, W]


@pytest.mark.parametrize("order", range(6))
@pytest.mark.parametrize("ratio", [0.07, 0.10, 0.12, 0.15])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_eval_bit_identical_to_official_on_real_images(real_images, order, ratio, backend):
    conv = I2E(ratio=ratio, order=order, backend=backend).eval()
    assert torch.equal(conv(real_images), official_i2e(real_images, ratio, order))
    floats = real_images.float() / 255.0
    assert torch.equal(conv(floats), official_i2e(floats, ratio, order))


def test_hand_computed_small_case():
    # One grayscale image 3x3; V = the image itself.
    # Values are multiples of 1/8, so every difference below is exact in float32.
    img = (torch.tensor([[0.0, 1, 2], [3, 4, 5], [6, 7, 8]]) / 8).view(1, 1, 3, 3)
    conv = I2E(ratio=0.125, order=0).eval()  # thr = 0.125 * (1.0 - 0.0) = 1/8
    ev = conv(img)
    assert ev.shape == (8, 1, 2, 3, 3)
    # t=0: group 0 canonical [5, 6]: response = V(y, x+1) - V(y, x), replicate at the right edge.
    expect_on = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    assert torch.equal(ev[0, 0, 0], expect_on)  # 1/8 >= 1/8 fires (">=" as in the official code)
    assert torch.equal(ev[0, 0, 1], torch.zeros(3, 3))
    # t=1: group 1 canonical [5, 2]: response = V(y-1, x) - V(y, x) = -3/8 below the top row.
    expect_off = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.float32)
    assert torch.equal(ev[1, 0, 1], expect_off)
    assert torch.equal(ev[1, 0, 0], torch.zeros(3, 3))


def test_flat_image_fires_everywhere():
    conv = I2E(ratio=0.07).eval()
    ev = conv(torch.full((2, 3, 5, 4), 0.5))
    assert ev.all(), "zero range gives thr = 0 and '>=' fires in both channels (official behaviour)"


def test_grayscale_equals_rgb_replicated():
    gray = torch.rand(3, 1, 16, 12)
    conv = I2E(ratio=0.1).eval()
    assert torch.equal(conv(gray), conv(gray.expand(-1, 3, -1, -1)))
    assert torch.equal(conv(gray), official_i2e(gray.expand(-1, 3, -1, -1), 0.1, 4))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_uint8_scaling_is_torchvision_to_dtype(backend):
    """uint8 images are scaled as the official pipeline's v2.ToDtype(float32, scale=True)
    (x * float32(1/255), not x / 255: they differ in the last bit for 126 of 256 values)."""
    img = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).clone()
    img[1] = img[1].flip(-1)
    conv = I2E(ratio=0.07, backend=backend).eval()
    assert torch.equal(conv.intensity(img), to_dtype(img, torch.float32, scale=True).amax(1))
    assert torch.equal(conv(img), conv(to_dtype(img, torch.float32, scale=True)))
    img = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    assert torch.equal(conv(img), conv(to_dtype(img, torch.float32, scale=True)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_output_dtypes_hold_the_same_events(dtype):
    img = torch.rand(2, 3, 10, 10)
    ref = I2E(ratio=0.07).eval()(img)
    out = I2E(ratio=0.07, dtype=dtype).eval()(img)
    assert out.dtype == dtype and out.shape == (8, 2, 2, 10, 10)
    assert torch.equal(out.float(), ref)


def test_string_dtype_and_explicit_order():
    conv = I2E(ratio=0.07, order=[7, 6, 5, 4, 3, 2, 1, 0], dtype="bool")
    assert conv.dtype == torch.bool and conv.order == (7, 6, 5, 4, 3, 2, 1, 0)


def _all_candidates(v_pad: torch.Tensor, group: int, h: int, w: int) -> list[torch.Tensor]:
    out = []
    for a, b in DIRECTION_GROUPS[group]:
        (ra, ca), (rb, cb) = cell_offset(a), cell_offset(b)
        out.append(v_pad[..., rb : rb + h, cb : cb + w] - v_pad[..., ra : ra + h, ca : ca + w])
    return out


def test_train_mode_vectors_always_from_the_right_group():
    conv = I2E(ratio=0.07, order=4, direction_draw="sample").train()
    gen = torch.Generator().manual_seed(0)
    a, b = conv.directions(500, torch.device("cpu"), gen)  # [T, B]
    seen = [set() for _ in range(8)]
    for t, g in enumerate(conv.order):
        valid = {(x - 1, y - 1) for x, y in DIRECTION_GROUPS[g]}
        pairs = set(zip(a[t].tolist(), b[t].tolist()))
        assert pairs <= valid
        seen[t] = pairs
    assert all(len(seen[t]) == len(DIRECTION_GROUPS[g]) for t, g in enumerate(conv.order)), "every vector drawn"


def test_train_mode_output_is_one_group_vector_per_sample():
    img = torch.rand(6, 3, 12, 12)
    conv = I2E(ratio=0.05, order=2, direction_draw="sample").train()
    ev = conv(img, generator=torch.Generator().manual_seed(1))
    v = img.amax(dim=1)
    vpad = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    thr = 0.05 * (v.flatten(1).amax(1) - v.flatten(1).amin(1))
    differs = 0
    for t, g in enumerate(conv.order):
        cands = _all_candidates(vpad, g, 12, 12)
        for s in range(6):
            matches = [torch.equal(ev[t, s, 0], (c[s] >= thr[s]).float()) and
                       torch.equal(ev[t, s, 1], (-c[s] >= thr[s]).float()) for c in cands]
            assert any(matches)
            differs += not matches[0]
    assert differs > 0, "random directions must sometimes differ from the canonical ones"


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_train_mode_default_draws_one_vector_per_group_per_batch(backend):
    """direction_draw="batch" (default, the official converter): every sample of a forward uses
    the same vector at timestep t; across forwards every vector of the group is drawn."""
    conv = I2E(ratio=0.07, order=4, backend=backend).train()
    assert conv.direction_draw == "batch"
    gen = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(8)]
    for _ in range(60):
        a, b = conv.directions(5, torch.device("cpu"), gen)  # [T, B]
        assert torch.equal(a, a[:, :1].expand_as(a)) and torch.equal(b, b[:, :1].expand_as(b))
        for t in range(8):
            seen[t].add((int(a[t, 0]), int(b[t, 0])))
    assert all(seen[t] == {(x - 1, y - 1) for x, y in DIRECTION_GROUPS[g]} for t, g in enumerate(conv.order))
    img = torch.rand(4, 3, 10, 10)
    ev = conv(img, generator=torch.Generator().manual_seed(3))
    a, b = conv.directions(4, torch.device("cpu"), torch.Generator().manual_seed(3))
    v = img.amax(dim=1)
    vpad = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    thr = 0.07 * (v.flatten(1).amax(1) - v.flatten(1).amin(1))
    for t in range(8):
        (ra, ca), (rb, cb) = divmod(int(a[t, 0]), 3), divmod(int(b[t, 0]), 3)
        r = vpad[:, rb : rb + 10, cb : cb + 10] - vpad[:, ra : ra + 10, ca : ca + 10]
        assert torch.equal(ev[t, :, 0], (r >= thr.view(-1, 1, 1)).float())
        assert torch.equal(ev[t, :, 1], (-r >= thr.view(-1, 1, 1)).float())


def test_random_directions_off_equals_eval():
    img = torch.rand(3, 3, 9, 9)
    assert torch.equal(I2E(random_directions=False).train()(img), I2E().eval()(img))


def test_fixed_threshold_ablation():
    img = torch.rand(2, 3, 8, 8) * 0.5
    ev = I2E(ratio=0.1, threshold="fixed", order=0).eval()(img)
    v = img.amax(1)
    vp = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    resp = vp[:, 1:9, 2:10] - vp[:, 1:9, 1:9]  # t=0 -> group 0 canonical [5, 6]
    assert torch.equal(ev[0, :, 0], (resp >= 0.1).float())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="order preset"):
        I2E(order=9)
    with pytest.raises(ValueError, match="8 group indices"):
        resolve_order([0, 1, 2])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        I2E()(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        I2E()(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="padding_mode"):
        I2E(padding_mode="mirror")


@pytest.mark.parametrize("train", [False, True])
# W % 8 == 0: the one-pass kernel (40 = one 32-pixel word + one byte, 72 = two words + one byte)
@pytest.mark.parametrize("hw", [(24, 40), (5, 72), (16, 13)])
@pytest.mark.parametrize("backend", ["auto", "torch"])  # auto: the numba kernel on CPU
def test_packed_output_equals_packbits_of_dense(train, hw, backend):
    import numpy as np

    img = torch.rand(19, 3, *hw)
    img[3] = 0.25  # a flat image: threshold 0, both polarities fire everywhere
    conv = I2E(ratio=0.07, order=3, backend=backend).train(train)
    dense = conv(img, generator=torch.Generator().manual_seed(5))
    packed = conv.forward_packed(img, generator=torch.Generator().manual_seed(5))
    assert packed.dtype == torch.uint8 and packed.shape == (19, (8 * 2 * hw[0] * hw[1] + 7) // 8)
    for i in range(19):
        assert np.array_equal(packed[i].numpy(), np.packbits(dense[:, i].bool().numpy().reshape(-1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
@pytest.mark.parametrize("train", [False, True])
def test_cpu_kernel_equals_tensor_path(dtype, train):
    img = torch.rand(7, 3, 13, 21)
    img[0] = 0.5  # a flat image: threshold 0, fires everywhere
    kernel = I2E(ratio=0.07, order=1, dtype=dtype).train(train)
    tensor_ops = I2E(ratio=0.07, order=1, dtype=dtype, backend="torch").train(train)
    a = kernel(img, generator=torch.Generator().manual_seed(9))
    b = tensor_ops(img, generator=torch.Generator().manual_seed(9))
    assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def test_chunked_cpu_path_covers_batches_larger_than_a_chunk():
    img = torch.rand(1030, 3, 64, 64)  # 1024 images per chunk at 64x64
    conv = I2E(ratio=0.1, order=5, backend="torch").eval()
    assert torch.equal(conv(img), official_i2e(img, 0.1, 5))


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_fused_compiled_path_equals_the_eager_path(train):
    """The torch.compile kernel used on CUDA, checked here through inductor's CPU backend."""
    img = torch.rand(6, 3, 20, 24)
    eager = I2E(ratio=0.07, order=2, backend="torch").train(train)
    fused = I2E(ratio=0.07, order=2, backend="compiled", dtype=torch.bool).train(train)
    a = eager(img, generator=torch.Generator().manual_seed(3))
    b = fused(img, generator=torch.Generator().manual_seed(3))
    assert b.dtype == torch.bool and torch.equal(a, b.float())
    if not train:
        assert torch.equal(b.float(), official_i2e(img, 0.07, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_conversion_equals_cpu(real_images):
    for order in range(6):
        cpu = I2E(ratio=0.12, order=order).eval()(real_images)
        gpu = I2E(ratio=0.12, order=order).eval().cuda()(real_images.cuda())
        assert torch.equal(cpu, gpu.cpu())
        packed = I2E(ratio=0.12, order=order).eval().cuda().forward_packed(real_images.cuda())
        assert torch.equal(packed.cpu(), I2E(ratio=0.12, order=order).eval().forward_packed(real_images))


def test_backend_is_a_named_choice():
    img = torch.rand(2, 3, 8, 8)
    assert I2E().backend_for(img) == "numba"  # auto on CPU, where the kernels apply
    assert I2E(padding_mode="zeros").backend_for(img) == "torch"  # auto: the kernels pad by replication
    assert I2E(dtype=torch.float16).backend_for(img) == "torch"
    with pytest.raises(ValueError, match="backend='numba' cannot run here: padding_mode 'zeros'"):
        I2E(padding_mode="zeros", backend="numba")(img)
    with pytest.raises(ValueError, match="backend must be one of auto, numba, compiled, torch"):
        I2E(backend="cuda")
    assert "backend='torch'" in repr(I2E(backend="torch"))
