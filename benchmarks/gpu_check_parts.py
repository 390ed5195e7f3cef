"""The parts of ``benchmarks/gpu_check.py`` (converter, loader, training step, GPU tests) and
what they share: the run context, result rows, the timer and the report.

Every part returns rows ``{part, check, result, status, ...numbers}``; status is PASS, FAILED,
info (a measurement) or skipped. Each check inside a part is guarded: its exception becomes a
FAILED row and the part goes on with its next check.
"""

from __future__ import annotations

import gc
import inspect
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

PAPER_MS_224 = 0.1  # the paper: about 0.1 ms per 224x224 image on a GPU
GOAL_MS_224 = 0.01  # ours
RATIOS = {128: 0.07, 224: 0.12}  # the converter ratio of I2E-CIFAR10 (128x128) and I2E-ImageNet (224x224)
EVENT_SHAPE = (8, 2, 128, 128)  # one I2E-CIFAR10 sample (T, C, H, W)

# Sizes of the full check (CUDA) and of the reduced form (CPU, or --quick).
FULL = dict(convert_batch=256, convert_repeats=30, convert_warmup=3, loader_rows=4096, loader_batch=256,
            loader_workers=4, unpack_repeats=20, train_model="ms_resnet18", train_res=128, train_batch=64,
            train_warmup=3, train_steps=10, run_steps=100, run_batch=128, run_test=512, run_workers=6)
QUICK = dict(convert_batch=4, convert_repeats=3, convert_warmup=1, loader_rows=256, loader_batch=64,
             loader_workers=0, unpack_repeats=3, train_model="ms_resnet_tiny", train_res=32, train_batch=4,
             train_warmup=3, train_steps=2, run_steps=20, run_batch=16, run_test=32, run_workers=0)


@dataclass
class Context:
    """Where and how big: the device, the sizes, a scratch folder, the output folder, the deadline."""

    device: torch.device
    quick: bool
    work: Path
    out: Path
    deadline: float | None
    sizes: dict = field(default_factory=dict)

    @classmethod
    def create(cls, cpu: bool, quick: bool, work: Path, out: Path, deadline: float | None) -> "Context":
        """The context of a run; the CPU form runs on one thread (its sizes are too small to gain from
        more, and a busy machine makes spinning worker threads many times slower)."""
        cuda = torch.cuda.is_available() and not cpu
        quick = quick or not cuda
        if not cuda:
            torch.set_num_threads(1)
        return cls(torch.device("cuda" if cuda else "cpu"), quick, work, out, deadline, dict(QUICK if quick else FULL))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mode(self) -> str:
        return ("cuda" if self.cuda else "cpu") + (", reduced sizes" if self.quick else "")

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def row(part: str, check: str, result: str, status: str, **data) -> dict:
    return {"part": part, "check": check, "result": result, "status": status, **data}


def guarded(part: str, check: str, fn: Callable[..., list[dict]], *args) -> list[dict]:
    """``fn(*args)``'s rows, or one FAILED row naming the exception."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a broken check must not hide the next one
        return [row(part, check, f"{type(exc).__name__}: {exc}", "FAILED", traceback=traceback.format_exc()[-3000:])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``. CUDA: a pair of CUDA events around every call and one
    synchronisation after all of them (the GPU time between the events, launch gaps included);
    CPU: ``time.perf_counter`` around every call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1000.0 for s, e in pairs]


# =========================================================================== converter
def photographs(size: int) -> torch.Tensor:
    """The two scikit-learn sample photographs (china, flower) resized to size x size: uint8 [2, 3, S, S]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from i2e_train.data.preprocess import preprocess_image

    return torch.stack([preprocess_image(Image.fromarray(im), (size, size)) for im in load_sample_images().images])


def official(images: torch.Tensor, ratio: float, order: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The official converter's algorithm (one float32 conv2d, ``benchmarks/run.py``) -> float32 [8, B, 2, H, W]."""
    from run import baseline_convert

    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return baseline_convert(x.to(device), ratio, order)


def _ndiff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.cpu() != b.cpu()).sum())


