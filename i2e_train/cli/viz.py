"""``i2e-viz``: a record, a dataset row or an image -> GIF + PNG strip; configs/viz.yaml lists the
arguments of `i2e_train.viz.render_input`, which this calls."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point
from i2e_train.config import call_target


@entry_point("viz")
def main(cfg: DictConfig) -> None:
    call_target(cfg)


if __name__ == "__main__":
    main()
