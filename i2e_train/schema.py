"""Stored configs are data: what our own config groups define, and the check every config read
from a file passes before any of it is used.

A run config stored in a file (the ``i2e_config`` of every ``.ckpt`` ``i2e-train`` writes, read
by ``i2e-eval``, ``init_from``, resume and the Python API) could name any Python callable as a
``_target_``, and ``hydra.utils.instantiate`` would call it. So such a config is checked against
the schema of our own configs (the folder `i2e_train.config.config_dir`), read from the
YAML files themselves, following each root config's defaults list to every group it can select:

* a ``_target_`` is accepted only at a place where one of our configs puts one, and only with a
  value one of our configs gives there (``trainer.plugins[]`` -> ``i2e_train.recovery.AtomicCheckpointIO``);
  the other instantiation keys (``_args_``, ``_partial_``, ``_recursive_``, ``_convert_``) only where
  our configs write them;
* every key must be one our configs define, except the arguments of a class our configs name
  (what ``+trainer.key=value`` adds) and the contents of a plain value (``data.augment={hflip: 0.5}``);
  those hold plain data: no instantiation key, no ``${...}`` interpolation, however deep;
* no string holds an interpolation (a stored config is saved resolved; ``${oc.decode:...}`` or a
  resolver would run when it is read).

What the schema refuses is still accepted where the config of the run reading the file (its
command line is the user's: ``+callbacks.probe._target_=...``) holds the same at the same place.

`check_stored_config` raises `StoredConfigError` naming the key and the file;
`check_record` checks a JSON record (a pipeline stage's or a study run's result) field by field;
`read_record` reads one from its file and checks it.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["StoredConfigError", "ConfigSchema", "config_schema", "check_stored_config", "check_record",
           "read_record", "INSTANTIATE_KEYS"]

INSTANTIATE_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
_KEEP_WEIGHTS = ("if your own command line added that (+key=...) to the run that saved it, give the same override "
                 "here; if you trust its weights, keep only them (torch.save(torch.load(<file>, weights_only=True)"
                 "['state_dict'], 'weights.pt')) and pass that file")


# The _target_ values our configs gave a place in earlier versions, so that checkpoints saved then
# still pass (a stored config is instantiated only at model and data, by i2e-eval; never here).
_EARLIER_TARGETS = {
    "callbacks.model_summary": ("lightning.pytorch.callbacks.RichModelSummary",),
    "callbacks.progress_bar": ("lightning.pytorch.callbacks.TQDMProgressBar",),
    "callbacks.step_checkpoint": ("i2e_train.recovery.StepCheckpoint",),
    "logger.csv": ("lightning.pytorch.loggers.CSVLogger",),
}


class StoredConfigError(ValueError):
    """A config or record read from a file holds what our configs do not define (the message names
    the key and the file)."""


@dataclass(frozen=True)
class ConfigSchema:
    """What the configs reachable from one root config define.

    Paths are dotted keys, ``[]`` for the items of a list (``trainer.plugins[]._target_``).
    ``targets``: path of a node -> the ``_target_`` values our configs give it. ``keys``: every key
    path. ``containers``: the paths our configs hold a mapping at (the others hold plain values).
    """

    root: str
    targets: Mapping[str, frozenset[str]]
    keys: frozenset[str]
    containers: frozenset[str]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _load(path: Path) -> tuple[dict, str | None]:
    """A config file's content and its ``# @package`` header (None without one)."""
    import yaml

    text = path.read_text(encoding="utf-8")
    header = re.search(r"^#\s*@package\s+(\S+)", text, re.M)
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping")
    return data, header.group(1) if header else None


def _package(header: str | None, package: str, where: Path) -> str:
    if header is None:
        return package
    if header == "_global_":
        return ""
    raise ValueError(f"{where}: '@package {header}' is not a package the config schema reads (only _global_)")


