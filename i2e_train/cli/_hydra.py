"""``@entry_point("train")``: ``hydra.main`` on the packaged config folder, plus what every entry
point shares: nested globs and nested group names checked, known third-party noise filtered, the
run folder checked before Hydra writes into it, and one clear error line per failure (the full
traceback with ``HYDRA_FULL_ERROR=1`` or ``--traceback``)."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings
from typing import Callable

import hydra
from omegaconf import DictConfig

from i2e_train.config import (NESTED_GROUPS, check_group_option, config_dir, expand_nested_globs,
                              quote_list_overrides)

__all__ = ["entry_point", "filter_known_noise", "check_command_line"]

# Third-party messages that tell the user nothing, matched exactly (everything else still shows).
_NOISE_WARNINGS = (
    # Lightning on torch >= 2.9 (pytree), printed twice per run
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
    "instead.",
)
_NOISE_LOG = re.compile(r"^💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]")


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE_LOG.match(record.getMessage())


def filter_known_noise() -> None:
    """Hide the known, named third-party messages above (called by the entry points only)."""
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + "$", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTip())


def _value(args: list[str], key: str) -> str | None:
    for arg in reversed(args):
        k, sep, v = arg.lstrip("+~").partition("=")
        if sep and k == key:
            return v.strip().strip("'\"")
    return None


def check_command_line(config_name: str, args: list[str]) -> None:
    """Errors Hydra would report late or poorly: an unknown nested group option (Hydra lists only
    the top level), and a ``train`` run folder that holds another run (checked before Hydra writes
    its ``.hydra/`` files into it)."""
    for group in NESTED_GROUPS:
        value = _value(args, group)
        if value and value != "null" and "," not in value and "(" not in value:
            check_group_option(group, value)
    if config_name != "train" or any(a in ("-m", "--multirun") for a in args) or "--cfg" in " ".join(args):
        return
    from i2e_train.tasks.runs import check_run_folder, primary_process

    run_dir, ckpt = _value(args, "hydra.run.dir"), _value(args, "ckpt_path")
    if not primary_process():  # a DDP rank > 0: rank 0 checked (and now holds) the folder
        return
    if run_dir is None:
        if ckpt == "last":
            raise ValueError("ckpt_path=last resumes a run folder: pass it as hydra.run.dir=<logs/train/runs/...>")
        return
    overwrite = (_value(args, "overwrite") or "false").lower() in ("true", "1", "yes")
    check_run_folder(run_dir, ckpt, overwrite)


def _fail(name: str, err: BaseException) -> None:
    """One line (what, where, how to fix) instead of a traceback, then exit status 1. Hydra's
    wrapper of an error raised by a ``_target_`` is unwrapped to the error itself."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    message = str(err).strip() or type(err).__name__
    if not isinstance(err, (ValueError, FileNotFoundError, KeyError, RuntimeError)):
        message += f" ({type(err).__name__}; HYDRA_FULL_ERROR=1 or --traceback shows where)"
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _full_errors(args: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or "--traceback" in args


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """Wrap a task function into a console-script ``main`` over the packaged config ``config_name``."""

    def wrap(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        name = f"i2e-{config_name}"
        full = {"value": False}

        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> object:
            try:
                return task(cfg)
            except Exception as err:
                if full["value"]:
                    raise
                _fail(name, err)

        app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(guarded)

        @functools.wraps(task)
        def main() -> object:
            args = [a for a in sys.argv[1:] if a != "--traceback"]
            full["value"] = _full_errors(sys.argv[1:])
            if full["value"]:
                os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then shows the whole traceback too
            filter_known_noise()
            try:
                args = quote_list_overrides(expand_nested_globs(args))
                check_command_line(config_name, args)
            except Exception as err:
                if full["value"]:
                    raise
                _fail(name, err)
            sys.argv[1:] = args
            return app()

        return main

    return wrap
