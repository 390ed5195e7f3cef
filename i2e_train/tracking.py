"""Experiment tracking: a wandb logger whose run id survives resumes, and the run facts
(resolved config, parameter counts, hardware) that every tracker receives at the start.

``wandb_logger`` is the ``_target_`` of ``configs/logger/wandb.yaml``. It keeps the wandb run id
in ``<save_dir>/wandb_id.txt`` (the run folder), so that ``ckpt_path=last`` in the same folder
continues the same wandb run (``id=<saved id>``, ``resume="allow"``). Offline when
``WANDB_MODE=offline`` (or ``dryrun``) or when ``offline=true`` is asked; the offline run lies
in ``<save_dir>/wandb/offline-run-<time>-<id>/`` (upload it later with ``wandb sync``).

Under a wandb sweep agent the id comes from ``WANDB_RUN_ID`` (set by the agent), which wins
over the saved one.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger

from i2e_train.files import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["CSVLogger", "ID_FILE", "wandb_logger", "wandb_run_id", "hardware_info", "parameter_counts", "finish_wandb",
           "lif_backends", "torch_reference_warning"]

ID_FILE = "wandb_id.txt"
_OFFLINE_MODES = ("offline", "dryrun")


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _new_id(length: int = 8) -> str:
    """A fresh run id in wandb's alphabet (lowercase letters and digits)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_run_id(save_dir: str | Path, id: str | None = None, id_file: str = ID_FILE) -> str:
    """The wandb run id of the run folder ``save_dir``: ``id`` if given, else ``WANDB_RUN_ID``
    (sweep agents), else the one saved in ``<save_dir>/<id_file>``, else a new one. Saved
    (rank 0) so that a resumed run in the same folder finds it."""
    path = Path(save_dir) / id_file
    saved = path.read_text().strip() if path.is_file() else ""
    run_id = id or os.environ.get("WANDB_RUN_ID") or saved
    if not run_id:
        run_id = _new_id()
    if run_id != saved and _is_rank_zero():
        atomic_write_text(path, run_id + "\n")
    return run_id


def wandb_logger(
    save_dir: str | Path,
    project: str = "i2e-train",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    offline: bool = False,
    mode: str | None = None,
    log_model: bool | str = False,
    id: str | None = None,
    entity: str | None = None,
    job_type: str | None = None,
    notes: str | None = None,
    id_file: str = ID_FILE,
    **kwargs: Any,
):
    """A Lightning ``WandbLogger`` with a persistent run id.

    Args:
        save_dir: the run folder; wandb writes ``<save_dir>/wandb/`` and the id goes to
            ``<save_dir>/<id_file>``.
        name: display name; the run id is appended (``train-3kx9a2bq``) so names stay unique.
        group: wandb group; None: the experiment chosen in this Hydra run (``cifar10/baseline2``), if any.
        tags: wandb tags (configs: ``${tags}``).
        offline: log to disk only. Also implied by ``mode`` (default: env ``WANDB_MODE``) in
            ``offline``/``dryrun``; model checkpoints are then not uploaded (``log_model`` off).
        id: force a run id (default: see `wandb_run_id`).
        kwargs: passed to ``wandb.init`` through the logger (``config``, ``resume``, ...).
    """
    from lightning.pytorch.loggers import WandbLogger

    offline, log_model = _offline(offline, mode, log_model)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    run_id = wandb_run_id(save_dir, id=id, id_file=id_file)
    if name:
        name = f"{name}-{run_id}"
    if not group:
        group = _experiment_name()
    if "wandb" in sys.modules:  # a run left open by an earlier job of this process (pipeline stages)
        import wandb

        if wandb.run is not None and wandb.run.id != run_id:
            wandb.finish()
    kwargs.setdefault("resume", "allow")
    return WandbLogger(
        save_dir=str(save_dir),
        project=project,
        name=name,
        id=run_id,
        offline=offline,
        log_model=log_model,
        group=str(group) if group else None,
        tags=[str(t) for t in tags] if tags else None,
        entity=entity,
        job_type=job_type,
        notes=notes,
        **kwargs,
    )


def _offline(offline: bool, mode: str | None, log_model: bool | str) -> tuple[bool, bool | str]:
    """(offline, log_model): offline when asked or ``mode`` (default: env WANDB_MODE) says so;
    then no checkpoint upload."""
    mode = (mode if mode is not None else os.environ.get("WANDB_MODE", "")) or ""
    offline = bool(offline) or mode.lower() in _OFFLINE_MODES
    if offline and log_model:
        log.warning("wandb is offline: log_model=%s ignored (checkpoints cannot be uploaded)", log_model)
        log_model = False
    return offline, log_model


