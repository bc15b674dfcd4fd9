"""Wall-clock timing that waits for the device before reading the clock (nanoGPT/timm style)."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock reading covers the work it claims to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates seconds per named phase; phases inside ``skip`` calls are not recorded."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def time(self, phase: str, record: bool = True):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        if record:
            self.seconds[phase] += time.perf_counter() - start
            self.counts[phase] += 1

    def total(self) -> float:
        return sum(self.seconds.values())


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory of this run, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is in KiB on Linux and covers the whole process, not one run: labelled as such.
    return {"process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
