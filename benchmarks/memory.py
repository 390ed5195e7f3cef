"""Training memory of the memory modes against the official model and SpikingJelly's memopt.

    python benchmarks/memory.py                          # MS-ResNet18 and SEW-ResNet18, T=8, 64x64, batch 16
    python benchmarks/memory.py --quick                  # a reduced run (seconds): the same code paths
    python benchmarks/memory.py --parts time --today ../main   # step time beside another checkout's default
    python benchmarks/memory.py --device cuda            # also torch.cuda.max_memory_allocated

Variants of each network (same batch, same initial weights; losses checked identical to the
reference of the same path):
- ``official``: the plain torch.nn + SpikingJelly network, memory mode ``none``;
- ``memopt``: ``official`` through SpikingJelly 2.0's ``memopt.optimize_memory(level=1)``
  (every residual block a checkpointed segment, its input bit-compressed where it is binary;
  levels 2-4 profile on CUDA only);
- ``<mode>/torch``: memory mode ``<mode>`` on the tensor-operation path, the path CUDA takes
  (:mod:`i2e_train.models.recompute`; ``bitpack.FORCE_TORCH``, fast kernels off);
- ``<mode>/cpu``: memory mode ``<mode>`` with the CPU layer (fused kernels; MS-ResNet only);
- ``today`` (``--today PATH``): the default of another checkout (e.g. main), as its
  ``SNNClassifier`` configures it.

Peak memory: one fresh process per variant, ``MALLOC_MMAP_THRESHOLD_`` (``--mmap-threshold``,
default 131072) set in its environment so that freed blocks go back to the system and the
resident peak follows the live tensors, as a CUDA allocator's count does (allocator-neutral);
the growth of the peak resident set (``VmHWM``, reset after the set-up: libraries loaded by a
warm-up step, model, optimiser and data built) during ``--steps`` SGD steps with momentum. On
CUDA ``torch.cuda.max_memory_allocated`` too. ``kept MiB``: the bytes kept for the backward by
one forward (distinct storages, parameters left out), in float32 and under bfloat16 autocast,
counted by a ``saved_tensors_hooks`` (and the engine's observer): no GPU needed.

Step time (``--parts time``): one fresh process steps the timed variants in turn (who goes first
rotates) for ``--time-steps`` steps after one untimed step; the median per process, the median
over ``--repeats`` processes; ratios to ``today`` (or ``bits/cpu``) per process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETS = {"ms_resnet18": "MS-ResNet18", "sew_resnet18": "SEW-ResNet18 (SpikingJelly)", "ms_resnet_tiny": "MS-ResNet tiny"}
VARIANTS = ["official", "memopt", "none/cpu", "bits/torch", "bits+checkpoint/torch", "bits/cpu", "bits+checkpoint/cpu"]


def resident() -> dict[str, int]:
    """Resident set of this process now and at its highest (``/proc/self/status``, bytes)."""
    out = {"current": 0, "peak": 0}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["current" if key == "VmRSS" else "peak"] = int(rest.split()[0]) * 1024
    return out


def reset_resident_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux 4.0+: VmHWM starts again from VmRSS
        f.write("5")


# --------------------------------------------------------------------------- child process
def _sew_resnet18(num_classes: int, ours: bool):
    """SpikingJelly's SEW-ResNet18 (ADD), multi-step, LIF with ATan, on 2-channel events; its LIF
    SpikingJelly's own (``ours=False``) or our subclass, as ``model=sj/...`` builds it (the same
    arithmetic, fast kernel off: SpikingJelly's path)."""
    import torch
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    from spikingjelly.activation_based.model import sew_resnet

    from i2e_train.models.lif import LIFNode

    lif = functools.partial(LIFNode, fast=False) if ours else neuron.LIFNode
    net = sew_resnet.sew_resnet18(num_classes=num_classes, cnf="ADD", spiking_neuron=lif,
                                  surrogate_function=surrogate.ATan(), detach_reset=True)  # fmt: skip
    net.conv1 = layer.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    functional.set_step_mode(net, "m")

    class Mean(torch.nn.Module):  # [T, B, classes] -> [B, classes], states reset around each call
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            functional.reset_net(self.net)
            try:
                return self.net(x).mean(0)
            finally:
                functional.reset_net(self.net)

    return Mean()