def _entry(entry: Any, group: str, package: str) -> tuple[str, str] | None:
    """A defaults-list entry ``[optional] [/]group[@package]: option`` -> (group path, package);
    None for ``_self_``, plain config names (same group and package, read anyway) and overrides
    (they pick an option of a group mounted elsewhere)."""
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    key = str(next(iter(entry)))
    words = key.split()
    if "override" in words[:-1]:
        return None
    name, _, pkg = words[-1].partition("@")
    absolute = name.startswith("/")
    name = name.strip("/")
    group_path = name if absolute or not group else f"{group}/{name}"
    if pkg == "_global_":
        return group_path, ""
    return group_path, _join(package, pkg or name.replace("/", "."))


def _walk(node: Any, path: str, targets: dict[str, set[str]], keys: set[str], containers: set[str]) -> None:
    if isinstance(node, dict):
        if path:
            containers.add(path)
        for key, value in node.items():
            key = str(key)
            sub = _join(path, key)
            keys.add(sub)
            if key == "_target_":
                targets.setdefault(path, set()).add(str(value))
            _walk(value, sub, targets, keys, containers)
    elif isinstance(node, list):
        for item in node:
            _walk(item, path + "[]", targets, keys, containers)


@functools.lru_cache(maxsize=None)
def config_schema(root: str = "train") -> ConfigSchema:
    """The schema of the root config ``root`` (``configs/<root>.yaml``) and of every option of
    every group its defaults lists can select (Hydra's own ``hydra`` group left out: no stored
    config holds it)."""
    from i2e_train.config import config_dir

    base = config_dir()
    targets: dict[str, set[str]] = {}
    keys: set[str] = set()
    containers: set[str] = set()
    todo = [(base / f"{root}.yaml", "", "")]  # (file, its group, its package)
    seen: set[Path] = set()
    while todo:
        file, group, package = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        data, header = _load(file)
        package = _package(header, package, file)
        for entry in data.pop("defaults", None) or []:
            found = _entry(entry, group, package)
            if found is None or found[0].split("/")[0] == "hydra":
                continue
            sub_group, sub_package = found
            todo += [(f, sub_group, sub_package) for f in sorted((base / sub_group).rglob("*.yaml"))]
        data.pop("hydra", None)
        parts = package.split(".") if package else []
        for i in range(1, len(parts) + 1):  # the package itself and the mappings above it
            keys.add(".".join(parts[:i]))
            containers.add(".".join(parts[:i]))
        _walk(data, package, targets, keys, containers)
    for path, earlier in _EARLIER_TARGETS.items():
        if path in targets:
            targets[path].update(earlier)
    return ConfigSchema(root, {k: frozenset(v) for k, v in targets.items()}, frozenset(keys), frozenset(containers))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Checker:
    """One walk over a stored config; ``problems`` collects what it refuses. A node that ``trusted``
    (the config of the run reading the file) holds, equal, at the same place is accepted: it is
    what the user's own command line makes this run build anyway."""

    def __init__(self, schema: ConfigSchema, trusted: Any = None) -> None:
        self.schema, self.trusted, self.problems = schema, trusted, []

    def refuse(self, text: str, at: str, node: Any) -> None:
        if not self.is_trusted(at, node):
            self.problems.append(text)

    def is_trusted(self, at: str, node: Any) -> bool:
        """Whether the trusted config holds ``node`` at the path ``at`` (resolved; a place that does not
        resolve there, or inside a list, is not trusted)."""
        if self.trusted is None or not at or "[]" in at:
            return False
        from omegaconf import OmegaConf

        try:
            mine = OmegaConf.select(self.trusted, at, throw_on_missing=True)
            mine = OmegaConf.to_container(mine, resolve=True) if OmegaConf.is_config(mine) else mine
        except Exception:  # noqa: BLE001 - not resolvable here (e.g. ${hydra:...} outside a run): not trusted
            return False
        return mine == node

    def value(self, node: Any, path: str, known: bool) -> None:
        """``known``: ``path`` is a place our configs define (keys are checked); else plain data."""
        if isinstance(node, str):
            if "${" in node:
                self.refuse(f"{path}={_describe(node)}: an interpolation (stored configs are saved resolved)", path,
                            node)
        elif isinstance(node, (list, tuple)):
            for item in node:
                self.value(item, path + "[]", known)
        elif isinstance(node, Mapping):
            self.mapping(node, path, known and (not path or path in self.schema.containers))
        elif node is not None and not isinstance(node, (bool, int, float)):
            self.refuse(f"{path}: a {type(node).__name__}, not a plain value", path, node)

    def mapping(self, node: Mapping, path: str, known: bool) -> None:
        allowed = self.schema.targets.get(path, frozenset())
        for key, value in node.items():
            if not isinstance(key, str):
                self.refuse(f"{path or '<top>'}: the key {key!r} is not a string", path, node)
                continue
            sub = _join(path, key)
            if key == "_target_":
                if not known or value not in allowed:
                    where = f"they name {', '.join(sorted(allowed))}" if known and allowed else "they name none"
                    self.refuse(f"{sub}={_describe(value)}: not a class our configs name there ({where})", path, node)
            elif key in INSTANTIATE_KEYS:
                if not known or sub not in self.schema.keys:
                    self.refuse(f"{sub}: our configs set no {key} there", path, node)
                else:
                    self.value(value, sub, True)
            elif not known or sub in self.schema.keys:
                self.value(value, sub, known)
            elif allowed:  # an argument of a class our configs name (what +trainer.key=value adds)
                self.value(value, sub, False)
            else:
                self.refuse(f"{sub}: unknown key (not in our configs)", sub, value)


