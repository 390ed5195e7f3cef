"""``i2e-train``: train one config (or sweep many with ``-m``); see `i2e_train.tasks.train`."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.tasks.train import train_for_sweep


@entry_point("train")
def main(cfg: DictConfig) -> float | None:
    return train_for_sweep(cfg)


if __name__ == "__main__":
    main()