def _build(spec: dict, variant: str, device, x):
    """A fresh network for ``variant`` from the same seed (same initial weights)."""
    import torch

    torch.manual_seed(0)
    if spec["arch"] == "sew_resnet18":
        model = _sew_resnet18(10, ours=variant not in ("official", "memopt"))
    else:
        from i2e_train.models import create_model

        model = create_model(spec["arch"], num_classes=10)
    model = model.to(device)
    if variant == "today":
        from i2e_train.module import SNNClassifier

        module = SNNClassifier(model, num_classes=10)
        module.configure_model()  # its fast kernels and memory mode, as a run sets them
        return module.model
    if variant == "memopt":
        from spikingjelly.activation_based import memopt

        blocks = {type(m) for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")}
        probe = x[:, :2]  # a representative forward (binary block inputs are found and compressed)
        return memopt.optimize_memory(model, tuple(blocks), lambda m: m(probe), level=1)
    from i2e_train.models.layers import set_fast_kernels
    from i2e_train.models.memory import set_memory

    mode, _, path = variant.partition("/")
    set_fast_kernels(model, path == "cpu")
    set_memory(model, "none" if variant == "official" else mode)
    return model


def _path(variant: str):
    """The context a variant runs in: the tensor-operation path forced on CPU for ``/torch``."""
    from contextlib import nullcontext

    from i2e_train.models import bitpack

    class Forced:
        def __enter__(self):
            bitpack.FORCE_TORCH = True

        def __exit__(self, *exc):
            bitpack.FORCE_TORCH = False

    return Forced() if variant.endswith("/torch") else nullcontext()


def _child(spec: dict) -> dict:
    """Train ``spec['variants']`` side by side for ``spec['steps']`` SGD steps in this process:
    peak growth, median step times (first step left out) and every loss."""
    import time

    import torch

    sys.path.insert(0, spec.get("tree") or str(ROOT))
    device = torch.device(spec["device"])
    gen = torch.Generator().manual_seed(0)
    t, b, hw = spec["t"], spec["batch"], spec["size"]
    x = (torch.rand(t, b, 2, hw, hw, generator=gen) < 0.1).float().to(device)  # [T, B, 2, H, W]
    y = torch.randint(0, 10, (b,), generator=gen).to(device)
    warm = {v: _build(dict(spec, arch="ms_resnet_tiny" if spec["arch"] != "sew_resnet18" else spec["arch"]), v, device, x)
            for v in spec["variants"]}  # fmt: skip
    for v, m in warm.items():  # every library and kernel of the variant loaded before the reference
        with _path(v):
            torch.nn.functional.cross_entropy(m(x[:, :2, :, : hw // 2, : hw // 2]), y[:2]).backward()
    del warm
    steps = {}
    for v in spec["variants"]:
        model = _build(spec, v, device, x)
        steps[v] = (model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_resident_peak()
    base = resident()["current"]
    names = list(steps)
    sec: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for i in range(spec["steps"]):
        for n in names[i % len(names):] + names[: i % len(names)]:
            model, opt = steps[n]
            t0 = time.perf_counter()
            with _path(n):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            losses[n].append(loss.item())
            sec[n].append(time.perf_counter() - t0)
    out = {"peak_mib": (resident()["peak"] - base) / 2**20, "losses": losses,
           "sec": {n: statistics.median(s[1:] or s) for n, s in sec.items()}}  # fmt: skip
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if spec.get("kept"):
        out.update(_kept(spec, names[0], device, x, y))
    return out


def _kept(spec: dict, variant: str, device, x, y) -> dict:
    """Bytes kept for the backward by one forward of a fresh ``variant``, fp32 and bf16 autocast."""
    import torch

    from i2e_train.models.recompute import kept_bytes

    out = {}
    for name, dtype in (("kept_fp32_mib", None), ("kept_bf16_mib", torch.bfloat16)):
        model = _build(spec, variant, device, x)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        with _path(variant), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out[name] = kept_bytes(lambda: torch.nn.functional.cross_entropy(model(x), y), params) / 2**20
    return out


def run_child(spec: dict, mmap_threshold: int | None, preload: str | None = None) -> dict:
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env=env)
    if out.returncode:
        raise RuntimeError(f"benchmark child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurements
def _spec(args, arch: str, variants: list[str], steps: int, **extra) -> dict:
    return {"arch": arch, "t": args.t, "size": args.size, "batch": args.batch, "variants": variants, "steps": steps,
            "device": args.device, **extra}  # fmt: skip


def memory_rows(args, arch: str) -> list[dict]:
    """One fresh process per variant: peak growth, kept bytes, losses."""
    rows = []
    for v in args.variants:
        if arch == "sew_resnet18" and v.endswith("/cpu"):
            continue  # the CPU layer is the model zoo's
        extra = {"tree": str(Path(args.today).resolve())} if v == "today" else {}
        kept = args.kept and v not in ("memopt", "today")
        r = run_child(_spec(args, arch, [v], args.steps, kept=kept, **extra), args.mmap_threshold)
        rows.append({"arch": arch, "variant": v, **r})
    ref = {r["variant"]: r for r in rows}
    for r in rows:
        r["x_official"] = r["peak_mib"] / ref["official"]["peak_mib"]
        if "memopt" in ref:
            r["x_memopt"] = r["peak_mib"] / ref["memopt"]["peak_mib"]
        same_path = ref["official"] if not r["variant"].endswith("/cpu") else ref.get("none/cpu", ref["official"])
        r["losses_identical"] = list(r["losses"].values()) == list(same_path["losses"].values())
    return rows


def time_rows(args, arch: str) -> list[dict]:
    """Step times of the timed variants side by side, ratios to the first one per process."""
    names = args.time_variants
    extra = {"tree": None}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    secs: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        spec = _spec(args, arch, names, args.time_steps + 1, **extra)
        if "today" in names:  # one process per tree: the reference runs in both
            a = run_child(dict(spec, variants=["today"], tree=str(Path(args.today).resolve())), args.mmap_threshold)
            b = run_child(dict(spec, variants=[n for n in names if n != "today"]), args.mmap_threshold)
            res = {**a["sec"], **b["sec"]}
        else:
            res = run_child(spec, args.mmap_threshold)["sec"]
        for n in names:
            secs[n].append(res[n])
            ratios[n].append(res[n] / res[names[0]])
    return [{"arch": arch, "variant": n, "sec": statistics.median(secs[n]), "x_first": statistics.median(ratios[n]),
             "secs": secs[n]} for n in names]  # fmt: skip


def allocator_rows(args, arch: str) -> list[dict]:
    """The default on CPU (``bits/cpu``) under each host allocator setting: the resident peak."""
    settings = [("glibc malloc, default settings", 0, None), ("glibc, MALLOC_MMAP_THRESHOLD_=131072", 131072, None)]
    settings += [(f"LD_PRELOAD={lib}", 0, lib) for lib in args.preload]
    rows = []
    for label, threshold, lib in settings:
        peaks = [run_child(_spec(args, arch, ["bits/cpu"], args.steps), threshold, lib)["peak_mib"] for _ in range(args.repeats)]
        rows.append({"arch": arch, "allocator": label, "peak_mib": statistics.median(peaks), "peaks": peaks})
    return rows


def print_memory(rows: list[dict]) -> None:
    print(f"\n{'network':<14}{'variant':<24}{'peak MiB':>9}{'x official':>11}{'x memopt':>9}{'kept fp32':>10}"
          f"{'kept bf16':>10}  losses")  # fmt: skip
    for r in rows:
        cuda = f"  (cuda {r['cuda_peak_mib']:.0f} MiB)" if "cuda_peak_mib" in r else ""
        kept = "".join(f"{r[k]:>10.1f}" if k in r else f"{'-':>10}" for k in ("kept_fp32_mib", "kept_bf16_mib"))
        print(f"{r['arch']:<14}{r['variant']:<24}{r['peak_mib']:>9.0f}{r['x_official']:>10.2f}x"
              f"{r.get('x_memopt', float('nan')):>8.2f}x{kept}  {'identical' if r['losses_identical'] else 'DIFFERENT'}{cuda}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="ms_resnet_tiny, 32x32, T=2, batch 2")
    ap.add_argument("--archs", nargs="+", default=["ms_resnet18", "sew_resnet18"], choices=list(NETS))
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--time-variants", nargs="+", default=["bits/cpu", "none/cpu", "bits/torch"])
    ap.add_argument("--today", default=None, help="another checkout: its default is the variant 'today'")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--t", type=int, default=8, help="time steps T")
    ap.add_argument("--steps", type=int, default=3, help="SGD steps per memory process")
    ap.add_argument("--time-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="+", choices=["memory", "time", "allocators"], default=["memory"])
    ap.add_argument("--preload", nargs="*", default=[], help="allocator libraries to LD_PRELOAD (part 'allocators')")
    ap.add_argument("--mmap-threshold", type=int, default=131072, help="MALLOC_MMAP_THRESHOLD_ of the children (0: unset)")
    ap.add_argument("--no-kept", dest="kept", action="store_false", help="skip the kept-bytes count")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return {}
    if args.quick:
        args.archs, args.size, args.t, args.batch, args.steps, args.time_steps, args.repeats = (
            ["ms_resnet_tiny", "sew_resnet18"], 32, 2, 2, 2, 2, 1)  # fmt: skip
    if args.today:
        args.variants = [*args.variants, "today"]
        args.time_variants = ["today", *args.time_variants]
    result: dict = {"args": vars(args), "memory": [], "time": [], "allocators": []}
    print(f"T={args.t}, {args.size}x{args.size}, batch {args.batch}, {args.steps} SGD steps, device {args.device}, "
          f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'unset'}")  # fmt: skip
    for arch in args.archs:
        if "memory" in args.parts:
            result["memory"] += memory_rows(args, arch)
        if "time" in args.parts and arch != "sew_resnet18":
            result["time"] += time_rows(args, arch)
        if "allocators" in args.parts and arch != "sew_resnet18":
            result["allocators"] += allocator_rows(args, arch)
    if result["memory"]:
        print_memory(result["memory"])
    for r in result["time"]:
        print(f"{r['arch']:<14}{r['variant']:<24} step {r['sec']:.3f} s  x{r['x_first']:.3f} of {args.time_variants[0]}")
    for r in result["allocators"]:
        print(f"{r['arch']:<14}bits/cpu  {r['allocator']:<60} resident peak {r['peak_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
