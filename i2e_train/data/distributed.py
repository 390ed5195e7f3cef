"""The batch-size rule under data parallelism.

A recipe's ``batch_size`` is the GLOBAL batch (what the optimiser averages over per step).
With N processes (devices x nodes) each loads ``batch_size / N`` samples, so the effective
batch, and therefore the recipe's learning rate, stay the same whatever the device count.
"""

from __future__ import annotations

__all__ = ["per_device_batch_size"]


def per_device_batch_size(batch_size: int, trainer=None) -> int:
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if batch_size % world:
        raise ValueError(
            f"global batch_size {batch_size} is not divisible by the {world} training processes; "
            "choose a batch size that splits evenly (it is the recipe's effective batch)"
        )
    return batch_size // world
