"""Exceptions the CLI turns into one clear line and a non-zero exit (no traceback)."""
from __future__ import annotations


class PipelineError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class StageSkipped(Exception):
    """Raised by a stage that cannot run here (e.g. no GPU for TensorRT); carries the reason."""


class TrainingDiverged(PipelineError):
    """Loss became NaN/inf; the last good checkpoint is kept."""
