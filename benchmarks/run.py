"""One table: conversion, data loading and training throughput, each against its baseline.

    python benchmarks/run.py                 # everything, on CUDA too when available
    python benchmarks/run.py --only convert  # or: loader, train

Baselines are written here, faithful to the official code's approach:
- conversion: V = max over colour channels, replicate pad, ONE float32 conv2d with the eight
  {-1, +1} 3x3 kernels, two comparisons, float32 output (``baseline_convert``);
- data: the dataset card's per-sample recipe (``benchmarks/decode.py``);
- training: the same MS-ResNet18 run eagerly in float32 with the default memory format, built
  from the plain torch.nn layers and SpikingJelly's own LIF neurons.
Every number is the median of ``--repeats`` runs (conversion, which is quick: 3x as many, at
least 15); baseline and contenders alternate (who goes first rotates). Training: each repeat is
one fresh process that steps every variant in turn on the same batch from the same initial
weights, so every loss can be compared with the baseline's, and machine noise hits all alike;
peak memory is measured in one process per variant as the growth of the peak resident set over
the set-up (libraries and compiled kernels loaded, model and data built). A ratio > 1 means
faster than the baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from i2e_train.i2e import DIRECTION_GROUPS, I2E, ORDER_PRESETS  # noqa: E402


# --------------------------------------------------------------------------- conversion
def baseline_convert(images: torch.Tensor, ratio: float = 0.07, order: int = 4) -> torch.Tensor:
    """The official approach: one float32 conv2d with eight kernels, float32 events [8, B, 2, H, W]."""
    v = images.max(dim=1, keepdim=True)[0]  # [B, 1, H, W]
    k = torch.zeros(8, 1, 3, 3, device=images.device)
    for t, g in enumerate(ORDER_PRESETS[order]):
        a, b = DIRECTION_GROUPS[g][0]
        k[t, 0, (a - 1) // 3, (a - 1) % 3] = -1.0
        k[t, 0, (b - 1) // 3, (b - 1) % 3] = 1.0
    resp = F.conv2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), k)  # [B, 8, H, W]
    thr = ratio * (v.amax(dim=(1, 2, 3), keepdim=True) - v.amin(dim=(1, 2, 3), keepdim=True))
    on, off = (resp >= thr).float(), (-resp >= thr).float()
    return torch.stack([on, off], dim=2).transpose(0, 1)  # [8, B, 2, H, W]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_convert(device: torch.device, size: int, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device)
    out_shape = (8, batch, 2, size, size)
    conv = {dt: I2E(ratio=0.07, dtype=dt).eval().to(device) for dt in (torch.float32, torch.bool, torch.uint8)}
    assert torch.equal(conv[torch.float32](images), baseline_convert(images)), "ours must equal the baseline"
    contenders = {
        "conv2d baseline (float32)": lambda: baseline_convert(images),
        "ours float32": lambda: conv[torch.float32](images),
        "ours bool": lambda: conv[torch.bool](images),
        "ours uint8": lambda: conv[torch.uint8](images),
        "ours packed bits (i2e-convert)": lambda: conv[torch.bool].forward_packed(images),
        "ceiling: bare float32 output write": lambda: torch.ones(out_shape, device=device),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    _sync(device)
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            _sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({"what": f"convert {size}x{size} b{batch}: {name}", "value": batch / med, "unit": "img/s",
                     "ratio": base / med, "ms_per_image": 1000 * med / batch})
    return rows


# --------------------------------------------------------------------------- training
_TRAIN_CHILD = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, {root!r})
from i2e_train.models import create_model
from i2e_train.models.lif import with_spikingjelly_neurons
from i2e_train.models.memory import set_memory
variants, device, steps, allocators = {variants!r}, torch.device({device!r}), {steps}, {allocators!r}
from contextlib import nullcontext
def resident():  # resident set now and at its highest (/proc/self/status, bytes)
    out = {{}}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["current" if key == "VmRSS" else "peak"] = int(rest.split()[0]) * 1024
    return out

def allocator_of(variant):  # every variant runs on PyTorch's allocator (no process-wide replacement)
    return nullcontext()

torch.manual_seed(0)
x = (torch.rand(8, 8, 2, 64, 64, device=device) < 0.1).float()  # [T=8, B=8, 2, 64, 64]
y = torch.randint(0, 10, (8,), device=device)

def make(name, arch="ms_resnet18", x=x, y=y):
    torch.manual_seed(0)
    variant = {variant_of!r}.get(name, name)
    with allocator_of(name):  # its weights from its allocator too
        model = create_model(arch, num_classes=10).to(device)
        if variant == "baseline":  # the plain torch.nn + SpikingJelly network: SpikingJelly's own LIF
            with_spikingjelly_neurons(model)
        set_memory(model, {{"ours_bits": "bits", "ours_recompute": "recompute"}}.get(variant, "none"))  # what the backward keeps
        if "channels_last" in variant:
            model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if variant.endswith("compile") else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp = "bf16" in variant
    def step():
        with allocator_of(name):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        return loss
    return step

for v in variants:  # every library and kernel of the variant loaded before the memory reference point
    make(v, "ms_resnet_tiny", (torch.rand(2, 2, 2, 32, 32, device=device) < 0.1).float(), y[:2])()
steps_fn = {{v: make(v) for v in variants}}
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here, Linux 4.0+ (ru_maxrss would include this parent's)
base_rss = resident()["current"]
losses = {{v: [f().item(), f().item()] for v, f in steps_fn.items()}}  # warm-up (and kernel compilation)
ts = {{v: [] for v in variants}}
for i in range(steps):
    for v in variants[i % len(variants):] + variants[: i % len(variants)]:  # rotate who goes first
        t0 = time.perf_counter(); loss = steps_fn[v]()
        if device.type == "cuda": torch.cuda.synchronize()
        ts[v].append(time.perf_counter() - t0)
        losses[v].append(loss.item())
if device.type == "cuda":
    peak = torch.cuda.max_memory_allocated()
else:  # growth of the peak RSS over the set-up (libraries, kernels, model, data): the training's own memory
    peak = resident()["peak"] - base_rss
print(json.dumps({{v: {{"sec": statistics.median(ts[v]), "peak": peak, "losses": losses[v]}} for v in variants}}))
"""

