"""Shared plumbing of the Hydra entry points (config location, composition for tests/tools)."""

from __future__ import annotations

from typing import Callable, Sequence

import hydra
from omegaconf import DictConfig

from i2e_train import config_dir

__all__ = ["entry_point", "compose"]


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """``@entry_point("train")`` = ``hydra.main`` on the packaged config folder."""
    return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config outside of a Hydra run (tests, notebooks, sweep checks)."""
    from hydra import compose as _compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name=config_name):
        return _compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
