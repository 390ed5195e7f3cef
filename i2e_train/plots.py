"""Pictures a person would rather look at than read: confusion matrix, learning curves,
firing rate per spiking layer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from i2e_train.files import atomic_write

__all__ = ["plot_confusion", "plot_learning_curves", "plot_spike_rates", "read_epoch_metrics"]


def plot_confusion(matrix, path: str | Path, class_names: Sequence[str] | None = None,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows = true class) as a PNG; counts annotated if small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if k <= 20:
        names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"{title} (top-1 {100 * acc:.2f}%)")
    return _save(fig, path)


def read_epoch_metrics(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """Lightning CSVLogger ``metrics.csv`` -> {metric: {epoch: last value logged in that epoch}}."""
    import csv

    out: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            e = int(float(epoch))
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    out.setdefault(key, {})[e] = float(value)
                except ValueError:
                    continue
    return out


def plot_learning_curves(metrics_csv: str | Path, path: str | Path, title: str = "learning curves") -> Path:
    """Train/validation loss and top-1 per epoch (from a CSVLogger ``metrics.csv``) as a PNG.

    Train loss is the epoch mean (``train/loss_epoch``; ``train/loss`` when logged per epoch
    only); top-1 values are shown in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    m = read_epoch_metrics(metrics_csv)
    panels = [
        ("loss", [("train", m.get("train/loss_epoch") or m.get("train/loss")), ("validation", m.get("val/loss"))], 1.0),
        ("top-1 (%)", [("train", m.get("train/top1")), ("validation", m.get("val/top1"))], 100.0),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (ylabel, series, scale) in zip(axes, panels):
        for label, values in series:
            if values:
                epochs = sorted(values)
                ax.plot(epochs, [scale * values[e] for e in epochs], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    best = m.get("val/top1")
    suffix = f" (best val top-1 {100 * max(best.values()):.2f}%)" if best else ""
    fig.suptitle(title + suffix)
    return _save(fig, path)


def plot_spike_rates(rates: dict[str, float], path: str | Path, mean_rate: float | None = None,
                     title: str = "firing rate per layer") -> Path:
    """Firing rate (fraction of neuron-timesteps that spike) of each spiking layer, in network
    order, as a horizontal bar chart PNG; ``mean_rate`` is drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rates)
    values = [100.0 * float(rates[n]) for n in names]
    height = min(2.0 + 0.25 * len(names), 40.0)
    fig, ax = plt.subplots(figsize=(8, height))
    ax.barh(range(len(names)), values, color="tab:orange")
    ax.set_yticks(range(len(names)), names, fontsize=8 if len(names) <= 60 else 5)
    ax.invert_yaxis()  # first layer on top
    if mean_rate is not None:
        ax.axvline(100.0 * mean_rate, color="black", linestyle="--", linewidth=1,
                   label=f"mean {100.0 * mean_rate:.2f}%")
        ax.legend(loc="lower right")
    ax.set_xlabel("firing rate (% of neuron-timesteps)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, dpi=100, format="png"))
    finally:
        plt.close(fig)
