"""``i2e-pipeline``: run a multi-stage recipe, e.g. ``i2e-pipeline pipeline=sim2real``
(see `i2e_train.tasks.pipeline`)."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.tasks.pipeline import report, run_pipeline


@entry_point("pipeline")
def main(cfg: DictConfig) -> None:
    print(report(run_pipeline(cfg)))


if __name__ == "__main__":
    main()
