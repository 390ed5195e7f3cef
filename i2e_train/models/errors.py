"""The errors raised while locating, reading or loading weights."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointFormatError", "CheckpointDamagedError", "ReleasedWeightsUnavailable"]


class CheckpointError(RuntimeError):
    """Base class of the errors raised while locating or reading weights."""


class CheckpointFormatError(CheckpointError, ValueError):
    """The file could not be read or holds no recognisable state dict."""


class CheckpointDamagedError(CheckpointFormatError):
    """The file cannot be read as a checkpoint at all: truncated, corrupt, or of another format
    (not a refusal of what it holds)."""


class ReleasedWeightsUnavailable(CheckpointError, FileNotFoundError):
    """A released weight is neither in the cache folder nor downloadable right now."""
