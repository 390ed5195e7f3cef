"""The CUDA training path, checked on CPU: no host synchronisation, no device mixing and no
host-to-device copy inside a step, for every registered network in every memory mode, the
DataModules' device-side batch path, the metrics and the callbacks' per-step hooks.

Technique (``tests/fakecuda.py`` explains it in full): tensors are ``FakeTensor`` objects on
``device="cuda"`` (PyTorch's ``FakeTensorMode``: shapes, dtypes and devices, no data, no GPU
needed), so any read of a device value on the host raises, and a ``HostTraffic`` dispatch mode
records host-to-device / device-to-host copies and host reads with the ``i2e_train`` line that
made them. The backward pass and the optimiser step, which autograd cannot run on fake CUDA
without a GPU, are traced on the ``meta`` device. A check that can meet something built on
first use runs the step twice and counts the second (what is built once is not a per-step
cost). To cover a new path: build its modules with ``fake_module(mode, build)``, make its
inputs inside ``fake_cuda()``, run it inside ``HostTraffic()`` and call ``assert_clean``; a
host read stops the check at once, naming the ``i2e_train`` line. New networks (``list_models``)
and memory modes (``MEMORY_MODES``) are picked up by the parametrisation.
"""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fakecuda import HostTraffic, cuda_autocast, fake_cuda, fake_module, meta_model
from i2e_train.models import create_model, list_models
from i2e_train.models.lif import LIFNode
from i2e_train.models.memory import MEMORY_MODES

