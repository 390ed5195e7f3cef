"""Hydra configs as a library: composing them, listing a group's options, nested globs.

The entry points (:mod:`i2e_train.cli`) and the library (the pipeline composes one ``train``
config per stage; tests and notebooks compose configs in-process) share these.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from omegaconf import DictConfig

from i2e_train import config_dir

__all__ = ["compose", "call_target", "expand_nested_globs", "group_options", "NESTED_GROUPS", "FRAMEWORK_KEYS"]

# Groups whose options live in sub-folders (experiment=cifar10/baseline1). Hydra's glob() lists
# only the top level of a group, so `experiment=glob(*)` is expanded here over all depths.
NESTED_GROUPS = ("experiment",)
_GLOB = re.compile(r"^(?P<key>[\w/]+)=glob\((?P<args>.*)\)$")


def group_options(group: str) -> list[str]:
    """Every config of a group, nested ones included, as Hydra option names ("cifar10/baseline1")."""
    root = config_dir() / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _glob_patterns(args_text: str) -> tuple[list[str], list[str]]:
    """``"a*, b*, exclude=[c, d]"`` -> (include patterns, exclude patterns)."""
    exclude: list[str] = []
    ex = re.search(r"exclude=(\[[^\]]*\]|[^,]+)", args_text)
    if ex:
        exclude = [x.strip(" '\"") for x in ex.group(1).strip("[]").split(",") if x.strip()]
        args_text = args_text[: ex.start()] + args_text[ex.end():]
    include = [x.strip(" '\"") for x in args_text.split(",") if x.strip(" '\"")]
    return include, exclude


def expand_nested_globs(args: Sequence[str]) -> list[str]:
    """Rewrite `experiment=glob(pattern[, exclude=...])` into an explicit comma list over all depths."""
    out = []
    for arg in args:
        m = _GLOB.match(arg)
        if not m or m.group("key") not in NESTED_GROUPS:
            out.append(arg)
            continue
        include, exclude = _glob_patterns(m.group("args"))
        names = [n for n in group_options(m.group("key"))
                 if any(fnmatch.fnmatchcase(n, pat) for pat in include or ["*"])
                 and not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)]
        if not names:
            raise SystemExit(f"{arg}: no {m.group('key')} config matches")
        out.append(f"{m.group('key')}={','.join(names)}")
    return out


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config outside of a Hydra run (the pipeline's stages, tests, notebooks).

    Inside a running Hydra app (``i2e-pipeline``) the app's own config search path is used.
    """
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return _compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name=config_name):
        return _compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


# Keys of a config that configure the run itself, not the function its root `_target_` names.
FRAMEWORK_KEYS = ("paths", "task_name")


def call_target(cfg: DictConfig):
    """Call the function named by the root ``_target_`` of ``cfg`` with every other key of the
    config (resolved; ``paths`` and ``task_name`` left out) as keyword arguments. So a config
    file is the one list of a function's arguments (configs/convert.yaml, configs/viz.yaml)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    args = {}
    for key in cfg:
        if key in FRAMEWORK_KEYS:
            continue
        value = cfg[key]  # interpolations (e.g. ${paths.data_dir}) resolve here
        args[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return instantiate(args, _convert_="all")
