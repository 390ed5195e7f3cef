"""Hydra configs as a library: composing them, listing a group's options, nested globs, and the
resolvers through which configs read facts instead of restating them.

The entry points (`i2e_train.cli`) and the library (the pipeline composes one ``train``
config per stage; tests and notebooks compose configs in-process) share these.

Resolvers (registered when `i2e_train` is imported):

* ``${i2e.catalog:<config name>,<fact>[,<default>]}``: a fact of the dataset catalog
  (`i2e_train.data.catalog`): ``num_classes``, ``resolution``, ``timesteps``, ``ratio``,
  ``order`` ... Data configs read their classes, resolution, T and converter ratio this way. For
  a name outside the catalog (data of your own) the default, or an error saying what to give.
* ``${i2e.local:<fact>,<folder>,<config or null>}``: a fact of ``i2e-convert`` output (its card
  and manifest, `i2e_train.data.local`); ``data=local`` reads classes, resolution, T, ratio.
* ``${i2e.paper_top1:<released name or null>}``: the paper's top-1 of a released weight
  (`i2e_train.models.released`), null for null.
* ``${i2e.pid:}``: this process's id (run folder names: two runs started in the same
  microsecond by two processes still get two folders).
* ``${i2e.help_names:<group | released | catalog>}``, ``${i2e.help_groups:<root config>[,skip...]}``:
  the lists in each entry point's ``--help`` (``configs/hydra/help/``), read from the configs,
  the released-weights table and the catalog without importing torch.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from pathlib import Path

from omegaconf import DictConfig

__all__ = ["config_dir", "compose", "call_target", "register_resolvers", "expand_nested_globs", "group_options", "NESTED_GROUPS", "FRAMEWORK_KEYS",
           "quote_list_overrides", "check_group_option"]

def config_dir() -> Path:
    """The Hydra config folder: inside the installed wheel, else the repository's top level."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parent.parent / "configs"
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"i2e-train configs not found (looked in {packaged} and {repo})")


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


def check_group_option(group: str, value: str) -> None:
    """ValueError naming the closest options of every depth when ``group=value`` names no config
    (Hydra's own error lists only the top level of a nested group)."""
    import difflib

    known = group_options(group)
    if value in known:
        return
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {group} config {value!r}.{hint} Available: {', '.join(known)}")


def _split_top(text: str) -> list[str]:
    """``"a=b,c.d=[1,2],'x'"`` -> ``["a=b", "c.d=[1,2]", "'x'"]`` (commas inside brackets or quotes stay)."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur] if cur.strip() else parts


_LIST_OVERRIDE = re.compile(r"^(?P<key>[+~]{0,2}[\w./@-]+)=\[(?P<items>.*)\]$", re.S)


def quote_list_overrides(args: Sequence[str]) -> list[str]:
    """Quote the elements of a list override that are overrides themselves, so that
    ``common_overrides=[trainer=gpu,paths.i2e=/data]`` (the form the README shows) parses: Hydra's
    grammar allows no ``=`` in an unquoted list element."""
    out = []
    for arg in args:
        m = _LIST_OVERRIDE.match(arg)
        if not m:
            out.append(arg)
            continue
        items = [x.strip() for x in _split_top(m.group("items"))]
        if not any("=" in x and x[:1] not in "'\"" for x in items):
            out.append(arg)
            continue
        quoted = [x if x[:1] in "'\"" or "=" not in x else "'" + x.replace("\\", "\\\\").replace("'", "\\'") + "'"
                  for x in items]
        out.append(f"{m.group('key')}=[{','.join(quoted)}]")
    return out


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config outside of a Hydra run (the pipeline's stages, tests, notebooks).

    Inside a running Hydra app (``i2e-pipeline``) the app's own config search path is used.
    """
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = quote_list_overrides(overrides)
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


_NO_DEFAULT = object()


def _catalog_fact(name: str, fact: str, default=_NO_DEFAULT):
    from i2e_train.data.catalog import CATALOG, get_info

    if str(name) not in CATALOG and default is not _NO_DEFAULT:
        return default
    try:
        info = get_info(str(name))
    except KeyError as exc:
        raise KeyError(f"{exc.args[0]}\nFor data of your own, give the facts the catalog cannot: e.g. "
                       f"data.num_classes=<K> data.resolution=[H,W] (and data.encoder.ratio for images)") from None
    if not hasattr(info, fact):
        raise KeyError(f"${{i2e.catalog:{name},{fact}}}: the catalog has no fact {fact!r}")
    return getattr(info, fact)


def _paper_top1(released):
    if released is None:
        return None
    from i2e_train.models.released import get_released

    return get_released(str(released)).top1


def _local_fact(fact: str, path: str, name: str | None = None):
    from i2e_train.data.local import local_fact

    return local_fact(fact, path, name)


def _pid() -> int:
    import os

    return os.getpid()


def _wrap(items: Sequence[str], indent: str = "  ", first: str | None = None) -> str:
    import textwrap

    return textwrap.fill(", ".join(items) or "(none)", width=100, initial_indent=first or indent,
                         subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def _help_names(kind: str) -> str:
    """``--help``: the names an entry point accepts: a group's options, the released weights or
    the catalog's dataset configs (read without importing torch)."""
    if kind == "released":
        from i2e_train.models.released import RELEASED_WEIGHTS

        return _wrap(list(RELEASED_WEIGHTS))
    if kind == "catalog":
        from i2e_train.data.catalog import list_datasets

        return _wrap(list_datasets())
    return _wrap(group_options(kind))


def _help_groups(root: str, *skip: str) -> str:
    """``--help``: the config groups the root config ``root`` selects (its defaults list), each
    with its default and options; ``skip``: groups listed elsewhere in the help."""
    import yaml

    defaults = yaml.safe_load((config_dir() / f"{root}.yaml").read_text(encoding="utf-8")).get("defaults") or []
    lines = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        key, default = next(iter(entry.items()))
        name = key.split()[-1].strip("/")
        group = name.split("@")[0]
        if group.split("/")[0] in ("hydra", "paths", *skip):
            continue
        options = [f"{o} (default)" if o == default else o for o in group_options(group)]
        lines.append(_wrap(options, indent=" " * 18, first=f"  {name:<15} "))
    return "\n".join(lines)
def _node_valued(fn):
    """``fn`` with list / tuple / dict results returned as OmegaConf containers: a plain list held by
    an interpolation fails ``OmegaConf.resolve`` (what ``--cfg job --resolve`` runs) with
    "Value 'list' is not a supported primitive type"; a ListConfig takes the node's place."""
    from omegaconf import OmegaConf

    def resolver(*args):
        value = fn(*args)
        if isinstance(value, tuple):
            value = list(value)
        return OmegaConf.create(value) if isinstance(value, (list, dict)) else value

    return resolver


def register_resolvers() -> None:
    """Register the ``i2e.*`` resolvers with OmegaConf (once)."""
    from omegaconf import OmegaConf

    for name, fn in (("i2e.catalog", _catalog_fact), ("i2e.paper_top1", _paper_top1), ("i2e.local", _local_fact),
                     ("i2e.pid", _pid), ("i2e.help_names", _help_names), ("i2e.help_groups", _help_groups)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, _node_valued(fn))
