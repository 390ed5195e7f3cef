"""Training memory of any spiking network: a ladder of modes, each a measured trade.

One switch per network, `set_memory` (``SNNClassifier(memory=...)``, ``module.memory`` in
the configs), for any ``nn.Module`` on any device. Every mode gives the same losses and
gradients, to the bit, as ``"none"`` (``tests/test_memory_any_net.py`` compares them with
``torch.equal``); they trade memory for work the backward does again. From fastest to leanest:

* ``"none"``: what autograd keeps (our LIF operator keeps only its charged membrane anyway).
* ``"bits"`` (the default of ``SNNClassifier``): only what is free: the spikes a convolution
  keeps become its neuron's ``H >= V_th`` (or 1 bit per spike for other neurons), a max
  pooling's input its shape. No convolution or batch norm runs twice: the arithmetic of
  ``none``, about the same memory traffic, a lower peak.
* ``"recompute"``: besides, whatever costs no convolution work runs again in the backward
  (batch norms, poolings, residual sums, the LIF recurrence), and the cheapest convolutions
  (see `CHEAP_FLOPS_PER_ELEMENT`): the other convolution
  outputs are kept.
* ``"least"``: every layer output runs again from spikes kept as bits.
* ``"auto"``: the cheapest of these whose predicted peak fits a memory budget
  (`choose_memory`, `i2e_train.models.memory_plan`).

The mechanism is one engine for every network and device, `i2e_train.models.recompute`
(``saved_tensors_hooks``: nothing in the networks' code knows about memory). Under
``torch.no_grad`` and ``torch.compile`` every mode runs the plain forward. ``"bits+checkpoint"``,
the name of an earlier mode, is read as ``"least"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from . import recompute

__all__ = ["MEMORY_MODES", "check_memory_mode", "memory_mode", "set_memory"]

MEMORY_MODES = ("none", "bits", "recompute", "least", "auto")
_ALIASES = {"bits+checkpoint": "least"}


def check_memory_mode(mode: str) -> str:
    """``mode`` if it is one of `MEMORY_MODES` (an earlier name read as its mode), else a
    ``ValueError`` naming them."""
    mode = _ALIASES.get(mode, mode)
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}; expected one of {', '.join(map(repr, MEMORY_MODES))}")
    return mode


def memory_mode(model: nn.Module) -> str:
    """The memory mode ``model`` runs in (``"auto"`` once chosen: the chosen rung)."""
    return getattr(model, "_i2e_memory", "none")


def set_memory(model: nn.Module, mode: str) -> int:
    """Put ``model`` (any network) in memory mode ``mode`` (see the module docstring).

    Installs, once, the forward hooks of the engine (`i2e_train.models.recompute`) on the
    network, its recomputable layers and its binary spiking neurons; ``"none"`` leaves them idle.
    ``"auto"`` runs ``"bits"`` until `choose_memory` picks a
    rung (``SNNClassifier`` does it before the first training step). Returns how many layers take part.
    """
    mode = check_memory_mode(mode)
    model._i2e_memory = mode
    _install(model.register_forward_pre_hook, _root_pre, model)
    _install(model.register_forward_hook, _root_post, model, always_call=True)
    count = 0
    for m in model.modules():
        if isinstance(m, recompute.RECOMPUTABLE) and m is not model:
            _install(m.register_forward_pre_hook, recompute.layer_pre, m)
            _install(m.register_forward_hook, recompute.layer_post, m)
        elif recompute.is_binary_neuron(m):
            _install(m.register_forward_hook, recompute.neuron_post, m)
        else:
            continue
        count += 1
    return count


def _install(register: Callable, hook: Callable, module: nn.Module, **kwargs: Any) -> None:
    """``register(hook)`` unless ``hook`` is already one of ``module``'s forward (pre-)hooks."""
    if not any(h is hook for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())):
        register(hook, **kwargs)


def _root_pre(model: nn.Module, args: tuple) -> None:
    """Before the network's forward: start the engine in the network's rung."""
    mode = getattr(model, "_i2e_memory", "none")
    if mode == "none":
        return
    rung = recompute.RUNGS["bits" if mode == "auto" else mode]
    recompute.start(args[0] if args else None, model, rung)


def _root_post(model: nn.Module, args: tuple, out: Any) -> None:
    recompute.stop(model)
