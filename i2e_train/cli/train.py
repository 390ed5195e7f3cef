"""``i2e-train``: train one config (or sweep many with ``-m``); see `i2e_train.tasks.train`."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point, override_value


def check(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra makes the run folder: values, run folder, checkpoints (`check_train_run`)."""
    from i2e_train.tasks.train import check_train_run

    check_train_run(cfg, override_value(args, "hydra.run.dir"))


@entry_point("train", check=check)
def main(cfg: DictConfig) -> float | None:
    from i2e_train.tasks.train import train_for_sweep

    return train_for_sweep(cfg)


if __name__ == "__main__":
    main()