TRAIN_VARIANTS = {  # name -> (label, host allocator of its process)
    "baseline": ("eager float32, torch.nn + SpikingJelly LIF (baseline)", "pytorch"),
    "ours": ("ours: fast kernels, float32, module.memory=none", "pytorch"),
    "ours_bits": ("ours: fast kernels, float32, module.memory=bits (the default)", "pytorch"),
    "ours_recompute": ("ours: fast kernels, float32, module.memory=recompute", "pytorch"),
    "ours_channels_last": ("ours + channels_last", "pytorch"),
    "ours_bf16": ("ours + bf16 autocast (precision=bf16-mixed)", "pytorch"),
    "ours_compile": ("ours + torch.compile", "pytorch"),
}
_VARIANT_OF: dict[str, str] = {}  # variant -> the network it trains, when another variant's


def _train_child(device: torch.device, variants: list[str], steps: int) -> dict:
    allocators = {v: TRAIN_VARIANTS[v][1] for v in variants}
    assert list(allocators.values()).count("caching") <= 1, f"the caching allocator's pool is one per process: {variants}"
    code = _TRAIN_CHILD.format(root=str(ROOT), variants=variants, device=str(device), steps=steps,
                               allocators=allocators, variant_of=_VARIANT_OF)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"training benchmark {variants} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(device: torch.device, repeats: int, steps: int, variants: list[str]) -> list[dict]:
    """Speed: every repeat is one fresh process that trains every variant side by side, one step
    each in turn (same data, same initial weights, each with its host allocator); the ratio is
    the median over repeats of the per-process median step time against the baseline's of the
    same process. Memory: one process per variant."""
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    secs: dict[str, list[float]] = {v: [] for v in variants}
    dloss: dict[str, float] = {v: 0.0 for v in variants}
    for _ in range(repeats):
        res = _train_child(device, variants, steps)
        for v in variants:
            secs[v].append(res[v]["sec"])
            ratios[v].append(res["baseline"]["sec"] / res[v]["sec"])
            # largest loss difference to the baseline over all steps (same data, same init)
            diff = max(abs(a - b) for a, b in zip(res[v]["losses"], res["baseline"]["losses"]))
            dloss[v] = max(dloss[v], diff)
    rows = []
    for v in variants:
        peak = _train_child(device, [v], 2)[v]["peak"]
        sec = statistics.median(secs[v])
        rows.append({"what": f"train step ms_resnet18 T8 64x64 b8: {TRAIN_VARIANTS[v][0]}", "value": 8 / sec,
                     "unit": "img/s", "ratio": statistics.median(ratios[v]), "peak_mib": peak / 2**20,
                     "loss_diff": dloss[v], "steps": steps + 2})
    return rows


