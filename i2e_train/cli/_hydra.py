"""Shared plumbing of the Hydra entry points (config location, composition for tests/tools)."""

from __future__ import annotations

import fnmatch
import functools
import re
import sys
from typing import Callable, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from i2e_train import config_dir

__all__ = ["entry_point", "compose", "expand_nested_globs", "group_options"]


def _local_fact(key: str, path: str, name: str | None = None):
    """``${i2e_local:<fact>,<folder>,<config>}``: a fact of i2e-convert output (configs/data/local.yaml)."""
    from i2e_train.data.local import local_fact

    return local_fact(key, path, name)


OmegaConf.register_new_resolver("i2e_local", _local_fact, replace=True)

# Groups whose options live in sub-folders (experiment=cifar10/baseline1). Hydra's glob() lists
# only the top level of a group, so `experiment=glob(*)` is expanded here over all depths.
_NESTED_GROUPS = ("experiment",)
_GLOB = re.compile(r"^(?P<key>[\w/]+)=glob\((?P<args>.*)\)$")


def group_options(group: str) -> list[str]:
    """Every config of a group, nested ones included, as Hydra option names ("cifar10/baseline1")."""
    root = config_dir() / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def expand_nested_globs(args: Sequence[str]) -> list[str]:
    """Rewrite `experiment=glob(pattern[, exclude=...])` into an explicit comma list over all depths."""
    out = []
    for arg in args:
        m = _GLOB.match(arg)
        if not m or m.group("key") not in _NESTED_GROUPS:
            out.append(arg)
            continue
        args_text = m.group("args")
        exclude: list[str] = []
        ex = re.search(r"exclude=(\[[^\]]*\]|[^,]+)", args_text)
        if ex:
            exclude = [x.strip(" '\"") for x in ex.group(1).strip("[]").split(",") if x.strip()]
            args_text = args_text[: ex.start()] + args_text[ex.end():]
        include = [x.strip(" '\"") for x in args_text.split(",") if x.strip(" '\"")]
        names = [n for n in group_options(m.group("key"))
                 if any(fnmatch.fnmatchcase(n, pat) for pat in include or ["*"])
                 and not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)]
        if not names:
            raise SystemExit(f"{arg}: no {m.group('key')} config matches")
        out.append(f"{m.group('key')}={','.join(names)}")
    return out


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """``@entry_point("train")`` = ``hydra.main`` on the packaged config folder (+ nested globs)."""

    def wrap(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)

        @functools.wraps(task)
        def main() -> object:
            sys.argv[1:] = expand_nested_globs(sys.argv[1:])
            return app()

        return main

    return wrap


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config outside of a Hydra run (tests, notebooks, sweep checks)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name=config_name):
        return _compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
