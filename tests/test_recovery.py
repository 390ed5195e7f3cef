"""Interruptions: atomic checkpoints, exact mid-epoch resume (SIGKILL in a subprocess), NaN/Inf stop,
an i2e-convert killed mid-way, and the resumable training order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import cli_env, run_cli
from i2e_train import files
from i2e_train.callbacks import NonFiniteLossError, StepCheckpoint, StopOnNonFinite
from i2e_train.data.sampler import ResumableSampler
from i2e_train.recovery import AtomicCheckpointIO, recovery_callbacks

# The demo, small and deterministic: 2 epochs of 5 batches of 8, a mid-epoch last.ckpt every 2 steps, and
# event augmentation on the device (random crops and flips from the global RNG, which the resume must restore).
FAST = ["trainer.max_epochs=2", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=1", "~logger",
        "data.batch_size=8", "trainer.deterministic=true", "seed=11", "eval_after_fit=false",
        "callbacks.step_checkpoint.every_n_train_steps=2", "data.augment={crop_padding:2,hflip:0.5}"]


def _env(root: Path) -> dict:
    # one thread: the float reductions of both runs are done in the same order
    return cli_env(root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _train(root: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("i2e_train.cli.train", *FAST, f"hydra.run.dir={run_dir}", *extra, cwd=root, timeout=400,
                   env=_env(root), check=False)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path):
    clean = _train(tmp_path, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]

    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "i2e_train.cli.train", *FAST, f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "ended before the kill: " + (tmp_path / "killed.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up, no final checkpoint
    finally:
        proc.wait(timeout=60)
        log.close()
    ckpt = _load(last)  # whatever the moment of the kill, the file is complete
    assert ckpt["global_step"] % 5 != 0, "killed in the middle of an epoch"
    position = ckpt["I2EDataModule"]["data_position"]
    assert 0 < position["batches"] < 5 and position["epoch"] == ckpt["epoch"]
    assert "RestoreRNGState" in ckpt["callbacks"]

    resumed = _train(tmp_path, run, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "resuming from" in out and "restored the RNG states of the checkpoint" in out
    assert f"data position restored: epoch {position['epoch']} continues after {position['batches']} batch(es)" in out

    a, b = _load(tmp_path / "clean" / "checkpoints" / "last.ckpt"), _load(last)
    assert a["global_step"] == b["global_step"] == 10 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _train(tmp_path, run, "optim.lr=1e30", "callbacks.step_checkpoint.every_n_train_steps=1")
    assert proc.returncode != 0
    err = proc.stderr
    assert "NonFiniteLossError" in err and "global step" in err and "last good checkpoint" in err, err[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert str(last) in err
    good = _load(last)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point())
    assert not list(last.parent.glob(".*tmp*"))


# --------------------------------------------------------------------------- in process
class _Tiny(L.LightningModule):
    """A linear model on a fixed dataset; the loss turns NaN at ``nan_at`` (global step)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.lin(x), y)
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ds = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g), torch.arange(24) % 2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.ds, batch_size=4)


# sync_free=True: the check CUDA runs (the loss read after the step, no host synchronisation in it)
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("checkpoint_every_step", [True, False])
def test_nan_loss_names_the_step_and_nothing_is_overwritten(tmp_path, sync_free, checkpoint_every_step):
    ckpts = tmp_path / "ckpt"
    callbacks = [c if not isinstance(c, StopOnNonFinite) else StopOnNonFinite(sync_free=sync_free)
                 for c in recovery_callbacks(tmp_path)]  # fmt: skip
    step_ckpt = StepCheckpoint(ckpts, every_n_train_steps=1 if checkpoint_every_step else None)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()], callbacks=[step_ckpt, *callbacks])
    when = "its optimiser step has run" if sync_free else "stopping before the optimiser step"
    last_good = r"last good checkpoint is kept: .*last.ckpt" if checkpoint_every_step else "No checkpoint was written"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at epoch 0, global step 3 "
                                                 rf"\(batch 3 of the epoch\): {when}.*{last_good}"):
        trainer.fit(_Tiny(nan_at=3), datamodule=_Data())
    if not checkpoint_every_step:
        assert not ckpts.exists()
        return
    last = _load(ckpts / "last.ckpt")
    assert last["global_step"] == 3  # written after step 3; the NaN step's weights are never written
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class _Stop(RuntimeError):
    pass


class _StopAt(L.Callback):
    """Raise (like a kill: nothing saved on the way out) at a global step or at an epoch start."""

    def __init__(self, step: int | None = None, epoch: int | None = None) -> None:
        self.step, self.epoch = step, epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Stop(f"step {self.step}")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise _Stop(f"epoch {self.epoch}")


