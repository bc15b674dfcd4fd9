"""Peak memory: of one unit of work above what was allocated when it started, and of a whole run.

On CUDA this is the allocator's own peak counter. On the CPU there is none, so the PyTorch profiler
records every allocation and free of the unit (``profile_memory=True``) and the peak of their running
sum is taken. Both count only tensor memory that the unit allocates (activations saved for backward,
gradients, temporaries), not what was resident before (weights, optimizer state, the batch).
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_memory_bytes", "peak_memory_mb", "reset_peak_memory"]


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Run ``fn()`` once and return the peak bytes it allocated above the starting level."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()  # negative for a free
        peak = max(peak, level)
    return int(peak)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory of this run, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is in KiB on Linux and covers the whole process, not one run: labelled as such.
    return {"process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
