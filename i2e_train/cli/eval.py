"""``i2e-eval``: evaluate a checkpoint on its data; see `i2e_train.tasks.evaluate`."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.tasks.evaluate import evaluate_from_overrides


@entry_point("eval")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return evaluate_from_overrides(cfg, list(HydraConfig.get().overrides.task))["val/top1"]


if __name__ == "__main__":
    main()
