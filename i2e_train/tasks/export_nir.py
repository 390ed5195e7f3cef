"""``i2e-export``: a trained network written for other tools, from any checkpoint.

``format=nir`` writes ``model.nir``, the network as a NIR graph for neuromorphic simulators and
hardware (`i2e_train.models.nir_export`), then re-imports that file with SpikingJelly (and
snnTorch), runs it on the validation split and compares it with the network
(`check_nir`, ``nir_check.json``); ``format=safetensors`` writes the weights and model card
of `i2e_train.tasks.export.export_run`. Everything goes into the run folder
(``paths.output_dir``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from i2e_train.files import atomic_write_json
from i2e_train.tasks.export import export_run, model_card

log = logging.getLogger(__name__)

__all__ = ["IMPORTERS", "LOGIT_TOL", "check_nir", "export", "export_from_overrides"]

# Largest |logit difference| between a re-imported graph and the network it was exported from that
# counts as equal (float32; logits are means of T per-step outputs of order 1-10): the head's 1x1
# convolution sums in another order than nn.Linear, and nirtorch adds three or more inputs of a
# node in its own order. A spike that flips is far above it (a weight of fc / T).
LOGIT_TOL = 1e-5
IMPORTERS = ("spikingjelly", "snntorch")


def _nir_metadata(cfg: DictConfig, source: str) -> dict[str, Any]:
    card = model_card(cfg, {}, Path(source).name)
    return {k: card[k] for k in ("data", "num_classes", "converter_ratio", "converter_order", "checkpoint")}


def _importers(check: Any) -> list[str]:
    """The ``check`` option as a list of known importers (a single name is a list of one)."""
    names = [] if check is None else [str(check)] if isinstance(check, str) else [str(c) for c in check]
    unknown = [n for n in names if n not in IMPORTERS]
    if unknown:
        raise ValueError(f"check={names}: unknown importer {unknown[0]!r}; expected some of {list(IMPORTERS)} "
                         "(or [] for no check)")
    return names


def _validation_batches(cfg: DictConfig, batches: int | None):
    """(events [T, B, C, H, W], labels [B]) of the validation split, on the CPU; ``batches`` of them
    (None: all)."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    for i, batch in enumerate(datamodule.val_dataloader()):
        if batches is not None and i >= batches:
            return
        yield datamodule.on_after_batch_transfer(batch, 0)


def check_nir(path: str | Path, model: nn.Module, batches, importers: Sequence[str] = ("spikingjelly",)) -> dict[str, Any]:
    """Run the written graph in each importer on ``batches`` of ``(events, labels)`` and compare it
    with ``model`` in eval mode: the largest |logit difference|, the samples over `LOGIT_TOL`,
    top-1 agreement and accuracy. SpikingJelly fires at ``H >= v_threshold`` like the network;
    importers that follow NIR's ``H > v_threshold`` (snnTorch) are compared with the network under
    that rule (`strict_threshold`), and the samples
    where the two rules part (a membrane exactly at threshold) are counted."""
    from i2e_train.models import nir_export

    _importers(importers)
    model = model.cpu().float().eval()
    graph = nir_export.read_nir(path)
    resolution = [int(v) for v in graph.metadata["input_shape"][1:]]
    strict = nir_export.deploy_graph(model, resolution).strict_threshold()
    runs = {"spikingjelly": nir_export.run_spikingjelly, "snntorch": nir_export.run_snntorch}
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in ("network", "nir_rule", *importers)}
    labels = []
    with torch.no_grad():
        for events, y in batches:
            events = events.cpu().float()
            logits["network"].append(model(events))
            logits["nir_rule"].append(strict.run(events))
            for name in importers:
                logits[name].append(runs[name](graph, events))
            labels.append(y.cpu())
    out = {k: torch.cat(v) for k, v in logits.items()}
    y = torch.cat(labels)
    report: dict[str, Any] = {"samples": int(y.numel()), "tolerance": LOGIT_TOL,
                              "network_top1": float((out["network"].argmax(1) == y).float().mean()),
                              "threshold_ties": int(((out["nir_rule"] - out["network"]).abs().amax(1) > LOGIT_TOL).sum())}
    for name in importers:
        ref = out["network"] if name == "spikingjelly" else out["nir_rule"]
        diff = (out[name] - ref).abs().amax(1)
        report[name] = {"compared_with": "network" if name == "spikingjelly" else "network with NIR's threshold rule",
                        "max_abs_diff": float(diff.max()), "over_tolerance": int((diff > LOGIT_TOL).sum()),
                        "same_top1_as_network": int((out[name].argmax(1) == out["network"].argmax(1)).sum()),
                        "top1": float((out[name].argmax(1) == y).float().mean())}
    return report


