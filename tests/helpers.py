"""What many tests share: running an entry point in a subprocess, training a composed config in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest


def cli_env(root: str | os.PathLike, **extra: str) -> dict[str, str]:
    """The environment of an entry point run under ``root`` (its logs/, data/, checkpoints/)."""
    return dict(os.environ, I2E_ROOT=str(root), PYTHONWARNINGS="ignore", **extra)


def run_cli(module: str, *args: str, cwd: str | os.PathLike, timeout: float = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``cwd`` (I2E_ROOT=cwd unless ``env`` is given), in its own
    process group so that a hang also ends the processes it started (DDP ranks, loader workers).
    ``check``: fail the test with the end of the output when the exit status is not 0."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{module} timed out after {timeout} s\n{err[-3000:]}")
    if check and proc.returncode != 0:
        pytest.fail(f"{module} {' '.join(args)} exited with {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_in_process(root: Path, monkeypatch, *overrides: str, run_dir: str = "run") -> tuple[dict[str, Any], Path]:
    """``i2e-train <overrides>`` without a subprocess: the composed config run by
    :func:`i2e_train.tasks.train.train` with its folders under ``root``. Returns (result, run folder)."""
    from i2e_train.config import compose
    from i2e_train.tasks.train import train

    monkeypatch.setenv("I2E_ROOT", str(root))
    out = root / run_dir
    cfg = compose("train", [*overrides, f"paths.output_dir={out}"])
    return train(cfg), out


def compose_in(root: Path, monkeypatch, config: str, overrides: Sequence[str], run_dir: str = "run"):
    """A composed config whose folders (paths.*) are under ``root`` and whose run folder is ``root/run_dir``."""
    from i2e_train.config import compose

    monkeypatch.setenv("I2E_ROOT", str(root))
    return compose(config, [*overrides, f"paths.output_dir={root / run_dir}"])


def save_official_checkpoint(net, path: Path, epoch: int = 255, best_acc1: float = 85.07) -> Path:
    """``net``'s weights in the layout of the official training scripts' ``.pth.tar`` (a released
    weight): DDP's ``module.`` prefix, the in-model I2E convolution's weight, epoch and best_acc1."""
    import torch

    state = {"module." + k: v for k, v in net.state_dict().items()}
    state["module.i2e.weight"] = torch.zeros(8, 1, 3, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "state_dict": state, "best_acc1": best_acc1}, path)
    return path