def _nbits(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(np.unpackbits((a.cpu() ^ b.cpu()).numpy()).sum())


def _fast_backends(ctx: Context) -> tuple[str, str]:
    """(the default back-end here, the tensor path): ("compiled", "torch") on CUDA, ("numba", "torch") on CPU."""
    return ("compiled" if ctx.cuda else "numba"), "torch"


def equal_rows(ctx: Context, size: int) -> list[dict]:
    """Eval mode on this device == the official algorithm on the CPU, all presets and outputs."""
    from i2e_train.codec import pack_events
    from i2e_train.i2e import I2E

    imgs, ratio, dev = photographs(size), RATIOS[size], ctx.device
    diff = {b: dict.fromkeys(("float32", "bool", "packed", "float input"), 0) for b in _fast_backends(ctx)}
    events = 0
    for order in range(6):
        ref = official(imgs, ratio, order)
        ref_packed = pack_events(ref.bool())
        events += ref.numel()
        x8, xf = imgs.to(dev), (imgs.float() / 255.0).to(dev)
        for backend, d in diff.items():
            f32 = I2E(ratio=ratio, order=order, backend=backend).eval().to(dev)
            b8 = I2E(ratio=ratio, order=order, backend=backend, dtype=torch.bool).eval().to(dev)
            d["float32"] += _ndiff(f32(x8), ref)
            d["float input"] += _ndiff(f32(xf), ref)
            d["bool"] += _ndiff(b8(x8), ref.bool())
            d["packed"] += _nbits(b8.forward_packed(x8), ref_packed)
    rows = []
    for backend, d in diff.items():
        bad = {k: v for k, v in d.items() if v}
        result = (f"bit-identical: 0 of {events:,} events differ in each output" if not bad
                  else "; ".join(f"{k}: {v:,} of {events:,} differ" for k, v in bad.items()))
        check = (f"eval == official (CPU conv2d), 2 photographs {size}x{size}, presets 0-5, "
                 f"float32/bool/packed/float input [{dev.type}, {backend}]")
        rows.append(row("convert", check, result, "FAILED" if bad else "PASS", mismatches=d))
    return rows


def train_mode_rows(ctx: Context) -> list[dict]:
    """Train mode (random directions): the default back-end == the tensor path for the same draws."""
    from i2e_train.codec import pack_events
    from i2e_train.i2e import I2E

    imgs = photographs(128)
    imgs = torch.cat([imgs, imgs.flip(-1), imgs.flip(-2), imgs.transpose(-1, -2)]).to(ctx.device)  # 8 images
    fast, tensor = _fast_backends(ctx)
    diff = {}
    for dtype in (torch.float32, torch.bool):
        a = I2E(ratio=0.07, backend=fast, dtype=dtype).train()
        b = I2E(ratio=0.07, backend=tensor, dtype=dtype).train()
        gen = (lambda: torch.Generator(device=ctx.device).manual_seed(5))  # noqa: E731 - same draws for both
        ref = b(imgs, generator=gen())
        diff[str(dtype).removeprefix("torch.")] = _ndiff(a(imgs, generator=gen()), ref)
        if dtype == torch.bool:
            diff["packed"] = _nbits(a.forward_packed(imgs, generator=gen()), pack_events(ref))
    bad = {k: v for k, v in diff.items() if v}
    result = "identical events" if not bad else "; ".join(f"{k}: {v:,} differ" for k, v in bad.items())
    return [row("convert", f"train mode (random directions): {fast} == {tensor}, same generator, 8 images "
                           f"[{ctx.device.type}]", result, "FAILED" if bad else "PASS", mismatches=diff)]


def official_on_device_row(ctx: Context) -> list[dict]:
    """Information: the official conv2d run on this GPU (default cuDNN/TF32 settings) vs on the CPU."""
    imgs = photographs(224)
    differ = sum(_ndiff(official(imgs, 0.12, o, ctx.device), official(imgs, 0.12, o)) for o in range(6))
    tf32 = torch.backends.cudnn.allow_tf32
    return [row("convert", "official conv2d on this GPU vs on the CPU (224x224 photographs, presets 0-5)",
                f"{differ:,} events differ (cudnn.allow_tf32={tf32}); ours is compared with the CPU result",
                "info", differ=differ)]


def official_converter(ratio: float, order: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The official algorithm (``baseline_convert``) with its eight kernels built once, as the official
    converter holds them in a conv layer: images float [B, 3, H, W] -> float32 events [8, B, 2, H, W]."""
    from i2e_train.i2e import DIRECTION_GROUPS, ORDER_PRESETS

    weight = torch.zeros(8, 1, 3, 3)
    for t, g in enumerate(ORDER_PRESETS[order]):
        a, b = DIRECTION_GROUPS[g][0]
        weight[t, 0, (a - 1) // 3, (a - 1) % 3] = -1.0
        weight[t, 0, (b - 1) // 3, (b - 1) % 3] = 1.0
    weight = weight.to(device)

    def convert(images: torch.Tensor) -> torch.Tensor:
        v = images.max(dim=1, keepdim=True)[0]
        resp = F.conv2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), weight)
        thr = ratio * (v.amax(dim=(1, 2, 3), keepdim=True) - v.amin(dim=(1, 2, 3), keepdim=True))
        return torch.stack([(resp >= thr).float(), (-resp >= thr).float()], dim=2).transpose(0, 1)

    return convert


def timing_rows(ctx: Context, size: int) -> list[dict]:
    """Time per image of the official conv2d and our float32 / bool / packed outputs."""
    from run import baseline_convert

    from i2e_train.i2e import I2E

    dev, batch, ratio = ctx.device, ctx.sizes["convert_batch"], RATIOS[size]
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=dev)
    f32, b8 = I2E(ratio=ratio).eval().to(dev), I2E(ratio=ratio, dtype=torch.bool).eval().to(dev)
    official_conv = official_converter(ratio, 4, dev)
    if not torch.equal(official_conv(images), baseline_convert(images, ratio)):
        raise AssertionError("the timed official converter differs from benchmarks/run.py's baseline_convert")
    contenders = {"official conv2d, float32": lambda: official_conv(images),
                  "ours float32": lambda: f32(images), "ours bool": lambda: b8(images),
                  "ours packed": lambda: b8.forward_packed(images)}
    ms = {}
    for name, fn in contenders.items():
        ms[name] = 1000.0 * statistics.median(time_calls(fn, dev, ctx.sizes["convert_repeats"],
                                                         ctx.sizes["convert_warmup"])) / batch
    rows = []
    base = ms["official conv2d, float32"]
    for name, v in ms.items():
        result = f"{v:.5f} ms/img ({1000.0 / v:,.0f} img/s); {base / v:.1f}x the official conv2d"
        rows.append(row("convert", f"time {size}x{size}, batch {batch}: {name} [{dev.type}]", result, "info",
                        ms_per_image=v, images_per_s=1000.0 / v, vs_official=base / v))
    if size == 224:
        rows.append(_goal_row(ctx, {k: v for k, v in ms.items() if k.startswith("ours")}))
    return rows


def _goal_row(ctx: Context, ms: dict[str, float]) -> dict:
    parts = [f"{name.removeprefix('ours ')} {v:.5f} ms ({PAPER_MS_224 / v:.2g}x the paper's speed)"
             for name, v in ms.items()]
    met = all(v <= GOAL_MS_224 for v in ms.values())
    check = f"224x224 per image vs the paper (~{PAPER_MS_224} ms) and our goal (<= {GOAL_MS_224} ms)"
    if not ctx.cuda:
        return row("convert", check, "; ".join(parts) + " -- CPU, reduced batch: not the GPU claim", "info")
    verdict = "goal met" if met else "goal NOT met"
    return row("convert", check, f"{verdict}: " + "; ".join(parts), "PASS" if met else "FAILED", goal_met=met)


def part_convert(ctx: Context) -> list[dict]:
    rows = []
    for size in (128, 224):
        rows += guarded("convert", f"eval == official {size}x{size}", equal_rows, ctx, size)
    rows += guarded("convert", "train mode", train_mode_rows, ctx)
    if ctx.cuda:
        rows += guarded("convert", "official conv2d on the GPU", official_on_device_row, ctx)
    for size in (224, 128):
        rows += guarded("convert", f"time {size}x{size}", timing_rows, ctx, size)
    return rows


# =========================================================================== loader
def unpack_rows(ctx: Context) -> list[dict]:
    """Packed I2E-CIFAR10 payloads: host -> device, unpacked there; equal to the CPU unpacking."""
    from i2e_train.codec import packed_size, unpack_events

    dev, batch = ctx.device, ctx.sizes["loader_batch"]
    host = torch.randint(0, 256, (batch, packed_size(EVENT_SHAPE)), dtype=torch.uint8, generator=torch.Generator()
                         .manual_seed(0))  # fmt: skip
    if ctx.cuda:
        host = host.pin_memory()
    same = torch.equal(unpack_events(host.to(dev), EVENT_SHAPE).cpu(), unpack_events(host, EVENT_SHAPE))
    times = time_calls(lambda: unpack_events(host.to(dev, non_blocking=True), EVENT_SHAPE), dev,
                       ctx.sizes["unpack_repeats"], 2)
    rate = batch / statistics.median(times)
    return [row("loader", f"unpack on the device == unpack on the CPU (batch {batch}) [{dev.type}]",
                "identical" if same else "events differ", "PASS" if same else "FAILED"),
            row("loader", f"packed bytes -> {dev.type} -> float32 events [8,B,2,128,128], batch {batch}",
                f"{rate:,.0f} samples/s ({rate * packed_size(EVENT_SHAPE) / 1e9:.2f} GB/s packed in, "
                f"{rate * 4 * np.prod(EVENT_SHAPE) / 1e9:.1f} GB/s float32 out)", "info", samples_per_s=rate)]


def datamodule_rows(ctx: Context) -> list[dict]:
    """I2EDataModule end to end: parquet -> DataLoader -> device -> ``on_after_batch_transfer``."""
    import decode

    from i2e_train.data import I2EDataModule

    root = ctx.work / "i2e-cifar10"
    decode.make_data(root, ctx.sizes["loader_rows"])
    dm = I2EDataModule(name="I2E-CIFAR10", path=str(root), data_dir=str(ctx.work / "hf"), batch_size=ctx.sizes[
        "loader_batch"], num_workers=ctx.sizes["loader_workers"], pin_memory=ctx.cuda)  # fmt: skip
    dm.setup("fit")

    def one_pass() -> int:
        n = 0
        for batch in dm.train_dataloader():
            batch = tuple(b.to(ctx.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
            events, labels = dm.on_after_batch_transfer(batch)
            n += labels.shape[0]
        sync(ctx.device)
        return n

    one_pass()  # warm: workers, memory map, page cache
    t0 = time.perf_counter()
    n = one_pass()
    rate = n / (time.perf_counter() - t0)
    return [row("loader", f"I2EDataModule: parquet -> {ctx.sizes['loader_workers']} workers -> {ctx.device.type} "
                          f"-> events ({n} samples, batch {ctx.sizes['loader_batch']})", f"{rate:,.0f} samples/s",
                "info", samples_per_s=rate)]


def part_loader(ctx: Context) -> list[dict]:
    return guarded("loader", "unpack on the device", unpack_rows, ctx) + guarded(
        "loader", "I2EDataModule", datamodule_rows, ctx)


# =========================================================================== training step
@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    fast: bool  # our bit-identical CPU kernels switched on (the default; plain layers on CUDA anyway)
    amp: str | None  # None (float32), "fp16" (autocast + GradScaler) or "bf16" (autocast)
    channels_last: bool = False
    compile: bool = False
    memory: str | None = None  # module.memory (None: the module's default); "memopt": official + SpikingJelly memopt


CUDA_VARIANTS = (
    Variant("official", "official: torch.nn + SpikingJelly LIF, fp16 AMP", False, "fp16"),
    Variant("memopt", "official + SpikingJelly memopt (level 1), fp16 AMP", False, "fp16", memory="memopt"),
    Variant("ours", "ours, default path (trainer=gpu: fp16 AMP, module.memory=bits)", True, "fp16"),
    Variant("recompute", "ours, module.memory=recompute, fp16 AMP", True, "fp16", memory="recompute"),
    Variant("least", "ours, module.memory=least, fp16 AMP", True, "fp16", memory="least"),
    Variant("ours_fp32_recompute", "ours, module.memory=recompute, float32", True, None, memory="recompute"),
    Variant("fp32", "ours, default path, float32 (trainer.precision=32-true)", True, None),
    Variant("bf16", "ours + bf16 AMP (trainer.precision=bf16-mixed)", True, "bf16"),
    Variant("channels_last", "ours + channels_last (module.channels_last=true), fp16 AMP", True, "fp16", True),
)
CPU_VARIANTS = (
    Variant("official", "official: torch.nn + SpikingJelly LIF, float32 (fp16 AMP needs CUDA)", False, None),
    Variant("ours", "ours, default path (fast kernels, float32)", True, None),
    Variant("recompute", "ours, module.memory=recompute, float32", True, None, memory="recompute"),
    Variant("bf16", "ours + bf16 autocast", True, "bf16"),
    Variant("channels_last", "ours + channels_last, float32", True, None, True),
)
COMPILE = Variant("compile", "ours + torch.compile (module.compile=true), fp16 AMP", True, "fp16", compile=True)


def make_step(ctx: Context, v: Variant, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One SGD step (lr 0.1, momentum 0.9) of a fresh network (``train_model``, seed 0) on the batch
    (x, y). Ours is set up as a run sets it up: ``SNNClassifier.configure_model`` with the module's
    defaults (memory mode, fast kernels) or ``v.memory``; the official network is the plain
    ``torch.nn`` + SpikingJelly network (its own LIF, autograd's default memory), with
    SpikingJelly's ``memopt.optimize_memory(level=1)`` for ``memopt``."""
    from i2e_train.models import create_model
    from i2e_train.models.lif import with_spikingjelly_neurons
    from i2e_train.models.ms_resnet import BasicBlock, Bottleneck
    from i2e_train.module import SNNClassifier

    torch.manual_seed(0)
    model = create_model(ctx.sizes["train_model"], num_classes=10)
    if not v.fast:
        with_spikingjelly_neurons(model)
    mode = {} if v.memory is None else {"memory": "none" if v.memory == "memopt" else v.memory}
    plain = {"fast_kernels": False, "memory": "none"} if not v.fast else mode
    module = SNNClassifier(model, num_classes=10, channels_last=v.channels_last, compile=v.compile, **plain)
    module.configure_model()
    if v.memory == "memopt":
        from spikingjelly.activation_based import memopt

        module.model = model = memopt.optimize_memory(model.to(ctx.device), (BasicBlock, Bottleneck),
                                                      lambda m: m(x[:, :2]), level=1)  # fmt: skip
    module.to(ctx.device)
    net = module._compiled if module._compiled is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(v.amp or "", torch.float32)
    scaler = torch.amp.GradScaler(ctx.device.type) if v.amp == "fp16" else None

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=v.amp is not None):
            loss = F.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss.detach()

    return step


def train_batch(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch: events [8, B, 2, R, R] at a 6% event rate, labels [B]."""
    g = torch.Generator().manual_seed(0)
    b, r = ctx.sizes["train_batch"], ctx.sizes["train_res"]
    x = (torch.rand(8, b, 2, r, r, generator=g) < 0.06).float()
    return x.to(ctx.device), torch.randint(0, 10, (b,), generator=g).to(ctx.device)


def measure(ctx: Context, v: Variant, x: torch.Tensor, y: torch.Tensor) -> dict:
    """First losses (the warm-up steps), median step time, peak CUDA memory of one variant."""
    step = make_step(ctx, v, x, y)
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [float(step()) for _ in range(ctx.sizes["train_warmup"])]
    warm_s = time.perf_counter() - t0
    sync(ctx.device)
    with count_syncs(ctx.device) as syncs:
        sec = statistics.median(time_calls(step, ctx.device, ctx.sizes["train_steps"], 0))
    peak = torch.cuda.max_memory_allocated() / 2**20 if ctx.cuda else None
    del step
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    steps = ctx.sizes["train_steps"]
    per_step = None if syncs.count is None else syncs.count / steps
    return {"losses": losses, "sec": sec, "peak_mib": peak, "warmup_s": warm_s, "syncs_per_step": per_step,
            "sync_sites": syncs.sites[:5], "predicted_mib": predicted_peak(ctx, v, x)}


def predicted_peak(ctx: Context, v: Variant, x: torch.Tensor) -> float | None:
    """Our variants: the dry run's prediction of the peak (MiB) that ``memory=auto`` decides on, for
    the GPU's measured ``max_memory_allocated`` beside it."""
    if not v.fast or v.compile:
        return None
    from i2e_train.models import create_model
    from i2e_train.models.memory_plan import predict_peaks

    mode = v.memory or "bits"
    precision = {"fp16": "16-mixed", "bf16": "bf16-mixed"}.get(v.amp or "", "32-true")
    peaks = predict_peaks(create_model(ctx.sizes["train_model"], num_classes=10), tuple(x.shape), modes=[mode],
                          optimizer=lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                          precision=precision)  # fmt: skip
    return peaks[mode] / 2**20


class count_syncs:  # noqa: N801 - used as a context manager
    """The host synchronisations CUDA's sync debug mode reports inside the block (``count``; None
    off CUDA) and where the first ones happened (``sites``). Explicit ``torch.cuda.synchronize``
    calls (the timing's own, after the steps) are not reported by the debug mode."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.count, self.sites = device.type == "cuda", None, []

    def __enter__(self) -> "count_syncs":
        if self.cuda:
            import warnings

            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if not self.cuda:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        found = [w for w in self._caught if "synchroniz" in str(w.message)]
        self.count = len(found)
        self.sites = [f"{w.filename}:{w.lineno}" for w in found]


# Host synchronisations a training step may make: GradScaler.step reads its found-inf flag on
# the host under fp16 AMP (one per step); nothing else (docs/gpu.md).
def allowed_syncs(v: Variant) -> int:
    return 1 if v.amp == "fp16" else 0


def step_row(ctx: Context, v: Variant, res: dict, base: dict | None) -> dict:
    """One variant's row; ``ours`` must agree with the official-equivalent (CPU: to the bit)."""
    b, r = ctx.sizes["train_batch"], ctx.sizes["train_res"]
    speed = b / res["sec"]
    mem = f", peak {res['peak_mib']:,.0f} MiB" if res["peak_mib"] is not None else ""
    if res.get("predicted_mib") is not None:
        mem += f" (predicted {res['predicted_mib']:,.0f} MiB)"
    check = f"train step {ctx.sizes['train_model']} T8 {r}x{r} b{b}: {v.label} [{ctx.device.type}]"
    if base is None:
        losses = ", ".join(f"{loss:.5f}" for loss in res["losses"])
        return row("train_step", check, f"{speed:,.1f} img/s{mem}; first losses {losses}", "info",
                   images_per_s=speed, **res)
    deltas = [abs(a - b) for a, b in zip(res["losses"], base["losses"])]
    agree = f"first {len(deltas)} losses vs official: max |diff| {max(deltas):.2e} (step 1: {deltas[0]:.2e})"
    result = f"{speed:,.1f} img/s ({base['sec'] / res['sec']:.2f}x official){mem}; {agree}"
    status = "info"
    if v.key in ("ours", "recompute", "least"):  # the same operators on CUDA, bit-identical on CPU
        tol = 1e-3 * abs(base["losses"][0]) if ctx.cuda else 0.0
        status = "PASS" if deltas[0] <= tol and (ctx.cuda or max(deltas) == 0.0) else "FAILED"
    if res.get("syncs_per_step") is not None and v.fast:  # ours only: the official network is not ours to fix
        result += f"; host syncs per step {res['syncs_per_step']:g} (allowed {allowed_syncs(v)})"
        if res["syncs_per_step"] > allowed_syncs(v):
            status, result = "FAILED", result + f" at {', '.join(res['sync_sites'])}"
    return row("train_step", check, result, status, images_per_s=speed, loss_deltas=deltas, **res)


def lif_row(ctx: Context) -> list[dict]:
    """Which SpikingJelly LIF implementation runs on CUDA (its fused Triton/CUDA kernels, or the torch reference)."""
    from spikingjelly.activation_based.functional import neuron_implementation

    info = neuron_implementation("lif", ctx.device)
    impl = info["implementation"]
    fused = impl in ("triton", "cuda")
    detail = "" if fused else f" (unavailable: {info.get('unavailable')})"
    return [row("train_step", "SpikingJelly LIF implementation on CUDA (fused kernels expected)", f"{impl}{detail}",
                "PASS" if fused else "FAILED", unavailable=info.get("unavailable"))]


def part_train_step(ctx: Context) -> list[dict]:
    x, y = train_batch(ctx)
    rows, base = [], None
    for v in CUDA_VARIANTS if ctx.cuda else CPU_VARIANTS:
        try:
            res = measure(ctx, v, x, y)
        except Exception as exc:  # noqa: BLE001
            rows.append(row("train_step", v.label, f"{type(exc).__name__}: {exc}", "FAILED",
                            traceback=traceback.format_exc()[-3000:]))
            continue
        rows.append(step_row(ctx, v, res, base))
        base = res if v.key == "official" else base
    if ctx.cuda:
        rows += guarded("train_step", "SpikingJelly LIF on CUDA", lif_row, ctx)
    return rows


def part_train_compile(ctx: Context) -> list[dict]:
    """The compiled network (warm-up includes building it) against the eager official-equivalent."""
    x, y = train_batch(ctx)
    official_v = CUDA_VARIANTS[0] if ctx.cuda else CPU_VARIANTS[0]
    base = measure(ctx, official_v, x, y)
    res = measure(ctx, COMPILE, x, y)
    out = step_row(ctx, COMPILE, res, base)
    out["result"] += f"; compile + {ctx.sizes['train_warmup']} warm-up steps took {res['warmup_s']:.0f} s"
    return [out]


# =========================================================================== GPU tests
def part_gpu_tests(ctx: Context) -> list[dict]:
    """``pytest -m gpu`` in a child process; one row per test from its JUnit XML."""
    xml = ctx.out / "gpu_tests.xml"  # with every failure's traceback
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "tests"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(ctx.time_left() - 10, 10))
    except subprocess.TimeoutExpired as exc:
        print((exc.stdout or b"")[-8000:] if isinstance(exc.stdout, str) else "", flush=True)
        return [row("gpu_tests", "pytest -m gpu", "timed out before the tests finished", "FAILED")]
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    rows = junit_rows(xml) if xml.is_file() else []
    if not rows:
        tail = (proc.stdout + proc.stderr)[-600:].replace("\n", " / ")
        rows = [row("gpu_tests", "pytest -m gpu", f"no test result (exit {proc.returncode}): {tail}", "FAILED")]
    return rows


def junit_rows(xml: Path) -> list[dict]:
    """One row per test case of a pytest JUnit XML file."""
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '').removeprefix('tests.')}::{case.get('name')}"
        status, result = "PASS", f"passed in {float(case.get('time', 0)):.1f} s"
        for tag, st in (("failure", "FAILED"), ("error", "FAILED"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                status, result = st, (node.get("message") or tag)[:400]
                break
        rows.append(row("gpu_tests", name, result, status))
    return rows


# =========================================================================== report
def machine(ctx: Context) -> dict:
    """Versions and hardware, for the report's header."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": _cpu_name(),
            "cpu_threads": torch.get_num_threads()}
    for name in ("lightning", "spikingjelly", "triton", "numba"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            info[name] = "not installed"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=_driver())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_setup_rows(ctx: Context) -> list[dict]:
    """A FAILED row when the machine has an NVIDIA GPU (``nvidia-smi`` lists one) that torch cannot
    use, e.g. a torch built for a newer CUDA than the driver supports; nothing otherwise."""
    if ctx.cuda:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if not listed:
        return []
    return [row("setup", "torch sees the GPU that nvidia-smi lists",
                f"no: torch {torch.__version__} (built for CUDA {torch.version.cuda}), driver {_driver()}, "
                f"nvidia-smi: {listed.splitlines()[0]}; the checks below ran on the CPU", "FAILED")]


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(rows: list[dict], ctx: Context, seconds: float, args) -> str:
    """The markdown report: header (machine, mode, totals) and one table row per check."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAILED", "info", "skipped")}
    info = machine(ctx)
    lines = [f"# GPU check ({ctx.mode})", "",
             "machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             f"{seconds:.0f} s for the parts (budget {args.budget:.0f} s); "
             + ", ".join(f"{v} {k}" for k, v in counts.items()), "",
             "| part | check | result | status |", "|---|---|---|---|"]
    for r in rows:
        cells = [r["part"], r["check"], r["result"], r["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
