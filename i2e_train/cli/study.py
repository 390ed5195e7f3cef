"""``i2e-study``: an experiment or pipeline over seeds and a grid of options, aggregated into a table,
e.g. ``i2e-study study=demo seeds=[0,1,2]`` (see `i2e_train.tasks.study`)."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.tasks.study import run_study


@entry_point("study")
def main(cfg: DictConfig) -> None:
    out = run_study(cfg)
    print(out["table"], end="")
    print(f"written: {out['dir']}/study.md, study.csv, runs.csv, study.png")


if __name__ == "__main__":
    main()
