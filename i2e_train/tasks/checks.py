"""Config values checked (and coerced where the meaning is clear) before any library sees them,
so a bad value is one error naming its key instead of an ``assert`` deep inside timm, Lightning
or SpikingJelly, or a message that names no key. Run before anything is written and before any
data loads: by the entry points before Hydra makes the run folder, and again by
[`i2e_train.tasks.train.train`][i2e_train.tasks.train.train] and
[`i2e_train.tasks.evaluate.evaluate`][i2e_train.tasks.evaluate.evaluate].

`RULES` holds one rule per numeric key the configs (every experiment's included) use;
``tests/test_security.py`` checks that no numeric key of any composed experiment is without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["check_train_config", "positive_int", "data_label", "RULES", "UNCHECKED", "Rule"]


def data_label(data: Any) -> str:
    """The data config as an error names it: its dataset name, else (``data=local`` before its card
    is read) the folder it reads."""
    return str(data.get("name") or f"data.path={data.get('path')}")


@dataclass(frozen=True)
class Rule:
    """What a numeric key may hold: a whole number (``whole``) or any finite number, within
    ``low`` .. ``high`` (``low_open`` / ``high_open``: the bound itself excluded); ``optional``:
    null allowed; ``message``: said instead of the range when the value is outside it."""

    whole: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    message: str | None = None

    def describe(self) -> str:
        what = "a whole number" if self.whole else "a number"
        low, high = (f"{int(b)}" if self.whole else f"{b:g}" for b in (self.low or 0, self.high or 0))
        if self.low is not None and self.high is not None:
            if self.whole:
                return f"{what} in {low}..{high}"
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        return what

    def inside(self, x: float) -> bool:
        low_ok = self.low is None or (x > self.low if self.low_open else x >= self.low)
        high_ok = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return low_ok and high_ok


_SEED = Rule(True, 0, 2**32 - 1)  # Lightning's seed_everything range (outside it: a random seed, a warning)
_COUNT, _COUNT0 = Rule(True, 1), Rule(True, 0)
_POSITIVE, _NONNEG = Rule(False, 0, low_open=True), Rule(False, 0)
_FRACTION = Rule(False, 0, 1)

# key (``[]``: each item of a list) -> its rule; checked in this order (a key another interpolates first)
RULES: dict[str, Rule] = {
    "seed": _SEED,
    "trainer.max_epochs": _COUNT,  # the cosine schedule needs a length
    "trainer.num_nodes": _COUNT,
    "trainer.log_every_n_steps": _COUNT,
    "trainer.check_val_every_n_epoch": Rule(True, 1, optional=True),
    "trainer.accumulate_grad_batches": _COUNT,
    "trainer.gradient_clip_val": Rule(False, 0, optional=True),
    "optim.lr": Rule(False, 0, low_open=True, message="the learning rate must be a finite number > 0 (e.g. 0.1)"),
    "optim.weight_decay": _NONNEG,
    "optim.momentum": Rule(False, 0, 1),
    "scheduler.t_initial": _COUNT,
    "scheduler.lr_min": _NONNEG,
    "scheduler.warmup_t": _COUNT0,
    "scheduler.warmup_lr_init": _NONNEG,
    "data.seed": _SEED,
    "data.batch_size": _COUNT,
    "data.num_workers": _COUNT0,
    "data.build_workers": _COUNT0,
    "data.num_classes": _COUNT,
    "data.timesteps": _COUNT,
    "data.frames_number": _COUNT,
    "data.resolution[]": _COUNT,
    "data.source_size": _COUNT,
    "data.test_resize": Rule(True, 1, optional=True),
    "data.crop_padding": _COUNT0,
    "data.hflip": _FRACTION,
    "data.val_fraction": Rule(False, 0, 1, high_open=True),
    "data.train_ratio": Rule(False, 0, 1, low_open=True),
    "data.rrc_scale[]": Rule(False, 0, 1, low_open=True),
    "data.rrc_ratio[]": _POSITIVE,
    "data.encoder.ratio": Rule(False, 0, message="the threshold ratio must be a finite number >= 0 (e.g. 0.07)"),
    "data.encoder.order": Rule(True, 0, 5),
    "model.num_classes": _COUNT,
    "model.in_channels": _COUNT,
    "model.timesteps": _COUNT,  # (SpikingJelly zoo configs)
    "model.resolution[]": _COUNT,
    "model.tau": Rule(False, 1, low_open=True, message="the LIF time constant must be > 1 (the I2E setting is 2.0)"),
    "model.v_threshold": Rule(False),
    "model.v_reset": Rule(False, optional=True),
    "model.surrogate_alpha": _POSITIVE,
    "module.num_classes": _COUNT,
    "module.label_smoothing": Rule(False, 0, 1, high_open=True),
    "module.batch_transform.keep": _COUNT0,
    "callbacks.model_checkpoint.save_top_k": Rule(True, -1),
    "callbacks.step_checkpoint.every_n_train_steps": Rule(True, 1, optional=True),
    "callbacks.model_summary.max_depth": Rule(True, -1),
    "callbacks.progress_bar.refresh_rate": _COUNT0,
    "callbacks.event_media.num_samples": _COUNT0,
    "callbacks.event_media.fps": _POSITIVE,
    "callbacks.event_media.every_n_epochs": _COUNT,
}
# numeric keys no library asserts on, read for information only
UNCHECKED = {"paper_top1": "the paper's top-1 of the released weight, informational", "trainer.devices":
             "an int, a list of ids or 'auto': Lightning checks it and names it"}
_ABSENT = object()


def _number(key: str, value: Any, rule: Rule) -> int | float:
    """``value`` as the number ``rule`` asks for (``"8"`` and ``8.0`` are taken as 8 for a whole
    number); ValueError naming ``key``."""
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, (int, float)) else float(str(value).strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or (rule.whole and number != int(number)):
        raise ValueError(f"{key}={value!r}: expected {rule.describe()}")
    number = int(number) if rule.whole else number
    if not rule.inside(number):
        raise ValueError(f"{key}={number!r}: {rule.message or 'expected ' + rule.describe()}")
    return number


def positive_int(key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (``"8"`` and ``8.0`` are accepted); ValueError naming ``key``."""
    return int(_number(key, value, Rule(True, minimum)))


