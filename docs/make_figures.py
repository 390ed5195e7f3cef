"""The pictures of the docs, made by i2e-train's own code (i2e_train.viz, i2e_train.plots, the
study plot of i2e_train.tasks.study):

    python docs/make_figures.py            # render every figure into docs/img/ (seconds)
    python docs/make_figures.py --run      # first run the demo and the tutorial, record them (minutes)

Rendering reads only the demo data (built on the spot) and the records in docs/img/data/: the
demo run's metrics.csv and spike_stats.json and the demo study's per-run values (runs.csv), so it
is deterministic; tests/test_docs.py renders again into a temporary folder and compares with the
committed pictures. ``--run`` makes those records anew: the demo as ``i2e-train`` runs it, and
the blocks of docs/tutorial.md, whose pictures are copied into docs/img/tutorial/ (the docs test
runs the same blocks and compares their pictures with those). The study's values are the ones
of docs/research.md (``i2e-study study=demo seeds=[0,1,2]``, a run of minutes; not redone here).

The memory chart of docs/memory.md is drawn by ``benchmarks/memory.py``'s own ``chart`` from its
record (docs/img/data/memory.json, written by ``python benchmarks/memory.py --json``: a run of
tens of minutes, not redone here).

Every PNG is stored with a palette of at most 128 colours (a few tens of KB).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
IMG = DOCS / "img"
RECORDS = IMG / "data"
TUTORIAL = DOCS / "tutorial.md"
# tutorial picture (in docs/img/tutorial/) -> the file the tutorial's blocks write it to
TUTORIAL_PICTURES = {
    "flower.png": "pictures/flower.png",
    "learning_curves.png": "runs/train/learning_curves.png",
    "confusion_matrix.png": "runs/eval/confusion_matrix.png",
    "predictions.png": "pictures/predictions.png",
}
DIGITS_SHOWN = (0, 1, 2)  # validation rows of the demo data shown beside their events
_BLOCK = re.compile(r"^<!-- docs-test: (run|continue) -->\n```python\n(.*?)^```", re.M | re.S)


def optimise_png(src: Path, dst: Path) -> Path:
    """``src`` stored at ``dst`` with a palette of at most 128 colours (deterministic)."""
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    colours = rgb.getcolors(maxcolors=128)
    small = rgb.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
        if colours is None else rgb.quantize(colors=len(colours), method=Image.Quantize.MEDIANCUT,
                                             dither=Image.Dither.NONE)
    dst.parent.mkdir(parents=True, exist_ok=True)
    small.save(dst, format="PNG", optimize=True)
    return dst


def _digit_image(index: int) -> np.ndarray:
    """The scikit-learn digit behind a demo record, preprocessed as the demo data was: RGB uint8 [32, 32, 3]."""
    from sklearn.datasets import load_digits

    from i2e_train.data.preprocess import preprocess_image

    img8 = np.clip(np.rint(load_digits().images[index] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x = preprocess_image(Image.fromarray(img8, mode="L"), (32, 32), f"digit {index}", "pil_bicubic")
    return x.permute(1, 2, 0).numpy()


def digits_figure(out: Path, work: Path) -> Path:
    """Demo validation digits, each beside its 8 event frames (ON red, OFF blue, both white): the
    records of the demo data as i2e-viz renders them, one strip per digit, stacked."""
    from i2e_train.data.digits import build_digits
    from i2e_train.viz import as_events, load_row, render

    root = build_digits(work / "i2e-digits")
    strips = []
    for i in DIGITS_SHOWN:
        row = load_row(root, "I2E-Digits", split="validation", index=i)
        index = int(Path(row["file_path"]).stem)  # "<label>/<index in load_digits>.npy"
        files = render(as_events(row), work / "strips", name=f"digit{i}", image=_digit_image(index), min_side=96)
        with Image.open(files.png) as im:
            strips.append(np.asarray(im.convert("RGB")))
    gap = np.full((6, strips[0].shape[1], 3), 255, np.uint8)
    stacked = np.concatenate([p for s in strips for p in (s, gap)][:-1])
    tmp = work / "digits-events.png"
    Image.fromarray(stacked).save(tmp)
    return optimise_png(tmp, out / "digits-events.png")


def demo_figures(out: Path, work: Path, records: Path = RECORDS) -> list[Path]:
    """The demo run's learning curves and firing rates per layer, from its records."""
    from i2e_train.plots import plot_learning_curves, plot_spike_rates

    curves = plot_learning_curves(records / "demo-metrics.csv", work / "curves.png", title="demo: I2E-Digits, ms_resnet_tiny")
    stats = json.loads((records / "demo-spike-stats.json").read_text())
    rates = plot_spike_rates({layer["name"]: layer["rate"] for layer in stats["layers"]}, work / "rates.png",
                             mean_rate=stats["mean_rate"],
                             title=f"demo: firing rate per layer ({stats['sops_per_sample'] / 1e6:.2f} M SOPs per digit)")
    return [optimise_png(curves, out / "demo-learning-curves.png"), optimise_png(rates, out / "demo-spike-rates.png")]


