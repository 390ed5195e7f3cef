"""``@entry_point("train")``: ``hydra.main`` on the packaged config folder, plus nested globs."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

from i2e_train.config import config_dir, expand_nested_globs

__all__ = ["entry_point"]


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """Wrap a task function into a console-script ``main`` over the packaged config ``config_name``."""

    def wrap(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)

        @functools.wraps(task)
        def main() -> object:
            sys.argv[1:] = expand_nested_globs(sys.argv[1:])
            return app()

        return main

    return wrap
