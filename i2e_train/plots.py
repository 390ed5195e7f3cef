"""Pictures a person would rather look at than read: confusion matrix (more to come)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_confusion"]


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
