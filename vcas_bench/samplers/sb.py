"""``sb``: Selective Backprop (Jiang et al. 2019, "Accelerating deep learning by focusing on the
biggest losers"), as the VCAS paper compares against it (docs/method.md §12).

Forward the full batch; keep example ``i`` with probability ``CDF_R(loss_i) ** beta``, the loss's
percentile among the last ``R`` losses seen (``beta = 2`` keeps about 1/3); backpropagate the kept
examples with their unweighted mean loss. Biased by design, as published. ``fixed_ratio`` keeps
exactly ``ceil(N * ratio)`` examples, drawn without replacement with those probabilities as weights,
which matches the paper's FLOPs accounting ``1 - (1 + 2r)/3``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from vcas_bench.samplers.base import SAMPLERS, LossFn, ReduceFn, StepStats
from vcas_bench.samplers.rows import RowSubsetSampler


def loss_percentiles(losses: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Fraction of ``history`` at or below each loss (the empirical CDF)."""
    if history.numel() == 0:
        return torch.ones_like(losses)
    return (history.unsqueeze(0) <= losses.unsqueeze(1)).float().mean(dim=1)


def selection_probabilities(losses: torch.Tensor, history: torch.Tensor, beta: float) -> torch.Tensor:
    """``P_i = CDF_R(loss_i) ** beta``: the expected kept fraction is ``1 / (beta + 1)``."""
    return loss_percentiles(losses, history).pow(beta)


@SAMPLERS.register("sb")
class SelectiveBackpropSampler(RowSubsetSampler):
    """Backpropagate only high-loss examples, unweighted."""

    name = "sb"

    @dataclass
    class Settings:
        beta: float = 2.0  # selectivity: keeps 1/(beta+1) in expectation
        history: int = 1024  # R, number of recent losses the percentile is taken over
        fixed_ratio: float | None = None  # keep exactly ceil(N * ratio) per batch instead

        def __post_init__(self) -> None:
            bad = [f"beta={self.beta}"] if self.beta < 0 else []
            bad += [f"history={self.history}"] if self.history < 1 else []
            if self.fixed_ratio is not None and not 0 < self.fixed_ratio <= 1:
                bad.append(f"fixed_ratio={self.fixed_ratio}")
            if bad:
                raise ValueError(f"invalid sb settings: {', '.join(bad)}")

    def __init__(self, settings: Settings, seed: int = 0, reduce_fn: ReduceFn | None = None) -> None:
        # Each rank decides per example from its own batch: nothing to agree on, reduce_fn is unused.
        self.settings = settings
        super().__init__(seed)
        self.history: deque[float] = deque(maxlen=settings.history)

    def select(self, losses: torch.Tensor) -> torch.Tensor:
        """Bool keep mask for one batch; updates the loss history."""
        values = losses.detach().float().cpu()
        p = selection_probabilities(values, torch.tensor(list(self.history)), self.settings.beta)
        self.history.extend(values.tolist())
        if self.settings.fixed_ratio is None:
            return torch.rand(p.shape, generator=self.generator) < p
        count = math.ceil(len(p) * self.settings.fixed_ratio)
        chosen = torch.multinomial(p + 1e-12, count, replacement=False, generator=self.generator)
        return torch.zeros(len(p), dtype=torch.bool).index_fill_(0, chosen, True)

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        losses, _ = loss_fn(batch)
        keep = self.select(losses)  # on the CPU: the backward needs no device read to find the rows
        weights = keep.float() / keep.sum().clamp_min(1)  # unweighted mean over the kept examples
        return self.backward_weighted(losses, weights)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.generator.set_state(state["generator"])
