"""The CUDA paths, each against its CPU counterpart or its contract: the fused converter kernel,
unpacking on the device, SpikingJelly's CUDA LIF, AMP (16-mixed, bf16-mixed), the deferred NaN
check, channels_last, online I2E on the device and DDP over NCCL at world size 1.

Skipped without a CUDA device; ``pytest -m gpu`` and ``benchmarks/gpu_check.sh`` run them.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli
from i2e_train.codec import pack_events, packed_size, unpack_events
from i2e_train.i2e import I2E

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


# --------------------------------------------------------------------------- converter
@pytest.mark.parametrize("order", range(6))
def test_fused_kernel_equals_cpu_and_official_on_real_images(real_images, order):
    from test_i2e import official_i2e

    ref = official_i2e(real_images, 0.07, order)  # the official conv2d, on the CPU (exact float32)
    imgs = real_images.to(CUDA)
    for dtype in (torch.float32, torch.bool):
        conv = I2E(ratio=0.07, order=order, dtype=dtype).eval().to(CUDA)
        assert conv.backend_for(imgs) == "compiled"  # the fused torch.compile kernel
        out = conv(imgs)
        assert out.is_cuda and out.dtype == dtype
        assert torch.equal(out.cpu(), I2E(ratio=0.07, order=order, dtype=dtype).eval()(real_images))
        assert torch.equal(out.cpu().float(), ref)
    packed = I2E(ratio=0.07, order=order).eval().to(CUDA).forward_packed(imgs)
    assert torch.equal(packed.cpu(), pack_events(ref.bool()))
    assert torch.equal(packed.cpu(), I2E(ratio=0.07, order=order).eval().forward_packed(real_images))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_fused_kernel_train_mode_equals_the_tensor_path(dtype):
    img = torch.rand(16, 3, 40, 48, device=CUDA)
    fused = I2E(ratio=0.07, order=2, dtype=dtype, backend="compiled").train()
    tensors = I2E(ratio=0.07, order=2, dtype=dtype, backend="torch").train()
    a = fused(img, generator=torch.Generator(device=CUDA).manual_seed(3))
    b = tensors(img, generator=torch.Generator(device=CUDA).manual_seed(3))  # the same random directions
    assert a.dtype == dtype and torch.equal(a, b)


def test_online_i2e_on_the_device_equals_cpu_and_does_not_synchronise(real_images):
    from i2e_train.data.images import ImageDataModule

    dm = ImageDataModule(name="I2E-CIFAR10", source="unused", num_classes=10, resolution=[128, 128],
                         encoder={"ratio": 0.07, "order": 4})
    assert torch.equal(dm.to_events(real_images.to(CUDA), train=False).cpu(), dm.to_events(real_images, train=False))
    small = real_images[:, :, :32, :32].contiguous().to(CUDA)  # a CIFAR-sized source image
    warm = dm.to_events(small, train=True)  # builds the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the training path raises
    try:
        events = dm.to_events(small, train=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert events.shape == warm.shape == (8, 2, 2, 128, 128) and events.is_cuda


# --------------------------------------------------------------------------- codec
@pytest.mark.parametrize("shape", [(8, 2, 128, 128), (8, 2, 5, 7)])
def test_unpack_and_pack_on_the_device_equal_cpu(shape):
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (5, packed_size(shape)), dtype=torch.uint8, generator=gen)
    for dtype in (torch.float32, torch.float16, torch.bool):
        on_device = unpack_events(packed.to(CUDA), shape, dtype)
        assert on_device.is_cuda and on_device.dtype == dtype and on_device.shape == (shape[0], 5, *shape[1:])
        assert torch.equal(on_device.cpu(), unpack_events(packed, shape, dtype))
    events = unpack_events(packed, shape, torch.bool)
    assert torch.equal(pack_events(events.to(CUDA)).cpu(), pack_events(events))


# --------------------------------------------------------------------------- SpikingJelly's CUDA LIF
@pytest.mark.parametrize("fast", [False, True])  # SpikingJelly's node / ours (which leaves CUDA to SpikingJelly)
def test_spikingjelly_cuda_lif_matches_the_cpu_lif(fast):
    """Inputs are multiples of 1/64, so every membrane value (V/2 + X, tau 2) is exact in float32:
    spikes and membranes must be equal whatever the kernel's operation order; input gradients
    (the ATan surrogate, rounded) to 1e-5 relative / 1e-6 absolute."""
    from spikingjelly.activation_based.functional import neuron_implementation

    from i2e_train.models.ms_resnet import NeuronConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-64, 160, (8, 4, 32, 9, 9), generator=g).float() / 64.0  # [T, N, C, H, W]
    grad_out = torch.randn(x.shape, generator=g)

    def run(device):
        node = NeuronConfig().build().to(device)
        node.fast = fast
        xi = x.to(device).requires_grad_()
        spikes = node(xi)
        (spikes * grad_out.to(device)).sum().backward()
        return spikes.detach().cpu(), node.v.detach().cpu(), xi.grad.cpu()

    s_cpu, v_cpu, g_cpu = run("cpu")
    s_gpu, v_gpu, g_gpu = run(CUDA)
    impl = neuron_implementation("lif", CUDA)
    assert impl["implementation"] in ("triton", "cuda"), f"SpikingJelly ran its torch reference on CUDA: {impl}"
    assert s_gpu.sum() > 0 and torch.equal(s_gpu, s_cpu)
    assert torch.equal(v_gpu, v_cpu)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- training on CUDA
class _EventData(L.LightningDataModule):
    """Random events [T, B, 2, 32, 32] (6% rate) and 4 classes, batches of 8."""

    def __init__(self, n: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.events = (torch.rand(n, 8, 2, 32, 32, generator=g) < 0.06).float()
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.events, self.labels)
        return torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=lambda b: (
            torch.stack([e for e, _ in b], 1), torch.stack([y for _, y in b])))  # time first


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses, self.logit_dtypes = [], set()

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.fc.register_forward_hook(lambda m, i, o: self.logit_dtypes.add(o.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def _module(**kw):
    from i2e_train.models import create_model
    from i2e_train.module import SNNClassifier

    torch.manual_seed(0)
    return SNNClassifier(create_model("ms_resnet_tiny", num_classes=4), num_classes=4,
                         optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), **kw)


@pytest.mark.parametrize("precision,dtype", [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_amp_training_steps_run_with_finite_losses(tmp_path, precision, dtype):
    rec = _Losses()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(_module(), datamodule=_EventData())
    losses = torch.stack(rec.losses).cpu()
    assert len(losses) == 4 and torch.isfinite(losses).all()
    assert rec.logit_dtypes == {dtype}  # the network ran under autocast


def test_channels_last_runs_in_that_layout_and_agrees_with_the_default(tmp_path):
    dm = _EventData()
    events, labels = next(iter(dm.train_dataloader()))
    events, labels = events.to(CUDA), labels.to(CUDA)
    losses, layouts = {}, []
    for channels_last in (False, True):
        module = _module(channels_last=channels_last)
        module.configure_model()
        module.to(CUDA)
        hook = module.model.conv1.register_forward_hook(
            lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
        loss = F.cross_entropy(module(events), labels)
        loss.backward()
        hook.remove()
        w = module.model.conv1.weight
        assert w.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
        losses[channels_last] = float(loss)
    assert layouts[-1] is True  # the first convolution's output is channels-last
    assert abs(losses[True] - losses[False]) <= 0.05 * losses[False]  # other float sums, same network


# --------------------------------------------------------------------------- deferred NaN check
def test_nan_check_adds_no_synchronisation_to_the_step():
    from i2e_train.callbacks import NonFiniteLossError, StopOnNonFinite

    cb = StopOnNonFinite()  # sync_free on CUDA by default
    trainer = SimpleNamespace(current_epoch=0, global_step=3, checkpoint_callback=None, checkpoint_callbacks=[])
    loss = torch.full((), float("nan"), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cb.on_before_backward(trainer, None, loss)  # the hook inside the step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*its optimiser step has run"):
        cb.on_train_epoch_end(trainer, None)


def test_nan_loss_on_cuda_stops_the_run_and_its_weights_are_not_checkpointed(tmp_path):
    from test_recovery import _Data, _Tiny

    from i2e_train.callbacks import NonFiniteLossError, StepCheckpoint
    from i2e_train.recovery import AtomicCheckpointIO, recovery_callbacks

    ckpts = tmp_path / "ckpt"
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                        callbacks=[StepCheckpoint(ckpts, every_n_train_steps=1), *recovery_callbacks(tmp_path)])
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at epoch 0, global step 3 .*"
                                                 r"its optimiser step has run.*last good checkpoint is kept"):
        trainer.fit(_Tiny(nan_at=3), datamodule=_Data())
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3  # written after step 3; the NaN step's weights never reach a file
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


# --------------------------------------------------------------------------- DDP over NCCL
@pytest.mark.slow
def test_ddp_over_nccl_at_world_size_one(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("i2e_train.cli.train", "trainer=ddp", "trainer.devices=1", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2", "data.batch_size=16",
                   f"hydra.run.dir={run}", cwd=tmp_path, timeout=400)
    out = proc.stdout + proc.stderr
    assert "distributed_backend=nccl" in out and "MEMBER: 1/1" in out, out[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_checkpoint"] and 0.0 <= metrics["best"]["val/top1"] <= 1.0