def _say_check(report: Mapping[str, Any]) -> None:
    n = report["samples"]
    print(f"network: top-1 {100 * report['network_top1']:.2f}% on {n} validation samples; NIR's threshold rule "
          f"(fire at H > v_threshold, not >=) changes the logits of {report['threshold_ties']} of them", flush=True)
    for name in IMPORTERS:
        r = report.get(name)
        if r is None:
            continue
        line = (f"{name} re-import: {n} samples, max |logit difference| {r['max_abs_diff']:.2e} from the "
                f"{r['compared_with']} (tolerance {LOGIT_TOL:g}), same top-1 as the network on "
                f"{r['same_top1_as_network']}/{n}, top-1 {100 * r['top1']:.2f}%")
        print(line, flush=True)
        if r["over_tolerance"]:
            log.warning("%s: %d of %d samples differ beyond the tolerance (nir_check.json)", name, r["over_tolerance"], n)


def export(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``i2e-export``: the checkpoint ``cfg.ckpt_path`` (its model and data config as
    `checkpoint_config` resolves them) written to the run folder
    ``cfg.paths.output_dir``: ``format=nir`` -> ``model.nir`` (+ ``nir_check.json`` when ``check``
    names importers), ``format=safetensors`` -> ``model.safetensors`` and the model card."""
    from hydra.utils import instantiate

    from i2e_train.models import load_checkpoint
    from i2e_train.models.nir_export import export_nir
    from i2e_train.tasks.evaluate import checkpoint_config

    from i2e_train.tasks.checks import positive_int

    fmt = str(cfg.get("format", "nir"))
    if fmt not in ("nir", "safetensors"):
        raise ValueError(f"format={fmt}: expected nir or safetensors")
    importers = _importers(cfg.get("check"))  # refused before anything is written
    batches = cfg.get("check_batches")
    batches = None if batches is None else positive_int("check_batches", batches)
    cfg, source = checkpoint_config(cfg, overrides)
    out_dir = Path(cfg.paths.output_dir)
    model = instantiate(cfg.model)
    if fmt == "safetensors":
        weights, card = export_run(model, source, cfg, {}, out_dir)
        print(f"checkpoint: {source}\nwritten: {weights}, {card}")
        return {"checkpoint": source, "weights": str(weights)}
    log.info("loaded: %s", load_checkpoint(model, source, cache_dir=cfg.paths.checkpoint_dir))
    path = export_nir(model, out_dir / "model.nir", list(cfg.data.resolution), int(cfg.data.timesteps),
                      _nir_metadata(cfg, source))
    result: dict[str, Any] = {"checkpoint": source, "nir": str(path)}
    print(f"checkpoint: {source}\nwritten: {path}", flush=True)
    if importers:
        report = check_nir(path, model, _validation_batches(cfg, batches), importers)
        atomic_write_json(out_dir / "nir_check.json", report)
        _say_check(report)
        result["check"] = report
    return result


def export_from_overrides(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """`export` for a config composed from ``overrides``; a released weight recomposes it with
    its own model and data config first."""
    from i2e_train.config import compose
    from i2e_train.tasks.evaluate import released_overrides

    if str(cfg.ckpt_path).startswith("released:"):
        extra = released_overrides(str(cfg.ckpt_path), overrides)
        if extra:
            cfg = compose("export", list(overrides) + extra)
    return export(cfg, overrides=overrides)