# the registered networks behind the paper and the demo (101 / 152: same blocks as 50, deeper; left out for time)
NETWORKS = [n for n in list_models("ms_resnet*") if n not in ("ms_resnet101", "ms_resnet152")]
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`",
                                        "ignore:Accessing the data pointer of FakeTensor")
PRECISIONS = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
T, B, SIZE, CLASSES = 2, 2, 32, 4
# One step per network check: the module sits on the device before the step and nothing in the
# network is built on first use (what is, like the converter moving to the device with its first
# batch, is checked on a second step: the DataModule checks run two).
STEPS = 1


def _classifier(name: str, memory: str):
    from i2e_train.module import SNNClassifier

    module = SNNClassifier(create_model(name, num_classes=CLASSES), num_classes=CLASSES, memory=memory,
                           optimizer=_sgd)  # fmt: skip
    module.configure_model()  # the memory mode (and fast-kernel switches) a run sets
    return module


def _sgd(model):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="momentum", lr=0.1, momentum=0.9, weight_decay=2e-4)  # configs/optim/sgd


def _batch(device: str):
    events = (torch.rand(T, B, 2, SIZE, SIZE, device=device) < 0.1).float()  # [T, B, 2, H, W]
    return events, torch.zeros(B, dtype=torch.long, device=device)


def test_fake_cuda_needs_no_gpu_and_catches_a_host_read():
    with fake_cuda():
        x = torch.ones(3, device="cuda")
        assert x.is_cuda and type(x).__name__ == "FakeTensor"
        traffic = HostTraffic()
        with traffic, pytest.raises(Exception, match="_local_scalar_dense"):
            x.sum().item()
        with traffic:
            torch.tensor([1, 2], device="cuda")
            x.cpu()
    assert len(traffic.reads) == len(traffic.h2d) == len(traffic.d2h) == 1, traffic.problems()
    with pytest.raises(AssertionError, match="3 host synchronisation"):
        traffic.assert_clean("the step")


def _forward_step(mode, name: str, memory: str, dtype) -> HostTraffic:
    """SNNClassifier.training_step (network, loss, training top-1) on fake CUDA; the traffic of
    the last of ``STEPS`` steps."""
    module = fake_module(mode, lambda: _classifier(name, memory))
    batch = _batch("cuda")
    for step in range(STEPS):
        traffic = HostTraffic()
        with traffic, cuda_autocast(dtype) if dtype else contextlib.nullcontext():
            loss = module.training_step(batch, step)
    assert loss.is_cuda and loss.shape == () and loss.dtype == torch.float32
    # every LIF ran SpikingJelly's fused CUDA/Triton operator, none its torch reference
    neurons = sum(isinstance(m, LIFNode) for m in module.modules())
    assert traffic.calls.get("sj_lif.forward.default", 0) == neurons, (name, memory, dtype, neurons, traffic.calls)
    return traffic


@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("name", NETWORKS)
def test_training_step_forward_on_fake_cuda(name, memory):
    with fake_cuda() as mode:
        _forward_step(mode, name, memory, None).assert_clean(f"{name} memory={memory} 32-true")


_AMP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import test_gpu_path as t
from fakecuda import fake_cuda
with fake_cuda() as mode:
    t._forward_step(mode, {name!r}, {memory!r}, t.PRECISIONS[{precision!r}]).assert_clean({precision!r})
print("AMP CLEAN", flush=True)
os._exit(0)  # see the test's docstring
"""


@pytest.mark.parametrize("precision", ["16-mixed"])
def test_training_step_forward_under_autocast_on_fake_cuda(precision):
    """The recipes' precision on the default memory mode, one trace in a child process: after a
    fake-CUDA autocast trace the process's heap is corrupted (PyTorch 2.14 fake tensors under a
    forced CUDA autocast, not the code under test: the next FakeTensorMode crashes), so the
    child leaves right after its one trace. Catches, e.g., SpikingJelly's silent fallback to its
    torch reference LIF under float16 (the LIF operator count in ``_forward_step``)."""
    code = _AMP_SCRIPT.format(tests=str(Path(__file__).parent), name="ms_resnet18", memory="bits",
                              precision=precision)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "AMP CLEAN" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("name", NETWORKS)
def test_backward_and_optimiser_step_traced_on_meta(name, memory):
    """Forward, loss, backward, optimiser step and zero_grad on ``meta`` (fp32)."""
    module = meta_model(lambda: _classifier(name, memory))
    optimizer = module.configure_optimizers()
    batch = _batch("meta")
    for step in range(STEPS):
        traffic = HostTraffic("meta")
        with traffic:
            loss = module.training_step(batch, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    traffic.assert_clean(f"{name} memory={memory} (meta)")
    assert all(p.device.type == "meta" for p in module.parameters())


def test_confusion_matrix_counts_equal_torchmetrics():
    from torchmetrics.classification import MulticlassConfusionMatrix

    from i2e_train.module import _ConfusionMatrix

    g = torch.Generator().manual_seed(0)
    ours, theirs = _ConfusionMatrix(7, validate_args=False), MulticlassConfusionMatrix(7)
    for _ in range(3):
        logits, labels = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
        ours.update(logits, labels)
        theirs.update(logits, labels)
    assert torch.equal(ours.compute(), theirs.compute()) and ours.compute().sum() == 150


def test_validation_step_metrics_on_fake_cuda():
    with fake_cuda() as mode:
        module = fake_module(mode, lambda: _classifier("ms_resnet_tiny", "bits"))
        module.eval()
        batch = _batch("cuda")
        for step in range(2):
            traffic = HostTraffic()
            with traffic, torch.no_grad():
                module.validation_step(batch, step)
        traffic.assert_clean("validation step (top-1, top-5, confusion matrix)")


# --------------------------------------------------------------------------- DataModules
def _device_batches(dm, make_batch, modules=(), soft_ok=False):
    """``dm.on_after_batch_transfer`` in training (twice) on a fake-CUDA loader batch from
    ``make_batch()``; ``modules``: the DataModule's own modules (the converter), made fake."""
    from types import SimpleNamespace

    # what the device-side batch path reads of the trainer: its state, precision and position
    progress = SimpleNamespace(current=SimpleNamespace(ready=0))
    dm.trainer = SimpleNamespace(training=True, precision="16-mixed", current_epoch=0, max_epochs=3, global_rank=0,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    with fake_cuda() as mode:
        for m in modules:
            fake_module(mode, lambda: m)
        batch = make_batch()
        for step in range(2):
            traffic = HostTraffic()
            with traffic:
                events, labels = dm.on_after_batch_transfer(batch, 0)
        assert events.is_cuda and events.dim() == 5 and labels.is_cuda
        assert labels.dtype == torch.int64 or (soft_ok and labels.dim() == 2)  # soft labels of a CutMix
    return traffic, events


def test_released_i2e_batches_unpack_and_augment_on_fake_cuda():
    from i2e_train.codec import packed_size
    from i2e_train.data.i2e_dataset import I2EDataModule

    dm = I2EDataModule(name="I2E-CIFAR10", augment={"crop_padding": 4, "hflip": 0.5})
    make = lambda: (torch.randint(0, 256, (B, packed_size(dm.shape)), dtype=torch.uint8, device="cuda"),  # noqa: E731
                    torch.zeros(B, dtype=torch.long, device="cuda"))
    traffic, events = _device_batches(dm, make)
    traffic.assert_clean("I2EDataModule.on_after_batch_transfer (unpack + event augmentation)")
    assert tuple(events.shape) == (dm.shape[0], B, *dm.shape[1:])


# drop_random / event_drop draw with torch.binomial, whose fake kernel needs a CUDA driver: not traced
@pytest.mark.parametrize("augment", [["nda", "drop_time", "drop_area"], ["nda_cutmix"]])
def test_event_augment_pipeline_on_fake_cuda(augment, monkeypatch):
    """data.augment=[...] entries (data/event_augment.py) on a fake-CUDA I2E batch: no host read.
    A CUDA ``torch.Generator`` needs a driver (seeding it is host-side, no copy), so the batch's
    generator is the default one here; every draw still runs on the fake device."""
    from i2e_train.codec import packed_size
    from i2e_train.data import event_augment
    from i2e_train.data.i2e_dataset import I2EDataModule

    monkeypatch.setattr(event_augment, "batch_generator", lambda *args, **kwargs: None)

    dm = I2EDataModule(name="I2E-CIFAR10", augment=augment)
    make = lambda: (torch.randint(0, 256, (B, packed_size(dm.shape)), dtype=torch.uint8, device="cuda"),  # noqa: E731
                    torch.zeros(B, dtype=torch.long, device="cuda"))
    traffic, events = _device_batches(dm, make, soft_ok=True)
    traffic.assert_clean(f"I2EDataModule.on_after_batch_transfer (data.augment={augment})")
    assert tuple(events.shape) == (dm.shape[0], B, *dm.shape[1:])


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("train_aug", ["baseline1", "baseline2"])
def test_online_i2e_batches_on_fake_cuda(backend, train_aug):
    from i2e_train.data.images import ImageDataModule

    dm = ImageDataModule(name="I2E-CIFAR10", source="unused", num_classes=10, resolution=[128, 128],
                         encoder={"ratio": 0.07, "order": 4}, train_aug=train_aug, aug_family="cifar")  # fmt: skip
    dm.encoder.backend = backend
    make = lambda: (torch.randint(0, 256, (B, 3, 128, 128), dtype=torch.uint8, device="cuda"),  # noqa: E731
                    torch.zeros(B, dtype=torch.long, device="cuda"))
    traffic, events = _device_batches(dm, make, modules=[dm.encoder])
    traffic.assert_clean(f"ImageDataModule.on_after_batch_transfer ({train_aug}, I2E back-end {backend})")
    assert tuple(events.shape) == (8, B, 2, 128, 128)


@pytest.mark.parametrize("name", ["N-MNIST", "N-Caltech101", "CIFAR10-DVS", "CIFAR10-DVS (SpikingJelly)"])
def test_real_event_batches_on_fake_cuda(tmp_path, name):
    """Counts [B, T, 2, H, W] as the loaders give them (uint16 from the tonic frame cache;
    SpikingJelly's CIFAR10-DVS frames as float32) -> events [T, B, 2, H, W] float32 on the device."""
    from i2e_train.data.dvs import CIFAR10DVSDataModule
    from i2e_train.data.real_events import RealEventsDataModule

    augment = {"crop_padding": 4, "hflip": 0.5}
    if name.endswith("(SpikingJelly)"):
        dm, dtype = CIFAR10DVSDataModule(root=str(tmp_path), augment=augment), torch.float32
    else:
        dm, dtype = RealEventsDataModule(name=name, root=str(tmp_path), augment=augment), torch.uint16
    make = lambda: (torch.empty((B, *dm.shape), dtype=dtype, device="cuda"),  # noqa: E731
                    torch.zeros(B, dtype=torch.long, device="cuda"))
    traffic, events = _device_batches(dm, make)
    traffic.assert_clean(f"{name} on_after_batch_transfer (counts -> events, event augmentation)")
    assert events.dtype == torch.float32 and tuple(events.shape) == (dm.shape[0], B, *dm.shape[1:])


# --------------------------------------------------------------------------- callbacks
class _Event:
    """Stands in for ``torch.cuda.Event`` (needs a driver to exist): recorded, never complete
    before ``synchronize``. Only the deferred NaN check's bookkeeping uses it."""

    def __init__(self) -> None:
        self.done = False

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_nan_check_per_step_hooks_on_fake_cuda(monkeypatch):
    """StopOnNonFinite's hooks inside a step (batch start, before backward, batch end) on a
    CUDA loss: the flag and the loss go to pinned host memory without blocking, no host read."""
    from types import SimpleNamespace

    from i2e_train.callbacks import StopOnNonFinite

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    cb = StopOnNonFinite()
    trainer = SimpleNamespace(current_epoch=0, global_step=0, checkpoint_callback=None, checkpoint_callbacks=[])
    with fake_cuda():
        loss = torch.ones((), device="cuda")
        for step in range(2):
            traffic = HostTraffic()
            with traffic:
                cb.on_train_batch_start(trainer, None, None, step)
                cb.on_before_backward(trainer, None, loss)
                cb.on_train_batch_end(trainer, None, None, None, step)
            traffic.assert_clean("StopOnNonFinite per-step hooks")
    assert len(cb._pending) == 2 and not any(e.done for _, e, *_ in cb._pending)  # read later, off the step


def test_checkpoint_weight_check_reads_once_and_names_the_bad_tensors():
    from i2e_train.callbacks.nonfinite import _nonfinite_tensors

    state = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.long), "c": torch.tensor([1.0, float("inf")])}
    with HostTraffic("cpu", stop_on_read=False) as traffic:  # counts host reads of CPU tensors here
        assert _nonfinite_tensors({k: v for k, v in state.items() if k != "c"}) == []
    assert len(traffic.reads) == 1, traffic.reads  # one read for all the tensors of a device
    assert _nonfinite_tensors(state) == ["c"]


# --------------------------------------------------------------------------- which LIF trained
def test_run_records_the_neuron_backend_and_warns_on_the_torch_reference_on_cuda(monkeypatch, caplog):
    from types import SimpleNamespace

    import spikingjelly.activation_based.functional as sj_functional

    from i2e_train.callbacks import RunInfo
    from i2e_train.models.lif import set_fast_kernels
    from i2e_train.tracking import lif_backends

    model = create_model("ms_resnet_tiny", num_classes=CLASSES)
    assert lif_backends(model, "cpu") == {"LIFNode": "fused-cpu"}
    set_fast_kernels(model, False)
    assert lif_backends(model, "cpu") == {"LIFNode": "torch-reference"}
    for impl, warned in (("triton", False), ("torch", True)):
        asked = []
        monkeypatch.setattr(sj_functional, "neuron_implementation",
                            lambda kind, device, impl=impl: asked.append((kind, device.type)) or {"implementation": impl})
        assert lif_backends(model, "cuda:0") == {"LIFNode": impl} and asked == [("lif", "cuda")]
        caplog.clear()
        module = SimpleNamespace(model=model, device=torch.device("cuda", 0))
        RunInfo().on_fit_start(SimpleNamespace(loggers=[]), module)  # warned with or without a logger
        assert ("torch reference" in caplog.text) == warned, caplog.text


# --------------------------------------------------------------------------- progress bar
def test_the_step_loss_is_not_a_per_step_progress_bar_metric(tmp_path):
    """Lightning turns every on_step prog_bar metric into a Python number after each batch (a host
    read per step on a GPU); the loss reaches the bar through StepLossProgressBar instead."""
    import lightning as L

    from i2e_train.callbacks import StepLossProgressBar

    class Seen(L.Callback):
        def __init__(self) -> None:
            self.pbar, self.shown = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.pbar.append(dict(trainer.progress_bar_metrics))
            self.shown.append(bar.get_metrics(trainer, pl_module))

    bar, seen = StepLossProgressBar(refresh_rate=2), Seen()
    events = (torch.rand(4, T, 2, 16, 16) < 0.2).float()  # [N, T, 2, H, W]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(events, torch.arange(4) % CLASSES), batch_size=2,
                                       collate_fn=lambda b: (torch.stack([e for e, _ in b], 1), torch.stack([y for _, y in b])))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar, seen])  # fmt: skip
    trainer.fit(_classifier("ms_resnet_tiny", "bits"), train_dataloaders=data)
    assert len(seen.pbar) == 2 and not any(k.startswith("train/loss") for p in seen.pbar for k in p), seen.pbar
    assert all(float(s["loss"]) > 0 for s in seen.shown), seen.shown
