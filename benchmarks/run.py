"""One table: conversion, data loading and training throughput, each against its baseline.

    python benchmarks/run.py                 # everything, on CUDA too when available
    python benchmarks/run.py --only convert  # or: loader, train

Baselines are written here, faithful to the official code's approach:
- conversion: V = max over colour channels, replicate pad, ONE float32 conv2d with the eight
  {-1, +1} 3x3 kernels, two comparisons, float32 output (``baseline_convert``);
- data: the dataset card's per-sample recipe (``benchmarks/decode.py``);
- training: the same MS-ResNet18 run eagerly in float32 with the default memory format.
Every number is the median of ``--repeats`` runs; baseline and contenders alternate, in one
process for conversion and in fresh subprocesses for training (so that each has its own peak
memory). A ratio > 1 means faster than the baseline.
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
import json, resource, statistics, sys, time, torch
sys.path.insert(0, {root!r})
from i2e_train.models import create_model
variant, device, steps = {variant!r}, torch.device({device!r}), {steps}
torch.manual_seed(0)
x = (torch.rand(8, 8, 2, 64, 64, device=device) < 0.1).float()  # [T=8, B=8, 2, 64, 64]
y = torch.randint(0, 10, (8,), device=device)
model = create_model("ms_resnet18", num_classes=10).to(device)
if variant != "baseline":
    model = model.to(memory_format=torch.channels_last)
net = torch.compile(model) if variant.endswith("compile") else model
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
amp = variant.startswith("bf16")
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return loss
first = step().item()
step()
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
ts = []
for _ in range(steps):
    t0 = time.perf_counter(); step()
    if device.type == "cuda": torch.cuda.synchronize()
    ts.append(time.perf_counter() - t0)
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"sec": statistics.median(ts), "peak": peak, "first_loss": first}}))
"""

TRAIN_VARIANTS = {
    "baseline": "eager float32, default memory format (baseline)",
    "ours": "ours: channels_last float32 (default)",
    "bf16": "ours + bf16 autocast (precision=bf16-mixed)",
}


def bench_train(device: torch.device, repeats: int, steps: int, variants: list[str]) -> list[dict]:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            code = _TRAIN_CHILD.format(root=str(ROOT), variant=v, device=str(device), steps=steps)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
            if out.returncode:
                raise RuntimeError(f"training benchmark {v} failed:\n{out.stderr[-3000:]}")
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(x["sec"] for x in runs["baseline"])
    base_loss = runs["baseline"][0]["first_loss"]
    rows = []
    for v in variants:
        sec = statistics.median(x["sec"] for x in runs[v])
        peak = statistics.median(x["peak"] for x in runs[v])
        rows.append({"what": f"train step ms_resnet18 T8 64x64 b8: {TRAIN_VARIANTS.get(v, v)}", "value": 8 / sec,
                     "unit": "img/s", "ratio": base / sec, "peak_mib": peak / 2**20,
                     "first_loss_diff": abs(runs[v][0]["first_loss"] - base_loss)})
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
    print(f"\n{'what':<78}{'value':>12} {'unit':<10}{'vs baseline':>12}{'extra':>24}")
    for r in rows:
        extra = ""
        if "peak_mib" in r:
            extra = f"peak {r['peak_mib']:,.0f} MiB, dloss {r['first_loss_diff']:.1e}"
        elif "ms_per_image" in r:
            extra = f"{r['ms_per_image']:.4f} ms/img"
        ratio = f"1/{1 / r['ratio']:.0f}" if r["ratio"] < 0.1 else f"{r['ratio']:.2f}x"
        print(f"{r['what']:<78}{r['value']:>12,.1f} {r['unit']:<10}{ratio:>12}{extra:>24}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["convert", "loader", "train"], action="append")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--loader-rows", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the network")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    parts = args.only or ["convert", "loader", "train"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows: list[dict] = []
    print(f"machine: {machine()}")
    for dev in devices:
        if "convert" in parts:
            for size in (128, 224):
                rows += [dict(r, device=dev.type) for r in bench_convert(dev, size, 64, max(args.repeats, 5))]
        if "train" in parts:
            variants = ["baseline", "ours", "bf16"] + (["ours_compile"] if args.compile else [])
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
