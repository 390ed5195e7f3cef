"""cuDNN autotuning and TF32 matmuls on CUDA, as the official training scripts set them."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["CudaMath"]

log = logging.getLogger(__name__)


class CudaMath(Callback):
    """For the run on a CUDA device: ``torch.backends.cudnn.benchmark`` (unless the run is
    deterministic) and ``torch.backends.cuda.matmul.allow_tf32``, the official scripts' settings
    (``cudnn.benchmark = True`` unless ``--deterministic``; ``matmul.allow_tf32 = True``).

    Set at ``setup`` and put back as they were at ``teardown``, and only when the trainer's
    device is CUDA: CPU runs, and the process after the run, are not affected. Added by the
    ``trainer.cuda_math`` block of the gpu / ddp trainer configs (`i2e_train.tasks.train.make_trainer`).

    Both change float rounding on the GPU (not on CPU): the autotuner may pick another
    convolution algorithm from run to run, and TF32 matmuls (the linear head) keep 10 mantissa bits.
    """

    def __init__(self, cudnn_benchmark: bool = True, allow_tf32: bool = True) -> None:
        self.cudnn_benchmark, self.allow_tf32 = bool(cudnn_benchmark), bool(allow_tf32)
        self._saved: tuple[bool, bool] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cuda" or self._saved is not None:
            return
        self._saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.backends.cudnn.benchmark = self.cudnn_benchmark and not deterministic
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        log.info("CUDA: cudnn.benchmark=%s, matmul.allow_tf32=%s", torch.backends.cudnn.benchmark, self.allow_tf32)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._saved is not None:
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = self._saved
            self._saved = None
