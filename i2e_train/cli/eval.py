"""``i2e-eval``: evaluate a checkpoint on its data; see `i2e_train.tasks.evaluate`."""

from __future__ import annotations

from omegaconf import DictConfig

from i2e_train.cli._hydra import entry_point


def _task_overrides(args: list[str]) -> list[str]:
    """The command line's overrides of the task config (Hydra's ``overrides.task``: no ``hydra.*``)."""
    return [a for a in args if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]


def check(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra makes the run folder: the checkpoint, its stored config and the values
    (`check_eval_run`)."""
    from i2e_train.tasks.evaluate import check_eval_run

    check_eval_run(cfg, _task_overrides(args))


@entry_point("eval", check=check)
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from i2e_train.tasks.evaluate import evaluate_from_overrides

    return evaluate_from_overrides(cfg, list(HydraConfig.get().overrides.task))["val/top1"]


if __name__ == "__main__":
    main()
