"""``i2e-study``: an experiment or pipeline over seeds and a grid of options, aggregated into a table,
e.g. ``i2e-study study=demo seeds=[0,1,2]`` (see `i2e_train.tasks.study`)."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point


def check(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra makes the study's folder: every run's config (`check_study`)."""
    from i2e_train.tasks.study import check_study

    check_study(cfg)


@entry_point("study", check=check)
def main(cfg: DictConfig) -> None:
    from i2e_train.tasks.study import run_study

    out = run_study(cfg)
    print(out["table"], end="")
    print(f"written: {out['dir']}/study.md, study.csv, runs.csv, study.png")


if __name__ == "__main__":
    main()