# --------------------------------------------------------------------------- loader
def bench_loader(repeats: int, rows: int, workers: int) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import decode

    res = decode.main(["--rows", str(rows), "--workers", str(workers), "--repeats", str(repeats)])
    return [
        {"what": "loader: samples/s out of the DataLoader (vs card recipe)", "value": res["a_ours"],
         "unit": "samples/s", "ratio": res["a_ratio"]},
        {"what": "loader: model-ready float32 batches on CPU (vs card recipe)", "value": res["b_ours"],
         "unit": "samples/s", "ratio": res["b_ratio"]},
        {"what": "loader: bytes per sample to the device (vs float32)", "value": res["bytes_ours"], "unit": "B",
         "ratio": res["c_ratio"]},
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'what':<78}{'value':>12} {'unit':<10}{'vs baseline':>12}  extra")
    for r in rows:
        extra = ""
        if "peak_mib" in r:
            extra = f"peak {r['peak_mib']:,.0f} MiB, dloss {r['loss_diff']:.1e}"
        elif "ms_per_image" in r:
            extra = f"{r['ms_per_image']:.4f} ms/img"
        ratio = f"1/{1 / r['ratio']:.0f}" if r["ratio"] < 0.1 else f"{r['ratio']:.2f}x"
        print(f"{r['what']:<78}{r['value']:>12,.1f} {r['unit']:<10}{ratio:>12}  {extra}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["convert", "loader", "train"], action="append")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--loader-rows", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the network")
    ap.add_argument("--train-variants", nargs="+", choices=list(TRAIN_VARIANTS), default=None,
                    help="training variants to time (default: all but ours_compile; the baseline always runs)")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    parts = args.only or ["convert", "loader", "train"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows: list[dict] = []
    print(f"machine: {machine()}")
    for dev in devices:
        if "convert" in parts:
            for size in (128, 224):
                rows += [dict(r, device=dev.type) for r in bench_convert(dev, size, 64, max(3 * args.repeats, 15))]
        if "train" in parts:
            variants = args.train_variants or ["ours", "ours_bits", "ours_recompute", "ours_channels_last", "ours_bf16"]
            variants = ["baseline"] + [v for v in variants if v != "baseline"] + (["ours_compile"] if args.compile else [])
            rows += [dict(r, device=dev.type) for r in bench_train(dev, args.repeats, args.train_steps, variants)]
    if "loader" in parts:
        rows += [dict(r, device="cpu") for r in bench_loader(args.repeats, args.loader_rows, args.workers)]
    for dev in dict.fromkeys(r["device"] for r in rows):
        print(f"\n== {dev} ==")
        print_table([r for r in rows if r["device"] == dev])
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
