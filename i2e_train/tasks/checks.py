"""Config values checked (and coerced where the meaning is clear) before any library sees them,
so a bad value is one error naming its key instead of an ``assert`` deep inside timm, Lightning
or SpikingJelly. Run by [`i2e_train.tasks.train.train`][i2e_train.tasks.train.train] and [`i2e_train.tasks.evaluate.evaluate`][i2e_train.tasks.evaluate.evaluate]
before anything is written."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["check_train_config", "positive_int"]


def positive_int(key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (``"8"`` and ``8.0`` are accepted); ValueError naming ``key``."""
    if isinstance(value, bool):
        value = None
    try:
        number = int(str(value).strip()) if not isinstance(value, (int, float)) else value
    except ValueError:
        number = None
    if number is None or number != int(number) or int(number) < minimum:
        raise ValueError(f"{key}={value!r}: expected a whole number >= {minimum}")
    return int(number)


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    OmegaConf.update(cfg, key, value, force_add=False)


def check_train_config(cfg: DictConfig) -> DictConfig:
    """Check (and coerce in place) the values libraries would assert on: ``trainer.max_epochs``
    (>= 1: the cosine schedule needs a length), ``data.batch_size`` (>= 1), ``data.num_workers``
    (>= 0) and the neuron's numbers (``model.tau=3`` -> 3.0; tau > 1). Returns ``cfg``."""
    trainer = cfg.get("trainer")
    if trainer is not None and trainer.get("max_epochs") is not None:
        _set(cfg, "trainer.max_epochs", positive_int("trainer.max_epochs", trainer.max_epochs))
    data = cfg.get("data")
    if data is not None:
        if data.get("batch_size") is not None:
            _set(cfg, "data.batch_size", positive_int("data.batch_size", data.batch_size))
        if data.get("num_workers") is not None:
            _set(cfg, "data.num_workers", positive_int("data.num_workers", data.num_workers, minimum=0))
    model = cfg.get("model")
    for key in ("tau", "v_threshold", "surrogate_alpha"):
        if model is None or model.get(key) is None:
            continue
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"model.{key}={value!r}: expected a number")
        _set(cfg, f"model.{key}", float(value))
    if model is not None and model.get("tau") is not None and not model.tau > 1.0:
        raise ValueError(f"model.tau={model.tau}: the LIF time constant must be > 1 (the I2E setting is 2.0)")
    return cfg
