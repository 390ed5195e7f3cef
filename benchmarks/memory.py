"""Training memory and step cost of the memory modes, against the official model and SpikingJelly's memopt.

    python benchmarks/memory.py                          # MS-ResNet18 and SEW-ResNet18, T=8, 64x64, batch 16
    python benchmarks/memory.py --quick                  # a tiny run (seconds): the same code paths
    python benchmarks/memory.py --chart docs/img/memory.png      # also the peak-by-category chart
    python benchmarks/memory.py --parts time --today ../main     # CPU step time beside another checkout's default
    python benchmarks/memory.py --recipes                # predicted GPU peak of every paper recipe, per mode

Variants of each network (same batch, same initial weights; every loss checked identical):
- ``official``: the plain torch.nn + SpikingJelly network (SpikingJelly's own LIF);
- ``memopt``: ``official`` through SpikingJelly 2.0's ``memopt.optimize_memory(level=1)`` (its
  residual blocks checkpointed, binary block inputs compressed; levels 2-4 search on CUDA only);
- ``none`` / ``bits`` / ``recompute`` / ``least``: our network in that memory mode
  (:mod:`i2e_train.models.memory`).

Everything runs the tensor-operation path a GPU runs (``I2E_CPU_KERNELS=0``), on CPU, one fresh
process per variant, with SpikingJelly's LIF as on CUDA: its registered operators
(``torch.ops.sj_lif``) with the autograd SpikingJelly registers for CUDA (it keeps the charged
membrane, the input and the initial membrane), the forward writing its outputs step by step as
the CUDA kernel does (the CPU reference builds per-step lists first). Measures, all deterministic:

- **exact peak**: the peak of live bytes of one SGD step (momentum; after one warm-up step, so
  the optimiser state exists) from PyTorch's profiler (``profile_memory=True``): every allocation
  and free of the CPU allocator in order, what ``torch.cuda.max_memory_allocated`` counts on a
  GPU; by category at the peak (parameters, optimiser state, gradients, input, activations and
  temporaries). Kernel workspaces are CPU ones (oneDNN's), not cuDNN's.
- **predicted**: the dry run of :func:`i2e_train.models.memory_plan.predict_peaks` (fake
  tensors, no allocation), what ``memory=auto`` decides on;
- **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products),
  **bytes moved** (the tensors every non-view ATen operator reads and writes, a fused neuron
  operator counted as the one kernel it is on a GPU) and **ATen ops** (a proxy for kernel launches).
- ``rss`` (secondary): growth of the resident set over one unprofiled step, with
  ``MALLOC_MMAP_THRESHOLD_=131072`` (freed blocks go back to the system).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETS = {"ms_resnet18": "MS-ResNet18", "sew_resnet18": "SEW-ResNet18 (SpikingJelly)", "ms_resnet_tiny": "MS-ResNet tiny"}
VARIANTS = ["official", "memopt", "none", "bits", "recompute", "least"]
OURS = ("none", "bits", "recompute", "least")
CATEGORIES = ("parameters", "optimizer state", "gradients", "input", "activations and temporaries")


# --------------------------------------------------------------------------- child process: the network
def _sew_resnet18(ours: bool):
    """SpikingJelly's SEW-ResNet18 (ADD), multi-step, LIF with ATan, on 2-channel events, its LIF
    SpikingJelly's (``ours=False``) or ours (as ``model=sj/...`` builds it); logits are the mean over T."""
    import torch
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    from spikingjelly.activation_based.model import sew_resnet

    from i2e_train.models.lif import LIFNode

    net = sew_resnet.sew_resnet18(num_classes=10, cnf="ADD", spiking_neuron=LIFNode if ours else neuron.LIFNode,
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

    return Mean(), (sew_resnet.BasicBlock, sew_resnet.Bottleneck)


def build(arch: str, variant: str, x):
    """A fresh network for ``variant`` from seed 0 (the same initial weights for every variant)."""
    import torch

    from i2e_train.models.memory import set_memory

    torch.manual_seed(0)
    if arch == "sew_resnet18":
        model, blocks = _sew_resnet18(ours=variant in OURS)
    else:
        from i2e_train.models import create_model
        from i2e_train.models.ms_resnet import BasicBlock, Bottleneck

        model, blocks = create_model(arch, num_classes=10), (BasicBlock, Bottleneck)
        if variant not in OURS:
            from i2e_train.models.lif import with_spikingjelly_neurons

            with_spikingjelly_neurons(model)
    if variant == "memopt":
        from spikingjelly.activation_based import memopt

        return memopt.optimize_memory(model, blocks, lambda m: m(x[:, :2]), level=1)
    if variant in OURS:
        set_memory(model, variant)
    return model


def sj_lif_as_on_cuda():
    """SpikingJelly's LIF operator on CPU with the memory behaviour it has on CUDA (see the module
    docstring). Only ever installed in this benchmark's child processes."""
    import spikingjelly._ops.lif  # noqa: F401  (registers torch.ops.sj_lif)
    import torch

    class Autograd(torch.autograd.Function):  # what spikingjelly._ops.lif.autograd registers for CUDA
        @staticmethod
        def forward(ctx, x, v, *params):
            with torch._C._AutoDispatchBelowAutograd():
                out = torch.ops.sj_lif.forward(x, v, *params)
            ctx.save_for_backward(out[2], x, v)
            ctx.params = params
            ctx.mark_non_differentiable(out[2])
            return out

        @staticmethod
        def backward(ctx, gs, gv, gh):
            h, x, _ = ctx.saved_tensors  # the input and initial membrane are kept as on CUDA, not read
            gs = torch.zeros_like(h, dtype=x.dtype) if gs is None else gs
            gv = torch.zeros_like(h if ctx.params[-2] else h[0]) if gv is None else gv
            with torch._C._AutoDispatchBelowAutograd():
                gx, gv0 = torch.ops.sj_lif.backward(gs, gv, h, *ctx.params)
            return (gx, gv0) + (None,) * len(ctx.params)

    def forward(x, v, tau, decay_input, threshold, reset, detach_reset, alpha, store_v_seq=True, surrogate_id=0):
        # spikingjelly._ops.lif.reference._forward_impl's arithmetic, its outputs written in place step by step
        spikes = torch.empty_like(x, memory_format=torch.contiguous_format)
        charged = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        volts = torch.empty(x.shape, dtype=torch.float32, device=x.device) if store_v_seq else None
        r = 0.0 if reset is None else reset
        for t in range(x.shape[0]):
            cur = x[t].float()
            h = v + (cur - (v - r)) / tau if decay_input else v - (v - r) / tau + cur
            spike = (h >= threshold).to(torch.float32)
            v = h - spike * threshold if reset is None else spike * reset + (1 - spike) * h
            spikes[t], charged[t] = spike, h
            if store_v_seq:
                volts[t] = v
        return spikes, (volts if store_v_seq else v.contiguous()), charged

    lib = torch.library.Library("sj_lif", "IMPL")
    lib.impl("forward", lambda x, v, *p: Autograd.apply(x, v, *p), "AutogradCPU")
    lib.impl("forward", forward, "CPU")
    return lib


# --------------------------------------------------------------------------- child process: the measures
def exact_peak(step, resident, named) -> tuple[int, dict[str, int]]:
    """Peak of live bytes of ``step()`` from the profiler's allocation events, and by category at the
    peak. ``resident()``: the tensors alive before the step; ``named()``: category -> data pointers."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())  # every recorded event
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, len(events), e.typed[1].ptr, e.typed[1].alloc_size))
    events.sort()
    born = {ptr for _, _, ptr, size in events if size > 0}
    live: dict[int, int] = {}
    for t in resident():  # alive before the step: counted from the start unless the step frees and makes them
        st = t.untyped_storage()
        if st.data_ptr() not in born:
            live.setdefault(st.data_ptr(), st.nbytes())
    seen: set[int] = set()
    for _, _, ptr, size in events:  # freed in the step without being made in it: alive at its start
        if size < 0 and ptr not in seen:
            live.setdefault(ptr, -size)
        seen.add(ptr)
    total = peak = sum(live.values())
    snapshot = dict(live)
    for _, _, ptr, size in events:
        if size > 0:
            live[ptr] = size
            total += size
            if total > peak:
                peak, snapshot = total, dict(live)
        else:
            total -= live.pop(ptr, -size)
    groups = named()
    by_category = dict.fromkeys(CATEGORIES, 0)
    for ptr, n in snapshot.items():
        by_category[next((k for k, ptrs in groups.items() if ptr in ptrs), CATEGORIES[-1])] += n
    return peak, by_category


def step_cost(step) -> tuple[int, int, int]:
    """(FLOPs, bytes moved, ATen ops) of ``step()``."""
    import torch
    import torch.utils._pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    no_data = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
               aten.new_empty_strided.default}  # fmt: skip

    class Traffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            if func not in no_data and not view:
                self.ops += 1
                seen = set()
                for t in pytree.tree_leaves((args, kwargs, out)):
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        self.bytes += t.numel() * t.element_size()
            return out

    traffic = Traffic()
    with FlopCounterMode(display=False) as flops, traffic:
        step()
    return flops.get_total_flops(), traffic.bytes, traffic.ops


def _resident_set() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _child(spec: dict) -> dict:
    """Measure one variant (this process: fresh, I2E_CPU_KERNELS=0)."""
    sys.path.insert(0, spec.get("tree") or str(ROOT))
    import torch

    lib = sj_lif_as_on_cuda()  # the registrations live as long as the library object
    gen = torch.Generator().manual_seed(0)
    t, b, hw = spec["t"], spec["batch"], spec["size"]
    x = (torch.rand(t, b, 2, hw, hw, generator=gen) < 0.1).float()  # [T, B, 2, H, W]
    y = torch.randint(0, 10, (b,), generator=gen)
    model = build(spec["arch"], spec["variant"], x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses: list[float] = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    def state():
        return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]

    def named():
        ps = list(model.parameters())
        return {"parameters": {p.data_ptr() for p in ps}, "optimizer state": {v.data_ptr() for v in state()},
                "gradients": {p.grad.data_ptr() for p in ps if p.grad is not None},
                "input": {x.data_ptr(), y.data_ptr()}}  # fmt: skip

    step()  # warm-up: the optimiser state exists, libraries are loaded
    with open("/proc/self/clear_refs", "w") as f:  # Linux 4.0+: VmHWM starts again from VmRSS
        f.write("5")
    before = _resident_set()["VmRSS"]
    step()
    rss = _resident_set()["VmHWM"] - before
    peak, by_category = exact_peak(step, lambda: [*model.parameters(), *model.buffers(), *state(), x, y], named)
    flops, moved, ops = step_cost(step)
    out = {"peak": peak, "by_category": by_category, "flops": flops, "bytes": moved, "ops": ops, "rss": rss,
           "losses": losses}  # fmt: skip
    del lib
    if spec["variant"] in OURS:
        from i2e_train.models.memory_plan import predict_peaks

        fresh = build(spec["arch"], "none", x)
        optimizer = functools.partial(_sgd, torch.optim.SGD)
        out["predicted"] = predict_peaks(fresh, x.shape, modes=[spec["variant"]], optimizer=optimizer)[spec["variant"]]
    return out


def _sgd(cls, net):
    return cls(net.parameters(), lr=0.1, momentum=0.9)


def run_child(spec: dict, timeout: float = 3600) -> dict:
    env = dict(os.environ, I2E_CPU_KERNELS="0", MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the tables
def memory_rows(args, arch: str) -> list[dict]:
    rows = []
    for v in args.variants:
        spec = {"arch": arch, "variant": v, "t": args.t, "size": args.size, "batch": args.batch}
        rows.append({"arch": arch, "variant": v, **run_child(spec)})
    ref = {r["variant"]: r for r in rows}
    for r in rows:
        base = ref.get("official", rows[0])
        r["x_memopt"] = r["peak"] / ref["memopt"]["peak"] if "memopt" in ref else None
        r["x_flops"], r["x_bytes"], r["x_ops"] = (r[k] / base[k] for k in ("flops", "bytes", "ops"))
        r["losses_identical"] = r["losses"] == base["losses"]
    return rows


def print_memory(rows: list[dict]) -> None:
    mib = 2**20
    print(f"\n{'network':<14}{'variant':<11}{'peak MiB':>9}{'x memopt':>9}{'predicted':>10}{'FLOPs':>7}{'bytes':>7}"
          f"{'ops':>7}{'rss MiB':>8}  activations+temporaries at peak, losses")  # fmt: skip
    for r in rows:
        memopt = f"{r['x_memopt']:>8.2f}x" if r["x_memopt"] is not None else f"{'-':>9}"
        pred = f"{r['predicted'] / mib:>10.1f}" if "predicted" in r else f"{'-':>10}"
        print(f"{r['arch']:<14}{r['variant']:<11}{r['peak'] / mib:>9.1f}{memopt}{pred}{r['x_flops']:>6.2f}x"
              f"{r['x_bytes']:>6.2f}x{r['x_ops']:>6.2f}x{r['rss'] / mib:>8.0f}  "
              f"{r['by_category'][CATEGORIES[-1]] / mib:.1f}, {'identical' if r['losses_identical'] else 'DIFFERENT'}")  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """The table of docs/memory.md (MiB; ratios to the official network and to memopt)."""
    mib = 2**20
    lines = [("| network | mode | exact peak MiB | x official | x memopt | predicted MiB | FLOPs | bytes moved | ATen ops "
              "| activations + temporaries at the peak, MiB |"), "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        official = next(o for o in rows if o["arch"] == r["arch"] and o["variant"] == "official")
        pred = f"{r['predicted'] / mib:.1f}" if "predicted" in r else "-"
        memopt = f"{r['x_memopt']:.2f}" if r.get("x_memopt") is not None else "-"
        lines.append(f"| {NETS[r['arch']]} | `{r['variant']}` | {r['peak'] / mib:.1f} | {r['peak'] / official['peak']:.2f} "
                     f"| {memopt} | {pred} | {r['x_flops']:.2f}x | {r['x_bytes']:.2f}x | {r['x_ops']:.2f}x "
                     f"| {r['by_category'][CATEGORIES[-1]] / mib:.1f} |")  # fmt: skip
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    """A stacked bar per variant: the exact peak by category (one panel per network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#937860", "#8c8c8c", "#c44e52"]
    for ax, arch in zip(axes[0], archs):
        mine = [r for r in rows if r["arch"] == arch]
        bottom = [0.0] * len(mine)
        for cat, color in zip(CATEGORIES, colors):
            values = [r["by_category"][cat] / 2**20 for r in mine]
            ax.bar([r["variant"] for r in mine], values, bottom=bottom, color=color, label=cat)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, r in enumerate(mine):
            ax.text(i, bottom[i], f"{r['peak'] / 2**20:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(NETS[arch], fontsize=10)
        ax.set_ylabel("exact peak, MiB")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(CATEGORIES), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the paper's recipes
def recipe_rows() -> list[dict]:
    """Per paper experiment at its real shape (network, T, resolution, batch per GPU, precision,
    optimiser): the predicted peak of every memory mode (:func:`~i2e_train.models.memory_plan.predict_peaks`)."""
    from hydra.utils import instantiate

    from i2e_train.config import compose, config_dir
    from i2e_train.models.memory_plan import LADDER, predict_peaks

    rows = []
    for path in sorted((config_dir() / "experiment").rglob("*.yaml")):
        name = path.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
        if name == "demo":
            continue
        cfg = compose("train", [f"experiment={name}"])
        devices = int(cfg.trainer.get("devices") or 1) if str(cfg.trainer.get("devices", 1)).isdigit() else 1
        batch = int(cfg.data.batch_size) // devices
        h, w = (list(cfg.data.resolution) * 2)[:2] if not isinstance(cfg.data.resolution, int) else [cfg.data.resolution] * 2
        shape = (int(cfg.data.timesteps), batch, 2, int(h), int(w))
        model = instantiate(cfg.model)
        peaks = predict_peaks(model, shape, modes=LADDER, optimizer=instantiate(cfg.optim),
                              precision=str(cfg.trainer.precision))  # fmt: skip
        rows.append({"experiment": name, "model": str(cfg.model.get("name", "")) or type(model).__name__,
                     "shape": shape, "devices": devices, "precision": str(cfg.trainer.precision), "peaks": peaks})  # fmt: skip
        print(f"{name:<28}{shape!s:<26}{cfg.trainer.precision:<11}" +
              "".join(f"{m} {p / 2**30:6.2f} GiB  " for m, p in peaks.items()), flush=True)  # fmt: skip
    return rows


def recipe_table(rows: list[dict]) -> str:
    """The markdown table of docs/recipes.md."""
    head = "| experiment | network | T, batch per GPU, H x W | precision | " + " | ".join(f"`{m}`" for m in rows[0]["peaks"])
    lines = [head + " |", "|" + "---|" * (4 + len(rows[0]["peaks"]))]
    for r in rows:
        t, b, _, h, w = r["shape"]
        peaks = " | ".join(f"{p / 2**30:.2f}" for p in r["peaks"].values())
        lines.append(f"| `{r['experiment']}` | {r['model']} | {t}, {b}, {h}x{w} | {r['precision']} | {peaks} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CPU step time
def _time_child(spec: dict) -> dict:
    """Median CPU step time of ``spec['variants']`` stepped in turn (compiled CPU kernels on)."""
    sys.path.insert(0, spec.get("tree") or str(ROOT))
    import torch

    from i2e_train.models import create_model
    from i2e_train.module import SNNClassifier

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(spec["t"], spec["batch"], 2, spec["size"], spec["size"], generator=gen) < 0.1).float()
    y = torch.randint(0, 10, (spec["batch"],), generator=gen)
    steps = {}
    for v in spec["variants"]:
        torch.manual_seed(0)
        module = SNNClassifier(create_model(spec["arch"], num_classes=10), num_classes=10,
                               **({} if v == "default" else {"memory": v}))  # fmt: skip
        module.configure_model()  # its fast kernels and memory mode, as a run sets them
        steps[v] = (module.model, torch.optim.SGD(module.model.parameters(), lr=0.1, momentum=0.9))
    sec: dict[str, list[float]] = {v: [] for v in steps}
    names = list(steps)
    for i in range(spec["steps"] + 1):
        for v in names[i % len(names):] + names[: i % len(names)]:
            model, opt = steps[v]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if i:  # the first step of each variant is not timed
                sec[v].append(time.perf_counter() - t0)
    return {v: statistics.median(s) for v, s in sec.items()}


def time_rows(args, arch: str) -> list[dict]:
    """The default's CPU step time here and (``--today``) in another checkout, fresh processes
    alternating; the ratio per pair of processes, the median over ``--repeats`` pairs."""
    spec = {"arch": arch, "t": args.t, "size": args.size, "batch": args.batch, "steps": args.time_steps,
            "variants": ["default"]}  # fmt: skip
    here, there = [], []
    for _ in range(args.repeats):
        for tree, out in ((None, here), (args.today, there)):
            if tree is None or args.today:
                env = dict(os.environ, PYTHONWARNINGS="ignore")
                s = dict(spec, tree=str(Path(tree).resolve()) if tree else None, mode="time")
                res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(s)],
                                     capture_output=True, text=True, timeout=7200, env=env, check=False)  # fmt: skip
                if res.returncode:
                    raise RuntimeError(res.stderr[-3000:])
                out.append(json.loads(res.stdout.strip().splitlines()[-1])["default"])
    rows = [{"arch": arch, "tree": "this checkout", "sec": statistics.median(here), "secs": here}]
    if there:
        rows.append({"arch": arch, "tree": str(args.today), "sec": statistics.median(there), "secs": there,
                     "ratios": [a / b for a, b in zip(here, there)]})  # fmt: skip
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="ms_resnet_tiny, 32x32, T=2, batch 2")
    ap.add_argument("--archs", nargs="+", default=["ms_resnet18", "sew_resnet18"], choices=list(NETS))
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--t", type=int, default=8, help="time steps T")
    ap.add_argument("--parts", nargs="+", choices=["memory", "time"], default=["memory"])
    ap.add_argument("--today", default=None, help="another checkout: its default's CPU step time beside ours")
    ap.add_argument("--time-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chart", default=None, help="write the peak-by-category chart (PNG) here")
    ap.add_argument("--recipes", action="store_true", help="predicted peaks of every paper recipe, per mode (GiB)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_time_child(spec) if spec.get("mode") == "time" else _child(spec)))
        return {}
    if args.recipes:
        rows = recipe_rows()
        print(recipe_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return {"recipes": rows}
    if args.quick:
        args.archs, args.size, args.t, args.batch, args.time_steps, args.repeats = ["ms_resnet_tiny"], 32, 2, 2, 2, 1
    result: dict = {"args": vars(args), "memory": [], "time": []}
    print(f"T={args.t}, {args.size}x{args.size}, batch {args.batch}, SGD with momentum, the GPU path on CPU")
    for arch in args.archs:
        if "memory" in args.parts:
            result["memory"] += memory_rows(args, arch)
        if "time" in args.parts and arch != "sew_resnet18":
            result["time"] += time_rows(args, arch)
    if result["memory"]:
        print_memory(result["memory"])
        print("\n" + markdown_table(result["memory"]))
        if args.chart:
            chart(result["memory"], Path(args.chart))
    for r in result["time"]:
        ratio = f"  ratio per pair {[f'{q:.3f}' for q in r['ratios']]}" if "ratios" in r else ""
        print(f"{r['arch']:<14}{r['tree']:<40} step {r['sec']:.3f} s{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
