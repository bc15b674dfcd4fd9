"""Measured FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on probe units, extrapolated.

The counter sees every matmul, convolution and attention kernel that actually runs, including the
reduced GEMMs inside VCAS's custom backward, so it measures what the analytic model of docs/method.md §9 only
assumes. Counting costs time (about 5% per step on MiniLM, more on tiny models), so a unit of work
(a training step, or a variance phase) is either *counted* (a probe) or *timed*, never both:

- steps: every ``every``-th step is a probe (offset ``every // 2``, so warm-up steps are not probed);
- phases: every other phase is a probe (phase 1, 3, 5, ...).

Totals are the mean probe count times the number of units of that kind. Within a step, FLOPs up to
the end of the forward (the loss) are ``forward``; the rest ``backward``. Phase FLOPs are overhead.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.flop_counter import FlopCounterMode


class FlopMeter:
    """Counts FLOPs of probe units and extrapolates totals per kind of unit."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.flops: dict[str, float] = defaultdict(float)  # summed over probes, per part
        self.probes: Counter[str] = Counter()
        self.units: Counter[str] = Counter()
        self._counter: FlopCounterMode | None = None
        self._forward: float | None = None  # FLOPs counted when the probe's first loss returned

    def state_dict(self) -> dict[str, Any]:
        return {"flops": dict(self.flops), "probes": dict(self.probes), "units": dict(self.units)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flops = defaultdict(float, state["flops"])
        self.probes, self.units = Counter(state["probes"]), Counter(state["units"])

    def is_probe(self, kind: str, index: int) -> bool:
        if self.every <= 0:
            return False
        return index % self.every == self.every // 2 if kind == "step" else index % 2 == 1

    @contextmanager
    def unit(self, kind: str, probe: bool) -> Iterator[None]:
        """One unit of work of ``kind``; counted when ``probe``."""
        self.units[kind] += 1
        if not probe:
            yield
            return
        with FlopCounterMode(display=False) as counter:
            self._counter = counter
            try:
                yield
            finally:
                self._counter = None
        self.probes[kind] += 1
        total = counter.get_total_flops()
        forward, self._forward = self._forward or 0.0, None
        if kind == "step":
            self.flops["step_forward"] += forward
            self.flops["step_backward"] += total - forward
        else:
            self.flops[kind] += total

    def wrap_loss_fn(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn`` that notes the FLOPs counted so far when it returns: the end of the forward."""

        def counted(batch: Any) -> Any:
            out = loss_fn(batch)
            if self._counter is not None and self._forward is None:
                self._forward = float(self._counter.get_total_flops())
            return out

        return counted

    def totals(self) -> dict[str, float | None]:
        """Extrapolated totals; ``None`` where a kind of unit ran but was never probed."""
        def extrapolate(kind: str, part: str) -> float | None:
            if not self.units[kind]:
                return 0.0
            if not self.probes[kind]:
                return None
            return self.flops[part] / self.probes[kind] * self.units[kind]

        forward = extrapolate("step", "step_forward")
        backward = extrapolate("step", "step_backward")
        overhead = extrapolate("phase", "phase")
        parts = (forward, backward, overhead)
        total = None if any(p is None for p in parts) else sum(parts)
        return {"flops_total": total, "flops_forward": forward, "flops_backward": backward,
                "flops_overhead": overhead, "flops_probes": self.probes["step"] + self.probes["phase"]}
