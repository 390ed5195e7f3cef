"""Train / validation splits made from labels: seeded stratified, and SpikingJelly's per-class cut."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["stratified_split", "per_class_split"]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: returns (train rows, validation rows), both sorted.

    Each class gives ``round(fraction * n)`` random rows (at least 1 and at most n - 1 when it has
    two or more) to validation; the draw is a function of ``seed`` only.
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val.append(rng.permutation(idx)[:k])
    val_rows = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    return train_rows, val_rows


def per_class_split(targets: Sequence[int], train_ratio: float, num_classes: int) -> tuple[list[int], list[int]]:
    """SpikingJelly's ``split_to_train_test_set(train_ratio, dataset, num_classes)`` (random_split
    False) from the targets alone: per class, in dataset order, the first
    ``ceil(n * train_ratio)`` indices train, the rest test; classes concatenated in class order."""
    label_idx: list[list[int]] = [[] for _ in range(num_classes)]
    for i, t in enumerate(targets):
        t = int(t)
        if not 0 <= t < num_classes:
            raise ValueError(f"target {t} of sample {i} outside 0..{num_classes - 1}")
        label_idx[t].append(i)
    train, test = [], []
    for indices in label_idx:
        pos = math.ceil(len(indices) * train_ratio)  # the same float expression as SpikingJelly
        train.extend(indices[:pos])
        test.extend(indices[pos:])
    return train, test