def _experiment_name() -> str | None:
    """The ``experiment=`` choice of the current Hydra run (None outside Hydra or without one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("experiment")
            return str(choice) if choice else None
    except Exception:  # noqa: BLE001 - grouping is cosmetic, never a reason to fail a run
        pass
    return None


def finish_wandb(exit_code: int | None = None) -> None:
    """Close the active wandb run, if any (the next job of a multirun then starts its own run
    instead of silently reusing this one)."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


# --------------------------------------------------------------------------- run facts
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def hardware_info(trainer: Any = None) -> dict[str, Any]:
    """CPU/GPU names, device counts and the versions of the main libraries (+ the trainer's
    accelerator, device count and precision when given)."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu_count": len(gpus),
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lightning": _version("lightning"),
        "spikingjelly": _version("spikingjelly"),
        "i2e_train": _version("i2e-train"),
    }
    if trainer is not None:
        info.update(
            accelerator=type(trainer.accelerator).__name__,
            strategy=type(trainer.strategy).__name__,
            num_devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            world_size=trainer.world_size,
            precision=str(trainer.precision),
        )
    return info


def parameter_counts(model: Any) -> dict[str, int]:
    """Total, trainable and frozen parameter counts of a module."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# SpikingJelly neuron classes -> their operator family in ``neuron_implementation``
_SJ_NEURON_TYPES = {"IFNode": "if", "LIFNode": "lif", "ParametricLIFNode": "plif", "QIFNode": "qif",
                    "EIFNode": "eif", "IzhikevichNode": "izhikevich", "CLIFNode": "clif"}


def _sj_neuron_type(module: Any) -> str | None:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("spikingjelly.") and cls.__name__ in _SJ_NEURON_TYPES:
            return _SJ_NEURON_TYPES[cls.__name__]
    return None


def lif_backends(model: Any, device: Any, query: Any = None) -> dict[str, str]:
    """Which implementation trains each spiking-neuron type of ``model`` on ``device``:
    ``{"LIFNode": "triton"}`` etc. On CUDA SpikingJelly's selection (``triton``, ``cuda`` (its
    CuPy/native kernels) or ``torch``, its reference: about a dozen kernels per time step), from
    ``spikingjelly.activation_based.functional.neuron_implementation`` (``query``); on CPU
    ``fused-cpu`` (i2e_train's compiled kernel: ``node.fast`` and ``I2E_CPU_KERNELS`` not ``0``) or
    ``torch-reference``."""
    import torch

    device = torch.device(device)
    found: dict[str, str] = {}
    for m in model.modules():
        kind = _sj_neuron_type(m)
        name = type(m).__name__
        if kind is None or name in found:
            continue
        if device.type == "cuda":
            if query is None:
                from spikingjelly.activation_based.functional import neuron_implementation as query
            found[name] = str(query(kind, device)["implementation"])
        else:
            fused = getattr(m, "fast", False) and kind == "lif" and os.environ.get("I2E_CPU_KERNELS", "1").strip() != "0"
            found[name] = "fused-cpu" if fused else "torch-reference"
    return found


def torch_reference_warning(backends: dict[str, str], device: Any) -> str | None:
    """The warning for a CUDA run whose neurons train on SpikingJelly's torch reference, or None."""
    slow = sorted(n for n, impl in backends.items() if impl.startswith("torch"))
    if not slow or str(device).split(":")[0] != "cuda":
        return None
    return (f"{', '.join(slow)} train with SpikingJelly's torch reference on {device} (its Triton / CUDA kernels "
            "are unavailable here: see SpikingJelly's log, 'ops selection ... unavailable'), several times "
            "slower per step; install triton (or cupy) for this CUDA version, or set "
            "SJ_LIF_CUDA_IMPLEMENTATION=triton to fail instead of falling back.")


# --------------------------------------------------------------------------- CSV
def _csv_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that keeps the rows already in ``metrics.csv``.

    Lightning deletes an existing ``metrics.csv`` when a logger starts in a non-empty folder,
    so a run resumed in its own folder (``ckpt_path=last``) would lose the epochs before the
    checkpoint (and its learning curves with them). This one reads the old rows first and
    writes them back ahead of the new ones."""

    @property
    def experiment(self):
        fresh = self._experiment is None
        old: list[dict[str, Any]] = []
        if fresh and _is_rank_zero():
            import csv

            path = Path(self.log_dir) / "metrics.csv"
            if path.is_file():
                with open(path, newline="") as f:
                    old = [{k: _csv_value(v) for k, v in row.items() if k and v not in ("", None)}
                           for row in csv.DictReader(f)]
        import warnings

        with warnings.catch_warnings():  # "previous log files will be deleted": not here, they are kept
            warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted.*")
            exp = super().experiment
        if old and hasattr(exp, "metrics"):
            exp.metrics[:0] = old
        return exp


def find_wandb_logger(trainer: Any):
    """The first ``WandbLogger`` attached to the trainer, or None."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
