"""``i2e-pipeline``: run a multi-stage recipe, e.g. ``i2e-pipeline pipeline=sim2real``
(see `i2e_train.tasks.pipeline`)."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point


def check(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra makes the pipeline's folder: every stage's config (`check_pipeline`)."""
    from i2e_train.tasks.pipeline import check_pipeline

    check_pipeline(cfg)


@entry_point("pipeline", check=check)
def main(cfg: DictConfig) -> None:
    from i2e_train.tasks.pipeline import report, run_pipeline

    print(report(run_pipeline(cfg)))


if __name__ == "__main__":
    main()
