"""Lightning callbacks, one per file (configs/callbacks/default.yaml; the recovery ones are added
to every run by `i2e_train.recovery.recovery_callbacks`).

What a run tells a person:

* [`SpikeStats`][i2e_train.callbacks.SpikeStats]: firing rate of every spiking layer and synaptic operations per sample,
  measured on the validation set (``spikes/*`` metrics, ``spike_stats.json``, ``spike_rates.png``).
* [`EventMediaLogger`][i2e_train.callbacks.EventMediaLogger]: a few validation samples as event animations and the confusion
  matrix, logged to Weights & Biases (does nothing without a ``WandbLogger``).
* [`LearningCurves`][i2e_train.callbacks.LearningCurves]: train / validation loss and top-1 per epoch as a PNG at the end of fit.
* [`RunInfo`][i2e_train.callbacks.RunInfo]: the resolved config, parameter counts, hardware and the neuron back-ends
  sent to every logger at the start of fit.
* [`StepLossProgressBar`][i2e_train.callbacks.StepLossProgressBar]: the TQDM bar with the training loss, read once per refresh.
* [`ModelSummary`][i2e_train.callbacks.ModelSummary]: Lightning's model summary without its column of zero FLOPs.

What keeps a run recoverable:

* [`StepCheckpoint`][i2e_train.callbacks.StepCheckpoint]: ``last.ckpt`` every N optimiser steps (mid-epoch recovery points).
* [`RestoreRNGState`][i2e_train.callbacks.RestoreRNGState]: RNG states saved in checkpoints and restored on resume.
* [`StopOnNonFinite`][i2e_train.callbacks.StopOnNonFinite]: stop at a NaN/Inf loss; never checkpoint NaN/Inf weights.
* [`BadRecordsReport`][i2e_train.callbacks.BadRecordsReport]: records skipped under ``data.on_bad_record=skip``, counted and written.
* [`StreamEpoch`][i2e_train.callbacks.StreamEpoch]: the epoch reaches a streaming training set (a new shuffle order each epoch).

What a run on a GPU sets as the official scripts do:

* [`CudaMath`][i2e_train.callbacks.CudaMath]: cuDNN autotuning (unless deterministic) and TF32 matmuls, for the run only
  (the gpu / ddp trainer configs' ``cuda_math`` block).

All of them are cheap: SpikeStats hooks the network during validation epochs only, media and
plots are made on rank 0.
"""

from .bad_records import BadRecordsReport
from .cuda_math import CudaMath
from .event_media import EventMediaLogger
from .learning_curves import LearningCurves
from .model_summary import ModelSummary
from .nonfinite import NonFiniteLossError, StopOnNonFinite
from .progress import StepLossProgressBar
from .rng_state import RestoreRNGState, rng_states, set_rng_states
from .run_info import RunInfo
from .stream_epoch import StreamEpoch
from .spike_stats import SpikeStats, spiking_layers
from .step_checkpoint import StepCheckpoint

__all__ = ["SpikeStats", "StreamEpoch", "EventMediaLogger", "LearningCurves", "RunInfo", "StepCheckpoint", "RestoreRNGState",
           "StopOnNonFinite", "NonFiniteLossError", "BadRecordsReport", "rng_states", "set_rng_states",
           "spiking_layers", "CudaMath", "StepLossProgressBar", "ModelSummary"]