def _check_key(cfg: DictConfig, key: str, rule: Rule) -> None:
    path = key.removesuffix("[]")
    value = OmegaConf.select(cfg, path, default=_ABSENT)
    if value is _ABSENT or (value is None and rule.optional):
        return
    if key.endswith("[]") and isinstance(value, ListConfig):
        items = [_number(f"{path}[{i}]", v, rule) for i, v in enumerate(value)]
        if items != list(value) or any(type(a) is not type(b) for a, b in zip(items, value)):
            OmegaConf.update(cfg, path, items, force_add=False)
        return
    if key.endswith("[]") or path == "data.encoder.order":  # a single item, or an order given as 8 group indices
        if isinstance(value, (list, ListConfig)):
            return
    number = _number(key.removesuffix("[]"), value, rule)
    if number != value or type(number) is not type(value):
        OmegaConf.update(cfg, path, number, force_add=False)


def check_train_config(cfg: DictConfig) -> DictConfig:
    """Check (and coerce in place) every value of `RULES` that ``cfg`` holds (``model.tau=3``
    -> 3.0; ``data.batch_size="8"`` -> 8), and the optimiser's momentum against its kind. Returns
    ``cfg``; ValueError naming the first bad key, its value and what it should be."""
    for key, rule in RULES.items():
        _check_key(cfg, key, rule)
    optim = cfg.get("optim")
    if optim is not None and str(optim.get("opt", "")).lower() in ("sgd", "nesterov") and optim.get("momentum") == 0:
        raise ValueError(f"optim.momentum=0.0: optim.opt={optim.opt} is SGD with Nesterov momentum (timm), which "
                         "needs momentum > 0; for plain SGD without momentum use optim.opt=momentum")
    return cfg
