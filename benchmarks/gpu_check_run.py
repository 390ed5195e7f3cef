"""The training-run part of ``benchmarks/gpu_check.py``: ``experiment=cifar10/baseline2`` through the
real Hydra config and ``i2e_train.tasks.train.train`` on generated 32x32 images (online I2E on the
training device), checking that it runs, that the loss falls and, on CUDA, that no step makes the
host wait for the GPU.

Data: a local copy in the layout of the hub's ``uoft-cs/cifar10`` (``train-*.parquet`` and
``test-*.parquet``, columns ``img`` (Image) and ``label`` (ClassLabel, the CIFAR-10 names)).
Class c is a striped image: vertical stripes for even c, horizontal for odd c, 1 + c // 2
periods across the image, random phase, contrast, brightness and tint plus noise. Stripes survive
the recipe's augmentation (pad 4 + random crop 32, horizontal flip) and make events whose
spacing tells the class, so a network can learn them within a few dozen steps.

"The loss falls": the mean training loss of the last quarter of the steps is at most 90% of the
mean of the first quarter (losses kept on the device and read once, after training).

Host synchronisation (CUDA): ``torch.cuda.set_sync_debug_mode("warn")`` from the end of the
warm-up steps to the end of the last training step; every warning ("called a synchronizing CUDA
operation") is counted against the step it happened in, with its call site. "No host
synchronisation per step" = fewer than half of the measured steps saw one (logging every
``trainer.log_every_n_steps`` steps reads values on the host by design and shows in those
steps). Under 16-mixed ``GradScaler.step`` reads its found-inf flag every step (inherent to loss
scaling): counted apart, or it would hide every other sync. On CPU nothing synchronises; a stand-in counts, for information, the operators that
would (host reads of tensor values such as ``.item()``; it cannot see copies to the device).
"""

from __future__ import annotations

import collections
import json
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

from gpu_check_parts import Context, guarded, row

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WARMUP_STEPS = 5
FALL_RATIO = 0.9


