"""Wall-clock timing that waits for the device before reading the clock (nanoGPT/timm style).

Units of work (a training step's forward+backward, its optimizer update, a variance phase) are
timed one by one; warm-up steps and FLOP-counting probes are run but not timed. The run's training
time is then ``sum over kinds of mean timed seconds x number of units`` (:meth:`UnitTimer.total`).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock reading covers the work it claims to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UnitTimer:
    """Seconds per kind of unit, over the units that were timed; counts over all units."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.timed: Counter[str] = Counter()
        self.units: Counter[str] = Counter()
        self.timing: str | None = None  # the kind of the unit being timed right now

    @contextmanager
    def unit(self, kind: str, timed: bool = True, part_of_total: bool = True) -> Iterator[None]:
        """One unit of ``kind``; ``part_of_total=False`` for a part timed inside another unit."""
        self.units[kind] += part_of_total
        if not timed:
            yield
            return
        synchronize(self.device)
        start, outer, self.timing = time.perf_counter(), self.timing, kind
        try:
            yield
        finally:
            self.timing = outer
        synchronize(self.device)
        self.seconds[kind] += time.perf_counter() - start
        self.timed[kind] += 1

    def time_forward(self, loss_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``loss_fn`` whose calls inside a timed step are timed as ``forward`` (detail mode).

        The extra synchronisation at the end of the forward is free on CPU; on a GPU it stalls the
        queue once per step, which is why it is optional.
        """

        def timed(batch: Any) -> Any:
            if self.timing != "step":
                return loss_fn(batch)
            with self.unit("forward", part_of_total=False):
                return loss_fn(batch)

        return timed

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "timed": dict(self.timed), "units": dict(self.units)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds = defaultdict(float, state["seconds"])
        self.timed, self.units = Counter(state["timed"]), Counter(state["units"])

    def mean(self, kind: str) -> float | None:
        return self.seconds[kind] / self.timed[kind] if self.timed[kind] else None

    def total(self, kind: str | None = None) -> float:
        """Estimated seconds of all units (of ``kind``), from the mean of the timed ones."""
        kinds = [kind] if kind else list(self.units)
        return sum((self.mean(k) or 0.0) * self.units[k] for k in kinds)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
