"""One prepared check of every CUDA path, with a reduced CPU form that CI runs.

    bash benchmarks/gpu_check.sh                   # GPU machine: install (README lines), then this
    python benchmarks/gpu_check.py                 # the same checks in the current environment
    python benchmarks/gpu_check.py --cpu           # the CPU form: small sizes, CUDA items skipped
    python benchmarks/gpu_check.py --only convert,train_run

Parts, in this order (``--only`` picks some):

  convert        converter in eval mode == the official algorithm (float32 conv2d, run on the CPU)
                 bit for bit on the scikit-learn photographs, all six order presets, float32 /
                 bool / packed output; train mode: fused kernel == tensor path; time per image at
                 224x224 and 128x128 (batch 256, CUDA events, medians) against the paper's ~0.1 ms
                 and our 0.01 ms goal
  loader         packed bytes to the device and unpacked there (I2E-CIFAR10 size), samples/s
  train_step     MS-ResNet18, T=8, 128x128, batch 64: official-equivalent (torch.nn + SpikingJelly
                 LIF, fp16 AMP) vs our default path, + bf16, + channels_last: img/s, peak memory,
                 whether the first losses agree
  train_run      100 steps of ``experiment=cifar10/baseline2 trainer=gpu`` on generated 32x32
                 images (online I2E on the device): it runs, the loss falls, no host
                 synchronisation per step (``torch.cuda.set_sync_debug_mode``)
  gpu_tests      ``pytest -m gpu``: one row per test (CUDA only)
  train_compile  the training step through torch.compile (CUDA only; last: the slowest to build)

With CUDA every part runs in its own process with its own time cap (a crash, a hang or a sticky
CUDA error stays in its part) inside a global budget (``--budget``, 450 s). Every check that
fails is a FAILED row with its error and the run goes on; the exit status is 1 when a row
FAILED. Output: the markdown table on stdout and in ``<out>/gpu_check.md``, every row with its
numbers in ``<out>/gpu_check.json``, the parts' own output in ``<out>/gpu_check.log``, the GPU
tests' JUnit XML (tracebacks included) in ``<out>/gpu_tests.xml``.

Time on one H200 (estimated from the work, not measured: written without a GPU). convert: the
fused kernel built by inductor for 2 output types x 2 sizes (10-30 s each on first use), then
4 x 2 x 33 timed calls of at most a few ms (256 images of 224x224: 0.8 GB of float32 events,
about 0.3 ms at 3-4 TB/s). loader: a 4,096-row parquet made on the CPU (seconds), read twice.
train_step: SpikingJelly's Triton kernels built once, then 4 x 13 steps of about 2 TFLOP
(MS-ResNet18 at 128x128 is ~0.6 GMAC per image and time step, x 512 x 3 for forward and
backward), tens of ms each in fp16. train_run: 12,800 PNG images made, set-up, 100 steps and two
validation passes, about a minute. gpu_tests: 20 tests dominated by kernel builds and the DDP
run in a subprocess, one to two minutes. train_compile: torch.compile of the whole network,
forward and backward, one to two minutes. Expected in all: 4-6 minutes. The caps (150, 60, 120,
150, 200, 150 s) bound a part that hangs and add up to more than the budget on purpose: the
budget (450 s, plus a few seconds of start-up and report) bounds the whole, so it stays under 8
minutes; what would start with less than 30 s left is skipped.

Without CUDA (or with ``--cpu``) the same parts run in this process, on one thread, at small
sizes (batch 4 conversions, ``ms_resnet_tiny`` at 32x32, 20 training steps); CUDA-only items
are rows "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if "--cpu" in sys.argv[1:]:  # one thread, set before torch and numba start theirs (see Context.create)
    for _var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
# Everything the check reads is made locally: no hub look-ups (a machine without network would wait
# on them), no wandb.
for _var, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline")):
    os.environ.setdefault(_var, _value)
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gpu_check_parts as parts  # noqa: E402
from gpu_check_parts import Context, row  # noqa: E402

# name -> ("module:function", time cap in seconds with CUDA, runs without CUDA)
PARTS = {
    "convert": ("gpu_check_parts:part_convert", 150, True),
    "loader": ("gpu_check_parts:part_loader", 60, True),
    "train_step": ("gpu_check_parts:part_train_step", 120, True),
    "train_run": ("gpu_check_run:part_train_run", 150, True),
    "gpu_tests": ("gpu_check_parts:part_gpu_tests", 200, False),
    "train_compile": ("gpu_check_parts:part_train_compile", 150, False),
}
MIN_START_S = 30  # a part that would get less than this is skipped (time budget)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU form: CPU only, small sizes (what CI runs)")
    ap.add_argument("--quick", action="store_true", help="small sizes on whatever device is used")
    ap.add_argument("--only", type=str, default=None, help=f"comma list of parts: {', '.join(PARTS)}")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT") or "gpu_check_out",
                    help="output folder (default: $OUT, else gpu_check_out)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together (CUDA)")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="one process per part (auto: with CUDA only)")
    ap.add_argument("--part", type=str, default=None, help=argparse.SUPPRESS)  # child: run one part
    ap.add_argument("--part-json", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    args.names = names
    args.out = str(Path(args.out).resolve())
    return args


def run_in_process(name: str, ctx: Context) -> list[dict]:
    """Run one part here; an exception that escapes its own checks becomes one FAILED row."""
    module, function = PARTS[name][0].split(":")
    try:
        return getattr(importlib.import_module(module), function)(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
        return [row(name, "part", f"{type(exc).__name__}: {exc}", "FAILED",
                    traceback=traceback.format_exc()[-3000:])]


def run_isolated(name: str, args: argparse.Namespace, cap: float, work: Path, log: Path) -> list[dict]:
    """Run one part in a child process (own session) killed after ``cap`` seconds."""
    out = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-json", str(out),
           "--cap", str(cap), "--work", str(work), "--out", args.out]
    cmd += ["--cpu"] if args.cpu else []
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as fh:
        fh.write(f"\n===== part {name} (cap {cap:.0f} s) =====\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started
            proc.wait()
            return _read_rows(out) + [row(name, "part", f"timed out after its cap of {cap:.0f} s", "FAILED")]
    rows = _read_rows(out)
    if not rows:
        rows = [row(name, "part", f"the part's process exited with code {code} and wrote no result "
                                  f"(see gpu_check.log): {_tail(log)}", "FAILED")]
    return rows


def _read_rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _tail(path: Path, chars: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].replace("\n", " / ")
    except OSError:
        return ""


def child_main(args: argparse.Namespace) -> int:
    """``--part NAME``: run one part, write its rows to ``--part-json``."""
    ctx = Context.create(cpu=args.cpu, quick=args.quick, work=Path(args.work), out=Path(args.out),
                         deadline=time.monotonic() + (args.cap or 600.0) - 5.0)
    rows = run_in_process(args.part, ctx)
    Path(args.part_json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


def run_parts(args: argparse.Namespace, ctx: Context, log: Path) -> list[dict]:
    """Every chosen part in order, each within its cap and what is left of the budget."""
    isolate = args.isolate == "yes" or (args.isolate == "auto" and ctx.cuda)
    started = time.monotonic()
    rows: list[dict] = []
    for name in args.names:
        _, cap, on_cpu = PARTS[name]
        if not ctx.cuda and not on_cpu:
            rows.append(row(name, "part", "skipped: no CUDA", "skipped"))
            continue
        left = args.budget - (time.monotonic() - started)
        cap = min(cap if ctx.cuda else 300.0, left)
        if isolate and cap < MIN_START_S:
            rows.append(row(name, "part", f"skipped: time budget ({left:.0f} s of {args.budget:.0f} s left)",
                            "skipped"))
            continue
        t0 = time.monotonic()
        print(f"-- {name} ...", flush=True)
        if isolate:
            part_rows = run_isolated(name, args, cap, ctx.work, log)
        else:
            ctx.deadline = time.monotonic() + cap
            part_rows = run_in_process(name, ctx)
        seconds = time.monotonic() - t0
        for r in part_rows:
            r.setdefault("seconds", round(seconds, 1))
        rows += part_rows
        print(f"   {name}: {seconds:.1f} s, {sum(r['status'] == 'FAILED' for r in part_rows)} failed", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        return child_main(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context.create(cpu=args.cpu, quick=args.quick, work=Path(work), out=out, deadline=None)
        rows = [] if args.cpu else parts.cuda_setup_rows(ctx)
        if not ctx.cuda and not args.cpu:
            print("no CUDA device: running the CPU form", flush=True)
        t0 = time.monotonic()
        rows += run_parts(args, ctx, log)
        total = time.monotonic() - t0
    report = parts.report(rows, ctx, total, args)
    print("\n" + report, flush=True)
    (out / "gpu_check.md").write_text(report)
    (out / "gpu_check.json").write_text(json.dumps({"machine": parts.machine(ctx), "mode": ctx.mode,
                                                    "seconds": round(total, 1), "rows": rows}, indent=1, default=str))
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