def study_records(path: Path = RECORDS / "study-demo-runs.csv") -> tuple[list[dict], list[str]]:
    """The per-run values of a study's ``runs.csv`` as the study's records, and its axes."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    axes = [c for c in rows[0] if c not in ("seed", "value")]
    return [{"cell": {a: r[a] for a in axes}, "seed": int(r["seed"]), "value": float(r["value"])} for r in rows], axes


def study_figure(out: Path, work: Path, records: Path = RECORDS) -> Path:
    from i2e_train.tasks.study import plot_runs

    runs, axes = study_records(records / "study-demo-runs.csv")
    tmp = work / "study.png"
    tmp.write_bytes(plot_runs(runs, axes, "val/top1"))
    return optimise_png(tmp, out / "study-demo.png")


def memory_records(path: Path = RECORDS / "memory.json") -> list[dict]:
    """The rows of ``benchmarks/memory.py --json`` (its memory part)."""
    return json.loads(path.read_text())["memory"]


def benchmark_module():
    """``benchmarks/memory.py`` as a module (its chart and table)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("i2e_memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def memory_figure(out: Path, work: Path, records: Path = RECORDS) -> Path:
    """The exact peak by category per memory mode (docs/memory.md), from the benchmark's record."""
    tmp = work / "memory.png"
    benchmark_module().chart(memory_records(records / "memory.json"), tmp)
    return optimise_png(tmp, out / "memory.png")


def render_all(out: Path = IMG, records: Path = RECORDS) -> list[Path]:
    """Every figure rendered from the demo data and the records (not the tutorial's: ``--run``)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        return [digits_figure(out, work), *demo_figures(out, work, records), study_figure(out, work, records),
                memory_figure(out, work, records)]


def tutorial_blocks() -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(TUTORIAL.read_text(encoding="utf-8"))]


def run_tutorial(folder: Path) -> None:
    """The tutorial's blocks, in order, in one namespace, in ``folder``."""
    import os

    here = os.getcwd()
    os.chdir(folder)
    try:
        scope = {"__name__": "__main__"}
        for i, code in enumerate(tutorial_blocks()):
            exec(compile(code, f"<tutorial block {i}>", "exec"), scope)
    finally:
        os.chdir(here)


def tutorial_pictures(folder: Path, out: Path) -> list[Path]:
    """The pictures a tutorial run wrote in ``folder``, stored as the docs keep them."""
    return [optimise_png(folder / src, out / name) for name, src in TUTORIAL_PICTURES.items()]


def run_demo(folder: Path, records: Path = RECORDS) -> dict:
    """The demo as ``i2e-train`` runs it (every default), in ``folder``; its records kept."""
    from i2e_train.config import compose
    from i2e_train.tasks.train import train

    run = folder / "demo"
    cfg = compose("train", [f"paths.root_dir={folder}", f"paths.output_dir={run}"])
    result = train(cfg)
    records.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "csv" / "metrics.csv", records / "demo-metrics.csv")
    shutil.copyfile(run / "spike_stats.json", records / "demo-spike-stats.json")
    summary = {"val/top1": result["best"]["val/top1"], "epochs": int(cfg.trainer.max_epochs),
               "best_checkpoint": Path(result["best_checkpoint"]).name}
    (records / "demo-result.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run the demo and the tutorial first (minutes)")
    ap.add_argument("--out", type=Path, default=IMG, help="where the figures go (default docs/img)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            print("demo:", run_demo(Path(tmp)), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run_tutorial(Path(tmp))
            for p in tutorial_pictures(Path(tmp), args.out / "tutorial"):
                print(f"{p}: {p.stat().st_size / 1e3:.1f} kB")
    for p in render_all(args.out):
        print(f"{p}: {p.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
