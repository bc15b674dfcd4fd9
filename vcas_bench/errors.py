"""The errors the CLI turns into one line and an exit status instead of a traceback.

``UsageError``: the command asks for something that cannot run (exit 2), found before training or
right after the data loads. ``RunInterrupted``: SIGINT/SIGTERM stopped a run at a step boundary
(exit 128 + the signal's number, the shell's convention: 130, 143). ``RunDiverged``: a non-finite loss,
gradient norm or weight stopped a run before it could be saved (exit 1).
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["RunDiverged", "RunInterrupted", "UsageError"]


class UsageError(ValueError):
    """A one-line message naming the setting, its value and what is allowed."""


class RunInterrupted(Exception):
    """A signal ended the run at a step boundary; the message says where it stopped and how to resume."""

    def __init__(self, message: str, signum: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.signum, self.details = signum, details or {}  # details: step, total_steps, last_checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class RunDiverged(FloatingPointError):
    """A loss, gradient norm or parameter became NaN/inf; the message names the step and last checkpoint."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None) -> None:
        super().__init__(message)
        self.step, self.last_checkpoint = step, last_checkpoint