def check_stored_config(config: Any, source: str, root: str = "train", trusted: Any = None) -> dict:
    """``config`` (a run config read from the file ``source``) checked against the schema of
    ``configs/<root>.yaml`` (module docstring); returns it. `StoredConfigError` names the
    first key refused and the file.

    ``trusted``: the config of the run that reads the file (its command line is the user's): a
    node the schema refuses is accepted when ``trusted`` holds the same at the same place, so a
    checkpoint of a run with ``+callbacks.probe._target_=...`` is read back by that run, and by a
    run given the same override."""
    if not isinstance(config, Mapping):
        raise StoredConfigError(f"{source}: refused: its stored run config is a {type(config).__name__}, not a "
                                f"mapping; {_KEEP_WEIGHTS}")
    checker = _Checker(config_schema(root), trusted)
    checker.mapping(config, "", True)
    if checker.problems:
        more = f" (and {len(checker.problems) - 1} more)" if len(checker.problems) > 1 else ""
        raise StoredConfigError(f"{source}: refused: its stored run config is not one our configs make "
                                f"({checker.problems[0]}{more}). Nothing of it was used; {_KEEP_WEIGHTS}")
    return dict(config)


def check_record(record: Any, fields: Mapping[str, tuple[type, ...]], source: str,
                 optional: tuple[str, ...] = ()) -> dict:
    """A JSON record read from ``source``: exactly the keys of ``fields`` (those in ``optional``
    may be missing), each of one of its types (``type(None)`` allows null). StoredConfigError
    naming the key and the file otherwise."""
    if not isinstance(record, Mapping):
        raise StoredConfigError(f"{source}: expected a JSON object, got {type(record).__name__}; delete the file "
                                "to redo what it records")
    for key, value in record.items():
        if key not in fields:
            raise StoredConfigError(f"{source}: unknown key {key!r} (known: {', '.join(fields)}); delete the file to "
                                    "redo what it records")
        kinds = fields[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise StoredConfigError(f"{source}: {key}={_describe(value)} is not {names}; delete the file to redo "
                                    "what it records")
    missing = [k for k in fields if k not in record and k not in optional]
    if missing:
        raise StoredConfigError(f"{source}: missing {', '.join(missing)}; delete the file to redo what it records")
    return dict(record)


def read_record(path: Path, fields: Mapping[str, tuple[type, ...]], redo: str) -> dict | None:
    """The JSON record in ``path`` checked by `check_record` (None when there is no such file); a
    file that is not JSON is a StoredConfigError saying to delete it to ``redo`` (e.g. "run it again")."""
    if not path.is_file():
        return None
    try:
        return check_record(json.loads(path.read_text(encoding="utf-8")), fields, str(path))
    except StoredConfigError:
        raise
    except ValueError as exc:
        raise StoredConfigError(f"{path}: unreadable ({exc}); delete it to {redo}") from None
