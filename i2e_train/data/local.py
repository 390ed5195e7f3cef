"""Your own converted data by folder: ``i2e-train data=local data.path=<i2e-convert output>``.

``i2e-convert`` writes ``<out>/README.md`` (a dataset card whose ``configs:`` block lists the
configs) and ``<out>/<config>/convert-manifest.json`` (``params``: resolution, ratio, order,
timesteps, class_names). ``local_facts`` reads them: the config is the card's only one, or the
one named by ``data.name``; the classes are the manifest's ``class_names``. ``configs/data/
local.yaml`` fills num_classes, resolution, timesteps, ratio and order from here through the
``${i2e.local:<fact>,<folder>,<config>}`` config resolver (so the model's head follows), and ``own_data`` builds the
``I2EDataModule``. What is missing (card, config, manifest, key) is an error naming the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from i2e_train.data.base import DatasetUnavailableError
from i2e_train.data.writer import MANIFEST, CardError, ManifestError, read_card, read_manifest

__all__ = ["LocalFacts", "LocalDataError", "local_facts", "local_fact", "own_data"]

_KEYS = ("resolution", "ratio", "order", "timesteps", "class_names")


class LocalDataError(DatasetUnavailableError):
    """A folder that is not (complete) i2e-convert output: the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class LocalFacts:
    name: str  # the config
    num_classes: int
    resolution: list[int]  # [H, W]
    timesteps: int
    ratio: float
    order: list[int]  # the converter's direction-group order
    class_names: list[str]
    manifest: str  # the file these facts come from


def _card_configs(path: Path) -> list[str]:
    card = path / "README.md"
    hint = f"data=local reads the dataset card and manifest that i2e-convert writes (i2e-convert ... out={path})"
    if not path.is_dir():
        raise LocalDataError(f"data.path {str(path)!r} is not a folder; {hint}")
    if not card.is_file():
        raise LocalDataError(f"{card} not found: {path} is not i2e-convert output (or its conversion never finished: "
                             f"the card is written when a config is complete); {hint}")
    try:
        meta, _ = read_card(card)
    except CardError as exc:
        raise LocalDataError(str(exc)) from None
    entries = meta.get("configs")
    names = [e.get("config_name") for e in entries or [] if isinstance(e, dict) and e.get("config_name")]
    if not names:
        raise LocalDataError(f"{card}: no 'configs:' block with a config_name in its front matter; {hint}")
    return [str(n) for n in names]


def _pick(configs: Sequence[str], name: str | None, card: Path) -> str:
    if name:
        if name not in configs:
            raise LocalDataError(f"{card} has no config {name!r}; its configs: {', '.join(configs)} (data.name=...)")
        return name
    if len(configs) > 1:
        raise LocalDataError(f"{card} lists several configs: {', '.join(configs)}; pick one with data.name=<config>")
    return configs[0]


def local_facts(path: str | Path, name: str | None = None) -> LocalFacts:
    """The facts of config ``name`` (None: the card's only config) of i2e-convert output ``path``."""
    path = Path(path)
    config = _pick(_card_configs(path), name, path / "README.md")
    manifest = path / config / MANIFEST
    if not manifest.is_file():
        raise LocalDataError(f"{manifest} not found: the card lists config {config!r} but its i2e-convert manifest "
                             "is missing (copy the whole output folder, or convert again)")
    try:
        params = read_manifest(manifest)["params"]  # checked against the schema i2e-convert writes
    except ManifestError as exc:
        raise LocalDataError(f"{exc}; convert {config} again") from None
    missing = [k for k in _KEYS if params.get(k) is None]
    if missing:
        raise LocalDataError(f"{manifest}: params lack {', '.join(repr(k) for k in missing)}; data=local needs "
                             f"{', '.join(_KEYS)} (convert again with the current i2e-convert)")
    res = params["resolution"]
    res = [int(res), int(res)] if isinstance(res, (int, float)) else [int(v) for v in res]
    names = [str(n) for n in params["class_names"]]
    if len(res) != 2 or not names:
        raise LocalDataError(f"{manifest}: params.resolution {params['resolution']!r} must be [H, W] and "
                             f"params.class_names non-empty (got {len(names)} names)")
    return LocalFacts(name=config, num_classes=len(names), resolution=res, timesteps=int(params["timesteps"]),
                      ratio=float(params["ratio"]), order=[int(g) for g in params["order"]], class_names=names,
                      manifest=str(manifest))


def local_fact(key: str, path: str, name: str | None = None) -> Any:
    """One fact for a config resolver: ``${i2e.local:num_classes,${data.path},${data.name}}``."""
    known = [f.name for f in dataclasses.fields(LocalFacts)]
    if key not in known:
        raise KeyError(f"i2e.local: unknown fact {key!r}; known: {', '.join(known)}")
    return getattr(local_facts(path, name or None), key)


def own_data(path: str, name: str | None = None, num_classes: int | None = None,
             resolution: Sequence[int] | None = None, timesteps: int | None = None, ratio: float | None = None,
             order: Sequence[int] | None = None, **kwargs: Any):
    """An ``I2EDataModule`` over i2e-convert output ``path`` with the facts of its card and manifest.

    ``num_classes``, ``resolution``, ``timesteps``, ``ratio``, ``order``: None = the manifest's; given values
    (the data config's, resolved from the same files) must agree with it. ``kwargs``: the
    I2EDataModule's (batch_size, num_workers, val_fraction, ...).
    """
    from i2e_train.data.i2e_dataset import I2EDataModule

    facts = local_facts(path, name)
    given = {"num_classes": num_classes, "resolution": None if resolution is None else [int(v) for v in resolution],
             "timesteps": timesteps, "ratio": None if ratio is None else float(ratio),
             "order": None if order is None else [int(g) for g in order]}
    for key, value in given.items():
        if value is not None and value != getattr(facts, key):
            raise ValueError(f"data.{key}={value!r} but {facts.manifest} says {getattr(facts, key)!r}")
    dm = I2EDataModule(name=facts.name, path=str(path), num_classes=facts.num_classes, resolution=facts.resolution,
                       timesteps=facts.timesteps, **kwargs)
    if dm.info.ratio is None:  # own data: record how its events were made
        dm.info = dataclasses.replace(dm.info, ratio=facts.ratio, order=None, class_names=tuple(facts.class_names))
    return dm
