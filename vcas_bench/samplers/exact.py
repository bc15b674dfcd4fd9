"""``exact``: plain ``loss.backward()``, the reference every other sampler is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vcas_bench.samplers.base import SAMPLERS, LossFn, ReduceFn, StepStats, WithoutPhases, mean_loss_backward


@SAMPLERS.register("exact")
class ExactSampler(WithoutPhases):
    """Full backward on every example."""

    name = "exact"

    @dataclass
    class Settings:
        """``exact`` takes no settings."""

    def __init__(self, settings: Settings, seed: int = 0, reduce_fn: ReduceFn | None = None) -> None:
        self.settings = settings

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        pass

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        losses, _ = loss_fn(batch)
        return StepStats(loss=mean_loss_backward(losses), keep_ratio=1.0, analytic_cost=1.0)

    def detach(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