def _fit_tiny(root, data_root, ckpt_path=None, stop: L.Callback | None = None):
    """SNNClassifier + I2EDataModule on own tiny data, with device-side augmentation (global RNG),
    cosine LR per epoch, momentum, the i2e-train checkpoint set-up. Returns the module."""
    from timm.scheduler import CosineLRScheduler
    from torch import nn

    from i2e_train.data import I2EDataModule
    from i2e_train.module import SNNClassifier

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * 8 * 8, 4)

        def forward(self, x):  # [T, B, C, H, W] -> [B, 4]
            return self.fc(x.mean(0).flatten(1))

    L.seed_everything(5)
    dm = I2EDataModule(name="Tiny", path=str(data_root), data_dir=str(root / "cache"), num_classes=4,
                       resolution=[8, 8], timesteps=2, batch_size=8, num_workers=0, seed=5,
                       augment={"crop_padding": 2, "hflip": 0.5})
    module = SNNClassifier(Net(), num_classes=4, label_smoothing=0.1,
                           optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9),
                           scheduler=lambda o: CosineLRScheduler(o, t_initial=3, lr_min=0.01))
    ckpts = root / "checkpoints"
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, save_last=True, enable_version_counter=False),
                 StepCheckpoint(ckpts, every_n_train_steps=2), *recovery_callbacks(root)]
    trainer = L.Trainer(max_epochs=3, deterministic=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        callbacks=callbacks + ([stop] if stop else []), num_sanity_val_steps=1)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("stop", [_StopAt(step=3), _StopAt(step=7), _StopAt(epoch=1)],
                         ids=["mid-epoch-0", "mid-epoch-1", "epoch-end"])
def test_resume_in_process_equals_uninterrupted(tmp_path, stop):
    """Resumed from a mid-epoch step checkpoint or from the epoch-end last.ckpt: same final weights."""
    import numpy as np

    from i2e_train.codec import encode_record
    from i2e_train.data.writer import shard_name, write_shard

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("validation", 8)):
        labels = [i % 4 for i in range(n)]
        paths = [f"{c}/{i}.npy" for i, c in enumerate(labels)]
        records = [encode_record(rng.random((2, 2, 8, 8)) < 0.2 + 0.15 * c) for c in labels]
        write_shard(tmp_path / "data" / "Tiny" / shard_name(split, 0, 1), paths, labels, records,
                    [str(c) for c in range(4)])
    clean = _fit_tiny(tmp_path / "clean", tmp_path / "data")
    with pytest.raises(_Stop):
        _fit_tiny(tmp_path / "run", tmp_path / "data", stop=stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit_tiny(tmp_path / "run", tmp_path / "data",
                            ckpt_path=str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning's warning for plain loaders
    assert resumed.trainer.global_step == clean.trainer.global_step == 15
    for (k, v), w in zip(clean.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_atomic_checkpoint_io_keeps_the_old_file_when_writing_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".last.ckpt.tmp-{files._host()}-{int(dead.stdout)}").write_bytes(b"half")  # a killed writer's

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "x": Unpicklable()}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary files left
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_resumable_sampler_is_a_function_of_seed_and_epoch():
    ds = list(range(10))
    a, b = ResumableSampler(ds, seed=3), ResumableSampler(ds, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == ds
    b.set_epoch(1)
    assert list(a) != list(b)
    full = list(a)
    a.resume_at(2, 4)
    assert list(a) == full[4:]  # once,
    assert list(a) == full  # then whole epochs again
    a.resume_at(2, 4)
    a.set_epoch(3)  # the interrupted epoch is over: nothing skipped
    assert sorted(a) == ds
    ranks = [list(ResumableSampler(list(range(9)), seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and set(ranks[0] + ranks[1]) == set(range(9))


# --------------------------------------------------------------------------- i2e-convert
@pytest.mark.slow
def test_convert_killed_mid_way_resumes_to_the_same_shards(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for c in ("a", "b", "c"):  # 36 images, 12 shards of 3
        (src / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(src / c / f"{i:02d}.png")

    def shard_bytes(root, config):
        return {p.name: p.read_bytes() for p in sorted((root / config).glob("*.parquet"))}

    args = [f"source={src}", "config=K", "resolution=16", "ratio=0.07", "num_workers=0", "batch_size=1",
            "rows_per_shard=3", "progress=false", "device=cpu"]

    def cmd(out):
        return [sys.executable, "-m", "i2e_train.cli.convert", *args, f"out={out}"]

    run_cli("i2e_train.cli.convert", *args, f"out={tmp_path / 'clean'}", cwd=tmp_path, timeout=300, env=_env(tmp_path))
    want = shard_bytes(tmp_path / "clean", "K")
    assert len(want) == 12

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 200
        while proc.poll() is None and time.monotonic() < deadline and not list((out / "K").glob("*.parquet")):
            time.sleep(0.01)
        assert proc.poll() is None, "the conversion ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = shard_bytes(out, "K")
    assert 0 < len(done) < 12, f"killed after {len(done)} shards"
    for name, data in done.items():  # every shard with its final name is complete
        assert data == want[name], name
    again = subprocess.run(cmd(out), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert shard_bytes(out, "K") == want
    assert not [p for p in (out / "K").iterdir() if ".tmp" in p.name]
