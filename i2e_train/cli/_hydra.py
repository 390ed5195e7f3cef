"""``@entry_point("train", check=...)``: ``hydra.main`` on the packaged config folder, plus what
every entry point shares: nested globs and nested group names checked, known third-party noise
filtered, the command line's config checked before Hydra makes a run folder (``check``), the run
folder of a run that failed before writing anything of its own removed again, and one clear error
line per failure (the full traceback with ``HYDRA_FULL_ERROR=1`` or ``--traceback``).

Nothing here imports torch or Lightning: ``--help`` (`render_help`) is answered before
any task module is imported; each entry point imports its task inside its function."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from i2e_train.config import (NESTED_GROUPS, check_group_option, compose, config_dir, expand_nested_globs,
                              quote_list_overrides)

__all__ = ["entry_point", "filter_known_noise", "check_command_line", "preflight", "RunFolderWatch",
           "override_value", "render_help"]

# Third-party messages that tell the user nothing, matched exactly (everything else still shows).
_NOISE_WARNINGS = (
    # Lightning on torch >= 2.9 (pytree), printed twice per run
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
    "instead.",
)
# logger name -> a message it logs on every normal run, matched from its start
_NOISE_LOGS = {
    "lightning.pytorch.utilities.rank_zero": re.compile(
        r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]"),
    "lightning.fabric.utilities.rank_zero": re.compile(
        r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]"),
    # timm's cosine schedule over one epoch (trainer.max_epochs=1: debug runs, tests) is constant, as meant
    "timm.scheduler.cosine_lr": re.compile(
        r"Cosine annealing scheduler will have no effect on the learning rate since t_initial = t_mul = eta_mul = 1\.$"),
}
# Hydra flags after which Hydra prints something and runs nothing (no run folder, no checks)
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def filter_known_noise() -> None:
    """Hide the known, named third-party messages above (called by the entry points only): a
    filter on each of their loggers, none process-wide but the one FutureWarning."""
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + "$", category=FutureWarning)
    for name, pattern in _NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))


def override_value(args: list[str], key: str) -> str | None:
    """The value the command line gives ``key`` (the last one wins), unquoted; None when absent."""
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
        value = override_value(args, group)
        if value and value != "null" and "," not in value and "(" not in value:
            check_group_option(group, value)
    if config_name != "train" or any(a in ("-m", "--multirun") for a in args) or "--cfg" in " ".join(args):
        return
    from i2e_train.tasks.runs import check_run_folder, primary_process

    run_dir, ckpt = override_value(args, "hydra.run.dir"), override_value(args, "ckpt_path")
    if not primary_process():  # a DDP rank > 0: rank 0 checked (and now holds) the folder
        return
    if run_dir is None:
        if ckpt == "last":
            raise ValueError("ckpt_path=last resumes a run folder: pass it as hydra.run.dir=<logs/train/runs/...>")
        return
    overwrite = (override_value(args, "overwrite") or "false").lower() in ("true", "1", "yes")
    check_run_folder(run_dir, ckpt, overwrite)


def preflight(config_name: str, args: list[str], check: Callable[[DictConfig, list[str]], Any] | None) -> None:
    """Compose the command line's config as Hydra will and run ``check(cfg, args)`` on it before
    Hydra makes the run folder, so that a refused value or file leaves nothing behind. Skipped
    for command lines with Hydra flags (``-m``: every job checks its own config; ``--cfg``,
    ``--help`` ...); a command line Hydra cannot compose is left to Hydra, which says why."""
    if check is None or any(a.startswith("-") for a in args):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(config_name, args)
    except (HydraException, OmegaConfBaseException):
        return
    check(cfg, args)


_RUN: dict[str, Any] = {}  # the run folder of this process's run and whether it existed before


class RunFolderWatch(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): notes whether the run folder existed before
    Hydra made it, so that a failed run removes only a folder of its own."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir)).absolute()
        top = folder  # the outermost folder Hydra will make (logs/ on a first run)
        while not top.parent.exists():
            top = top.parent
        _RUN.update(dir=folder, existed=folder.exists(), top=top)


def _hydra_files(folder: Path) -> bool:
    """Whether ``folder`` holds only what Hydra writes into a run folder: ``.hydra/`` with its three
    config files, and the job's log."""
    hydra_dir = {".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    return all(n in hydra_dir or ("/" not in n and n.endswith(".log")) for n in names)


def _remove_unused_run_folder() -> None:
    """After a failure: remove the run folder Hydra made for this run when nothing but Hydra's own
    files is in it (a refused value, a missing file): a refused run leaves no folder behind."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or _RUN.get("existed", True):
        return
    folder = Path(HydraConfig.get().runtime.output_dir).absolute()
    if folder != _RUN.get("dir") or not folder.is_dir() or not _hydra_files(folder):
        return
    root = logging.getLogger()
    for handler in list(root.handlers):  # the job's log file is in the folder
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(folder, ignore_errors=True)
    parent, top = folder.parent, _RUN.get("top", folder)
    while parent.is_relative_to(top) and parent != folder and not any(parent.iterdir()):  # made with it, empty
        parent.rmdir()
        parent = parent.parent


def render_help(config_name: str) -> str:
    """The entry point's ``--help``: its Hydra help config (``configs/hydra/help/<name>.yaml``, which
    the root config selects, so Hydra's own ``--help`` prints the same), rendered without composing
    the app's config: Hydra's ``--help`` first lists every config group of its search path (seconds
    of work), though this text shows none of that list."""
    from omegaconf import OmegaConf

    help_cfg = OmegaConf.load(config_dir() / "hydra" / "help" / f"{config_name}.yaml")
    return str(OmegaConf.create({"hydra": {"help": help_cfg}}).hydra.help.template)


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


def entry_point(config_name: str, check: Callable[[DictConfig, list[str]], Any] | None = None
                ) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """Wrap a task function into a console-script ``main`` over the packaged config ``config_name``;
    ``check(cfg, args)`` runs on the composed config before Hydra makes the run folder (`preflight`)."""

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
                _remove_unused_run_folder()
                _fail(name, err)

        app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(guarded)

        @functools.wraps(task)
        def main() -> object:
            args = [a for a in sys.argv[1:] if a != "--traceback"]
            full["value"] = _full_errors(sys.argv[1:])
            if full["value"]:
                os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then shows the whole traceback too
            if any(a in ("--help", "-h") for a in args):
                print(render_help(config_name))
                return None
            filter_known_noise()
            try:
                args = quote_list_overrides(expand_nested_globs(args))
                if not any(a.split("=", 1)[0] in _INFO_FLAGS for a in args):
                    check_command_line(config_name, args)
                    preflight(config_name, args, check)
            except Exception as err:
                if full["value"]:
                    raise
                _fail(name, err)
            sys.argv[1:] = args
            return app()

        return main

    return wrap
