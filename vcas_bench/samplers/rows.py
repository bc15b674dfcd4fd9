"""Shared by SB and UB: backpropagate a chosen subset of the batch through the row-skipping engine.

The forward has already run on the full batch. Dropped examples get weight 0 in the loss, so their
gradient is exactly zero in every block below, and every wrapped linear skips zero rows: the
backward of the linears costs ``r`` of the exact one (rho = nu = 1, nothing else is sampled).
"""

from __future__ import annotations

import torch
from torch import nn

from vcas_bench.samplers.base import StepStats, WithoutPhases
from vcas_bench.vcas import Wrapped, keep_ratio_cost, unwrap, wrap
from vcas_bench.vcas.rowsets import fixed_row_set
from vcas_bench.vcas.sampling import to_device


class RowSubsetBackward:
    """Holds the wrapped model; :meth:`backward` runs a weighted backward on the kept rows only."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.wrapped: Wrapped | None = None

    def attach(self, model: nn.Module, block_type: str) -> None:
        # rho = nu = 1 everywhere: the engine only skips the rows that are not kept at the top.
        self.wrapped = wrap(model, block_type, self.generator)

    def detach(self) -> None:
        if self.wrapped is not None:
            unwrap(self.wrapped)
            self.wrapped = None

    def backward(self, losses: torch.Tensor, weights: torch.Tensor) -> float:
        """Backward of ``sum_i weights_i * losses_i`` over the rows with a non-zero weight.

        ``weights`` live on the CPU (SB and UB decide there), so the kept rows are known without a
        device read and every block reuses them (``RowEngine.step_rows``). Returns the keep ratio.
        With no row kept nothing is backpropagated (all gradients stay 0).
        """
        # A host list, not tensor reads: on the CPU nothing here is a device read, and none is counted.
        kept = [i for i, w in enumerate(weights.cpu().tolist()) if w > 0]
        if not kept:
            return 0.0
        engine, device, n = self.wrapped.engine, losses.device, len(weights)
        rows = None if len(kept) == n else fixed_row_set(to_device(torch.tensor(kept), device), n)
        engine.step_rows = rows
        try:
            (losses * to_device(weights, device).to(losses.dtype)).sum().backward()
        finally:
            engine.step_rows = None
        return len(kept) / n


class RowSubsetSampler(WithoutPhases):
    """What SB and UB share: a private generator, the row-skipping engine, and no adaptation phase.

    A subclass decides the per-example loss weights of a batch and calls :meth:`backward_weighted`.
    """

    name = "rows"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = RowSubsetBackward(self.generator)

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        self.rows.attach(model, block_type)

    def backward_weighted(self, losses: torch.Tensor, weights: torch.Tensor) -> StepStats:
        """Backward of the weighted loss over the kept rows; the step's statistics."""
        ratio = self.rows.backward(losses, weights)
        return StepStats(loss=float(losses.detach().mean()), keep_ratio=ratio,
                         analytic_cost=keep_ratio_cost(ratio))

    def detach(self) -> None:
        self.rows.detach()
