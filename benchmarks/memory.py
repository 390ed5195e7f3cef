"""Training memory and step time of each memory mode against the official model.

    python benchmarks/memory.py                  # MS-ResNet18, T=8, 64x64 and 128x128, batch 16
    python benchmarks/memory.py --quick          # a reduced run (seconds): the same code paths
    python benchmarks/memory.py --json out.json --budget-mib 1024
    python benchmarks/memory.py --parts time --repeats 5 --time-steps 8   # step times only

Variants (same batch, same initial weights, same losses to the bit, checked):
- ``official``: the plain torch.nn + SpikingJelly network (``set_fast_kernels(model, False)``),
  memory mode ``none``: what the official scripts train;
- ``fast``: the fast CPU paths, memory mode ``none`` (the training path before the memory modes,
  the reference of the ``x today`` column);
- ``bits`` and ``bits+checkpoint``: the fast paths in those memory modes
  (:mod:`i2e_train.models.memory`); ``bits`` is what ``i2e-train`` runs by default.
Every variant runs on PyTorch's own CPU allocator (nothing replaces it process-wide).

Peak memory: one fresh process per variant and repeat; on CPU the growth of the peak resident
set over the set-up (libraries and kernels loaded by a warm-up step of a tiny network, model,
optimiser and data built) during ``--steps`` SGD steps (momentum, so the step after the first
holds gradients and momentum buffers: the peak), read as ``VmHWM`` after resetting it at the
set-up (``/proc/self/clear_refs``; ``ru_maxrss`` would carry the parent's peak into a child
started by ``subprocess``); on CUDA ``torch.cuda.max_memory_allocated`` too. Step time: a fresh
process steps every variant in turn (who goes first rotates) for ``--time-steps`` steps after one
untimed step; the median per process, then the median over ``--repeats``. ``x today`` is the
per-repeat ratio of a variant's ``x official`` to ``fast``'s. Largest batch: per variant, the
largest batch whose peak stays within ``--budget-mib``, by bisection on fresh processes.

On glibc, part of a CPU peak is memory the allocator keeps after ``free`` (fragmentation), which
depends on the order of allocations more than on their sizes. ``--mmap-threshold BYTES`` runs the
children with ``MALLOC_MMAP_THRESHOLD_`` set, so that blocks above that size go back to the
system when freed: the peak then follows the live tensors (allocator-neutral numbers, what a GPU's
``max_memory_allocated`` would count). That is the default (131072); ``--mmap-threshold 0`` measures
glibc's default behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (fast kernels, memory mode)
    "official": (False, "none"),
    "fast": (True, "none"),  # today's path before the memory modes
    "bits": (True, "bits"),
    "bits+checkpoint": (True, "bits+checkpoint"),
}


def resident() -> dict[str, int]:
    """This process's resident set now and at its highest since the last reset, in bytes
    (``VmRSS`` / ``VmHWM`` of ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["current" if key == "VmRSS" else "peak"] = int(rest.split()[0]) * 1024
    return out


def reset_resident_peak() -> None:
    """``VmHWM`` from here (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------- child process
def _build(arch: str, name: str, device):
    """A fresh network for variant ``name`` from the same seed (same initial weights)."""
    import torch

    from i2e_train.models import create_model
    from i2e_train.models.layers import set_fast_kernels
    from i2e_train.models.memory import set_memory

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).to(device)
    set_fast_kernels(model, VARIANTS[name][0])
    set_memory(model, VARIANTS[name][1])
    return model


def _train(steps: dict, x, y, n_steps: int) -> tuple[dict, dict, dict]:
    """``n_steps`` SGD steps of every (model, optimiser) in ``steps``, one each in turn (who goes
    first rotates): wall and CPU seconds of each step, and the losses."""
    import time

    import torch

    names = list(steps)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for i in range(n_steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            model, opt = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())  # synchronises on CUDA
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu, losses


def _child(spec: dict) -> dict:
    """Train ``spec['variants']`` side by side for ``spec['steps']`` steps in this (fresh) process:
    the growth of the peak memory over the set-up, median step times (the first step left out)
    and every loss."""
    import torch

    sys.path.insert(0, str(ROOT))
    device = torch.device(spec["device"])
    names = spec["variants"]
    for name in names:  # warm-up: every library and kernel of the variant loaded before the reference
        warm = _build("ms_resnet_tiny", name, device)
        events = (torch.rand(2, 2, 2, 32, 32, device=device) < 0.1).float()
        torch.nn.functional.cross_entropy(warm(events), torch.tensor([1, 2], device=device)).backward()
        del warm, events
    gen = torch.Generator().manual_seed(0)
    size, batch = spec["size"], spec["batch"]
    x = (torch.rand(spec["t"], batch, 2, size, size, generator=gen) < 0.1).float().to(device)  # [T, B, 2, H, W]
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    steps = {}
    for name in names:
        model = _build(spec["arch"], name, device)
        steps[name] = (model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_resident_peak()
    base = resident()["current"]
    wall, cpu, losses = _train(steps, x, y, spec["steps"])
    out = {"peak_rss_mib": (resident()["peak"] - base) / 2**20,
           "sec": {n: statistics.median(wall[n][1:] or wall[n]) for n in names},
           "cpu_sec": {n: statistics.median(cpu[n][1:] or cpu[n]) for n in names}, "losses": losses}  # fmt: skip
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(spec: dict, mmap_threshold: int | None) -> dict:
    """``_child(spec)`` in a fresh interpreter."""
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env=env)
    if out.returncode:
        raise RuntimeError(f"benchmark child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurements
def _spec(args, size: int, batch: int, variants: list[str], steps: int) -> dict:
    return {"arch": args.arch, "t": args.t, "size": size, "batch": batch, "variants": variants, "steps": steps,
            "device": args.device}  # fmt: skip


def peak_memory(args, name: str, size: int, batch: int, repeats: int) -> dict:
    """Median peak of ``repeats`` fresh processes training variant ``name`` alone."""
    runs = [run_child(_spec(args, size, batch, [name], args.steps), args.mmap_threshold) for _ in range(repeats)]
    out = {"peak_mib": statistics.median(r["peak_rss_mib"] for r in runs), "peaks": [r["peak_rss_mib"] for r in runs]}
    if "cuda_peak_mib" in runs[0]:
        out["cuda_peak_mib"] = statistics.median(r["cuda_peak_mib"] for r in runs)
    return out


def step_times(args, size: int, batch: int, names: list[str]) -> tuple[dict, bool]:
    """Per variant: median step time and its ratios to the official model's and to today's path
    (``fast``, when it runs), each the median over ``repeats``; per repeat, one fresh process
    steps every variant in turn (the official model first, then who goes first rotates). Also
    whether every variant's losses equal the official's."""
    others = [n for n in names if n != "official"]
    groups = [["official", *others[i:], *others[:i]] for i in range(max(len(others), 1))]
    out: dict[str, dict[str, list[float]]] = {n: {"sec": [], "time_vs_official": [], "time_vs_today": []} for n in names}
    identical = True
    for i in range(args.repeats):
        sec: dict[str, list[float]] = {n: [] for n in names}
        vs_official: dict[str, list[float]] = {n: [] for n in names}
        for group in [groups[i % len(groups)]]:
            res = run_child(_spec(args, size, batch, group, args.time_steps + 1), args.mmap_threshold)
            for n in group:
                sec[n].append(res["sec"][n])
                vs_official[n].append(res["sec"][n] / res["sec"]["official"])
                identical &= res["losses"][n] == res["losses"]["official"]
        for n in names:  # the official model ran in every process: its median
            out[n]["sec"].append(statistics.median(sec[n]))
            out[n]["time_vs_official"].append(statistics.median(vs_official[n]))
            if "fast" in names:
                out[n]["time_vs_today"].append(out[n]["time_vs_official"][-1] / statistics.median(vs_official["fast"]))
    return {n: {k: statistics.median(v) for k, v in out[n].items() if v} for n in names}, identical


def largest_batch(args, name: str, size: int, budget_mib: float, start: int, cap: int = 1024) -> int:
    """The largest batch whose peak (one fresh process, two steps) stays within ``budget_mib``:
    doubling from ``start`` until it no longer fits, then bisection. 0 if batch 1 does not fit."""

    def fits(b: int) -> bool:
        return run_child(_spec(args, size, b, [name], 2), args.mmap_threshold)["peak_rss_mib"] <= budget_mib

    lo, hi, b = 0, None, start  # lo fits (0: none known), hi does not
    while hi is None:
        if not fits(b):
            hi = b
        elif 2 * b > cap:
            return b
        else:
            lo, b = b, 2 * b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------- report
def bench_size(args, size: int) -> list[dict]:
    """Every variant at one input size: peak memory, step time, largest batch in the budget
    (the parts asked for)."""
    rows = [{"size": size, "batch": args.batch, "variant": name} for name in args.variants]
    if "time" in args.parts:
        times, identical = step_times(args, size, args.batch, args.variants)
        for row in rows:
            row.update(times[row["variant"]], losses_identical=identical)
    if "memory" in args.parts:
        for row in rows:
            row.update(peak_memory(args, row["variant"], size, args.batch, args.repeats))
        for row in rows:
            row["memory_vs_official"] = row["peak_mib"] / rows[0]["peak_mib"]  # rows[0]: the official model
    if args.budget_mib:
        for row in rows:
            row["largest_batch"] = largest_batch(args, row["variant"], size, args.budget_mib, args.batch)
    return rows


def _cell(row: dict, key: str, fmt: str, width: int, suffix: str = "") -> str:
    return format(format(row[key], fmt) + suffix if key in row else "-", f">{width}")


def print_table(rows: list[dict], args) -> None:
    budget = f"batch in {args.budget_mib:.0f} MiB" if args.budget_mib else ""
    print(f"\n{'input':<8} {'variant':<16}{'peak MiB':>10}{'x official':>11}{'step s':>9}{'x official':>11}"
          f"{'x today':>8}{budget:>22}  losses")  # fmt: skip
    for r in rows:
        cuda = f"  (cuda {r['cuda_peak_mib']:.0f} MiB)" if "cuda_peak_mib" in r else ""
        same = {True: "identical", False: "DIFFERENT"}.get(r.get("losses_identical"), "-")
        print(f"{str(r['size']) + 'x' + str(r['size']):<8} {r['variant']:<16}"
              f"{_cell(r, 'peak_mib', '.0f', 10)}"
              f"{_cell(r, 'memory_vs_official', '.2f', 11, 'x')}{_cell(r, 'sec', '.3f', 9)}"
              f"{_cell(r, 'time_vs_official', '.2f', 11, 'x')}{_cell(r, 'time_vs_today', '.2f', 8, 'x')}"
              f"{_cell(r, 'largest_batch', 'd', 22) if budget else ''}  {same}{cuda}")  # fmt: skip


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="ms_resnet_tiny, 32x32, T=4, batch 4, one repeat")
    ap.add_argument("--arch", default="ms_resnet18")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="variants to run (the official model is always run first: the reference)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--t", type=int, default=8, help="time steps T")
    ap.add_argument("--steps", type=int, default=3, help="SGD steps per memory process")
    ap.add_argument("--time-steps", type=int, default=6, help="timed SGD steps per variant and process")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    ap.add_argument("--parts", nargs="+", choices=["memory", "time"], default=["memory", "time"])
    ap.add_argument("--budget-mib", type=float, default=None, help="find the largest batch within this peak")
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ of the children (default 131072: allocator-neutral, the peak "
                         "follows the live tensors as a GPU allocator's count does; 0: glibc's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return []
    args.variants = ["official"] + [v for v in args.variants if v != "official"]
    if args.quick:
        args.arch, args.sizes, args.t, args.batch, args.steps, args.time_steps, args.repeats = (
            "ms_resnet_tiny", [32], 4, 4, 2, 2, 1)  # fmt: skip
    rows = [r for size in args.sizes for r in bench_size(args, size)]
    print(f"{args.arch}, T={args.t}, batch {args.batch}, {args.steps} SGD steps (memory), {args.time_steps} timed "
          f"steps, medians of {args.repeats} fresh processes, device {args.device}"
          + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""))  # fmt: skip
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