# --------------------------------------------------------------------------- data
def striped_images(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 [N, size, size, 3]: class c -> stripes (vertical for even c), 1 + c // 2 periods."""
    n = len(labels)
    coord = np.arange(size, dtype=np.float64) / size
    periods = 1 + labels // 2
    phase = rng.uniform(0, 2 * np.pi, n)
    wave = np.sin(2 * np.pi * periods[:, None] * coord[None, :] + phase[:, None])  # [N, size]
    vertical = (labels % 2 == 0)[:, None, None]
    plane = np.where(vertical, wave[:, None, :], wave[:, :, None])  # [N, size, size]
    level = rng.uniform(0.35, 0.65, (n, 1, 1)) + rng.uniform(0.2, 0.3, (n, 1, 1)) * plane
    tint = rng.uniform(0.7, 1.0, (n, 1, 1, 3))
    img = level[..., None] * tint + rng.normal(0, 0.02, (n, size, size, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_cifar_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """``root/{train,test}-00000-of-00001.parquet`` with columns img / label, balanced classes."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)})
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10)
        imgs = [Image.fromarray(a) for a in striped_images(labels, rng)]
        ds = datasets.Dataset.from_dict({"img": imgs, "label": labels.tolist()}, features=feats)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


# --------------------------------------------------------------------------- probe
class _Counts:
    """Host synchronisations counted per training step and per call site."""

    def __init__(self) -> None:
        self.step = -1
        self.per_step: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.scaler = 0  # GradScaler.step's read of its found-inf flag (16-mixed): inherent, counted apart

    def count(self, site: str) -> None:
        if "grad_scaler.py" in site:  # otherwise every 16-mixed step would show a sync and hide the others
            self.scaler += 1
            return
        self.per_step[self.step] += 1
        self.sites[site] += 1


class CudaSyncCounter(_Counts):
    """CUDA: every synchronising call, as reported by ``torch.cuda.set_sync_debug_mode("warn")``."""

    def __init__(self) -> None:
        super().__init__()
        self._saved: Any = None
        self._filters: Any = None

    def start(self) -> None:
        torch.cuda.set_sync_debug_mode("warn")
        self._filters = warnings.catch_warnings()
        self._filters.__enter__()
        warnings.filterwarnings("always", message=".*synchroniz")
        self._saved = warnings.showwarning
        warnings.showwarning = self._show

    def stop(self) -> None:
        if self._filters is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._saved
        self._filters.__exit__(None, None, None)
        self._filters = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._saved(message, category, filename, lineno, file, line)
        self.count(_site())
        return None


# Operators that make the host wait for a CUDA device: a value read on the host (.item(), bool(),
# float()) or an output whose size depends on the data.
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten._unique", "aten.masked_select",
              "aten.is_nonzero", "aten.equal", "aten.repeat_interleave")


class CpuSyncProxy(_Counts):
    """CPU stand-in for the CUDA check: counts the operators of ``HOST_READS`` (through a
    ``TorchDispatchMode``). It cannot see copies to a device, which synchronise on CUDA too."""

    def __init__(self) -> None:
        super().__init__()
        self._mode: Any = None

    def start(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self

        class HostReads(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func).startswith(HOST_READS):
                    counts.count(f"{str(func).split('.')[1]} at {_site()}")
                return func(*args, **(kwargs or {}))

        self._mode = HostReads()
        self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None


# Wrappers between an operator and the code that called it: left out of the reported call sites.
_WRAPPERS = ("torch/utils/_python_dispatch.py", "torch/_compile.py", "_dynamo/eval_frame.py", "gpu_check_run.py",
             "/warnings.py", "utilities/apply_func.py", "core/apply_func.py")


def _site() -> str:
    """Where the synchronising call came from: its two innermost callers (wrappers left out) and,
    when it lies deeper than the entry point, the innermost frame of i2e_train."""
    frames = [f for f in traceback.extract_stack() if not any(w in f.filename for w in _WRAPPERS)]
    if not frames:
        return "unknown"
    where = " <- ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno}" for f in reversed(frames[-2:]))
    mine = [f for f in frames if "i2e_train" in f.filename and "/cli/" not in f.filename]
    if mine and mine[-1] not in frames[-2:]:
        where += f" (in {'/'.join(Path(mine[-1].filename).parts[-2:])}:{mine[-1].lineno})"
    return where


class StepProbe(Callback):
    """Keeps every training loss on the device, counts host synchronisations per step (CUDA) and
    writes ``path`` (JSON) when training ends. Added to a run by a Hydra override:
    ``+callbacks.gpu_check_probe._target_=gpu_check_run.StepProbe``."""

    def __init__(self, path: str, warmup: int = WARMUP_STEPS) -> None:
        self.path, self.warmup = Path(path), int(warmup)
        self.losses: list[torch.Tensor] = []
        self.syncs: CudaSyncCounter | CpuSyncProxy | None = None
        self.t0: float | None = None
        self.t1: float | None = None
        self.measured = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            cuda = pl_module.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            self.syncs = CudaSyncCounter() if cuda else CpuSyncProxy()
            self.syncs.start()
        if self.syncs is not None:
            self.syncs.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float().reshape(()))
        if self.t0 is not None and self.t1 is None:
            self.measured += 1
            if trainer.global_step >= (trainer.max_steps if trainer.max_steps > 0 else 1 << 62):
                self._end()

    def _stop(self) -> None:
        if self.syncs is not None:
            self.syncs.stop()

    def _end(self) -> None:
        self._stop()
        if isinstance(self.syncs, CudaSyncCounter):
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t1 is None and self.t0 is not None:
            self._end()
        counts = self.syncs or _Counts()
        self.path.write_text(json.dumps({
            "losses": torch.stack(self.losses).tolist() if self.losses else [],
            "measured_steps": self.measured, "seconds": (self.t1 or 0.0) - (self.t0 or 0.0),
            "syncs_per_step": {str(k): v for k, v in sorted(counts.per_step.items())},
            "sync_sites": dict(counts.sites.most_common(12)), "scaler_syncs": counts.scaler,
            "sync_on": pl_module.device.type}))


# --------------------------------------------------------------------------- the run
def overrides(ctx: Context, data: Path, out: Path) -> list[str]:
    """``experiment=cifar10/baseline2 trainer=gpu`` on the generated images; on CPU a small model at 32x32."""
    s = ctx.sizes
    args = ["experiment=cifar10/baseline2", f"data.source={data}", f"paths.output_dir={out / 'run'}",
            f"paths.data_dir={out / 'data'}", f"++trainer.max_steps={s['run_steps']}", "trainer.max_epochs=1",
            f"data.num_workers={s['run_workers']}", "+callbacks.gpu_check_probe._target_=gpu_check_run.StepProbe",
            f"+callbacks.gpu_check_probe.path={out / 'probe.json'}"]
    if ctx.cuda:
        return args + ["trainer=gpu"] + ([f"data.batch_size={s['run_batch']}"] if ctx.quick else [])
    # CPU form: a tiny model in float32 on generated 32x32 images under a name of their own
    return args + ["trainer=cpu", "trainer.precision=32-true", "model=ms_resnet_tiny", "data.name=GEN-CIFAR10",
                   "data.num_classes=10", "data.resolution=[32,32]", f"data.batch_size={s['run_batch']}",
                   "data.pin_memory=false"]


def run_training(ctx: Context) -> tuple[dict, dict]:
    """Generate the images, compose the config, train; returns (train()'s result, the probe's record)."""
    from hydra.core.global_hydra import GlobalHydra

    from i2e_train.config import compose
    from i2e_train.tasks.train import train

    s, out = ctx.sizes, ctx.work / "train_run"
    data = write_cifar_like(out / "cifar10-like", s["run_steps"] * s["run_batch"], s["run_test"])
    GlobalHydra.instance().clear()
    cfg = compose("train", overrides(ctx, data, out))
    GlobalHydra.instance().clear()
    result = train(cfg)
    return result, json.loads((out / "probe.json").read_text())


def loss_rows(ctx: Context, result: dict, probe: dict) -> list[dict]:
    losses = probe["losses"]
    q = max(len(losses) // 4, 1)
    first, last = float(np.mean(losses[:q])), float(np.mean(losses[-q:]))
    finite = bool(np.all(np.isfinite(losses))) and len(losses) == ctx.sizes["run_steps"]
    falls = finite and last <= FALL_RATIO * first
    s = ctx.sizes
    rate = s["run_batch"] * probe["measured_steps"] / probe["seconds"] if probe["seconds"] > 0 else 0.0
    what = "experiment=cifar10/baseline2 " + ("trainer=gpu" if ctx.cuda else "trainer=cpu model=ms_resnet_tiny 32x32")
    return [
        row("train_run", f"{what}: {s['run_steps']} steps, batch {s['run_batch']} [{ctx.device.type}]",
            f"ran {len(losses)} steps, {rate:,.0f} img/s after {WARMUP_STEPS} warm-up steps; "
            f"best checkpoint {'written' if result.get('best_checkpoint') else 'missing'}",
            "PASS" if finite and result.get("best_checkpoint") else "FAILED", images_per_s=rate),
        row("train_run", f"the loss falls (last quarter's mean <= {FALL_RATIO} x the first quarter's)",
            f"{first:.3f} -> {last:.3f}", "PASS" if falls else "FAILED", losses=losses),
    ]


def sync_rows(ctx: Context, probe: dict) -> list[dict]:
    """CUDA: the check; CPU: the stand-in's count, for information."""
    per_step, steps = probe["syncs_per_step"], probe["measured_steps"]
    with_sync = sum(1 for v in per_step.values() if v)
    sites = "; ".join(f"{k} x{v}" for k, v in probe["sync_sites"].items()) or "none"
    result = f"{with_sync} of {steps} steps synchronised ({sum(per_step.values())} in all); sites: {sites}"
    if probe.get("scaler_syncs"):
        result += f"; apart from GradScaler.step's found-inf read under 16-mixed: {probe['scaler_syncs']}"
    if probe["sync_on"] != "cuda":
        check = ("host synchronisation per step: not applicable on CPU; stand-in: host reads of tensor values "
                 "(.item(), nonzero, ...) that would make CUDA wait (copies to the device are not visible)")
        return [row("train_run", check, result, "info", **probe)]
    check = "no host synchronisation per step (set_sync_debug_mode warn, steps after the warm-up)"
    return [row("train_run", check, result, "PASS" if with_sync < steps / 2 else "FAILED", **probe)]


def part_train_run(ctx: Context) -> list[dict]:
    try:
        result, probe = run_training(ctx)
    except Exception as exc:  # noqa: BLE001
        return [row("train_run", "experiment=cifar10/baseline2 on generated images", f"{type(exc).__name__}: {exc}",
                    "FAILED", traceback=traceback.format_exc()[-3000:])]
    return guarded("train_run", "loss", loss_rows, ctx, result, probe) + guarded(
        "train_run", "host synchronisation", sync_rows, ctx, probe)
