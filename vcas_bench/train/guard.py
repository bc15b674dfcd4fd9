"""What protects an output directory while a run writes into it.

:class:`OutputLock`: one writer per ``output_dir``; a second process is refused in one line naming the
holder's PID (an ``fcntl.flock`` lock, released by the kernel however the holder ends, even SIGKILL).
:class:`StopSignals`: SIGINT/SIGTERM only set a flag; the training loop reads it at the next step
boundary, checkpoints (when checkpointing is on) and stops, so an interrupt never tears a step or a
file. A second signal stops at once. :func:`write_status`: ``status.json`` says whether the command is
``running``, ``finished``, ``stopped`` (``trainer.stop_after``), ``interrupted``, ``diverged`` or
``refused`` (a problem found once the data loaded), at
which step and with which last checkpoint, so a sweep's summary shows the jobs that did not finish.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path
from typing import Any

from vcas_bench.errors import UsageError
from vcas_bench.report.files import write_json

__all__ = ["LOCK_NAME", "OutputLock", "StopSignals", "write_status"]

LOCK_NAME = ".vcas-bench.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OutputLock:
    """``with OutputLock(out_dir):`` holds ``out_dir`` for this process or raises :class:`UsageError`."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.handle = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UsageError(
                f"output_dir={self.path.parent}: another vcas-bench process (pid {holder}) is "
                "writing there; wait for it to end or choose another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class StopSignals:
    """``with StopSignals() as stop:`` the first SIGINT/SIGTERM sets ``stop.signum``; a second one raises
    ``KeyboardInterrupt`` at once. Outside the main thread (signals cannot be caught there) it is inert."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # asked twice: do not wait for the step to end
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None


def write_status(out_dir: Path, status: str, **details: Any) -> None:
    """``<out_dir>/status.json``: ``{"status": ..., "pid": ..., **details}`` (sampler, step, checkpoint)."""
    write_json(out_dir / "status.json", {"status": status, "pid": os.getpid(), **details})
