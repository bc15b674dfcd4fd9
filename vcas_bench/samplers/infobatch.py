"""``infobatch``: InfoBatch (Qin et al., ICLR 2024, "InfoBatch: Lossless Training Speed Up by Unbiased
Dynamic Data Pruning"), a data-level baseline beside SB and UB (method card: ``infobatch.md``).

At the start of every epoch each example whose last recorded loss is below the mean of the recorded
losses ("well-learned") is pruned with probability ``r``; pruned examples are not loaded, forwarded or
backpropagated in that epoch. The well-learned examples that stay have their loss multiplied by
``1 / (1 - r)``, so the epoch's expected gradient is the full data's at the recorded losses. Annealing:
only epochs that end within the first ``delta`` of training are pruned; the rest see all the data.

The runner's data stream asks :meth:`InfoBatchSampler.plan_epoch` for each epoch's rows
(:class:`vcas_bench.train.data.EpochPlanner`); batches carry the rows' dataset ``index``, which keys
the loss table. The plan of the current epoch is part of the state, so a resumed run replays it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vcas_bench.samplers.base import SAMPLERS, LossFn, ReduceFn, StepStats, WithoutPhases

__all__ = ["InfoBatchSampler", "well_learned", "prune_plan"]


def well_learned(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Rows whose last recorded loss is below the mean of all recorded losses; unseen rows never are."""
    if not bool(seen.any()):
        return torch.zeros_like(seen)
    return seen & (scores < scores[seen].mean())


def prune_plan(order: torch.Tensor, well: torch.Tensor, ratio: float, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept rows in ``order``'s order, their loss weights): each well-learned row is pruned with
    probability ``ratio`` (an independent draw per row) and kept ones are weighted ``1 / (1 - ratio)``."""
    candidate = well[order]
    pruned = candidate & (torch.rand(len(order), generator=generator) < ratio)
    kept = order[~pruned]
    weights = torch.where(candidate[~pruned], 1.0 / (1.0 - ratio), 1.0)
    return kept, weights


@SAMPLERS.register("infobatch")
class InfoBatchSampler(WithoutPhases):
    """Soft pruning of well-learned examples with rescaling and annealing; a plain backward otherwise."""

    name = "infobatch"

    @dataclass
    class Settings:
        ratio: float = 0.5  # r: probability that a well-learned example is pruned in an epoch
        delta: float = 0.875  # prune only in the epochs that end within this fraction of training
        epochs: float | None = None  # the run's length in epochs; None: the runner's planned epochs

        def __post_init__(self) -> None:
            bad = [f"ratio={self.ratio}"] if not 0 <= self.ratio < 1 else []
            bad += [f"delta={self.delta}"] if not 0 <= self.delta <= 1 else []
            bad += [f"epochs={self.epochs}"] if self.epochs is not None and self.epochs <= 0 else []
            if bad:
                raise ValueError(f"invalid infobatch settings: {', '.join(bad)}")

    def __init__(self, settings: Settings, seed: int = 0, reduce_fn: ReduceFn | None = None) -> None:
        if reduce_fn is not None:  # the loss table would have to be gathered from every rank
            raise ValueError("infobatch: no data-parallel runs (its loss table is per process)")
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs = settings.epochs
        self.scores = torch.zeros(0)  # last recorded loss of every dataset row (float32)
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.weights = torch.zeros(0)  # loss weight of every row in the current epoch's plan
        self.candidates = torch.zeros(0, dtype=torch.bool)  # rows this epoch's plan could prune
        self.plan: list[int] | None = None
        self.plan_epoch_index: int | None = None
        self.pruned_fraction = 0.0  # of the current epoch's order
        self.well_learned_fraction = 0.0
        self.pruned_total = 0  # rows pruned over the run (forward and backward saved)

    # -- the runner's hooks -----------------------------------------------------------------------
    def set_epochs(self, epochs: float) -> None:
        """The run's planned length in (full-data) epochs, unless the settings give one."""
        if self.settings.epochs is None:
            self.epochs = epochs

    def prunes(self, epoch: int) -> bool:
        """Annealing: epoch ``epoch`` (from 0) is pruned if it ends within the first ``delta`` of training."""
        if self.epochs is None:
            raise RuntimeError("infobatch: the run's length in epochs is unknown (set_epochs or settings)")
        return self.settings.ratio > 0 and epoch + 1 <= self.settings.delta * self.epochs + 1e-9

    def plan_epoch(self, epoch: int, order: list[int], num_rows: int, min_rows: int) -> list[int]:
        if self.plan is not None and self.plan_epoch_index == epoch:  # resumed mid-epoch: the same rows
            return list(self.plan)
        if len(self.scores) != num_rows:
            self.scores, self.seen = torch.zeros(num_rows), torch.zeros(num_rows, dtype=torch.bool)
        self.weights = torch.ones(num_rows)
        rows = torch.tensor(order, dtype=torch.long)
        well = well_learned(self.scores, self.seen)
        kept = rows
        self.candidates = well if self.prunes(epoch) else torch.zeros_like(well)
        if self.prunes(epoch):
            kept, weights = prune_plan(rows, well, self.settings.ratio, self.generator)
            if len(kept) >= min_rows:  # an epoch must hold a batch
                self.weights[kept] = weights
            else:
                kept = rows
        self.well_learned_fraction = float(well[rows].float().mean()) if len(rows) else 0.0
        self.pruned_fraction = 1 - len(kept) / max(1, len(rows))
        self.pruned_total += len(rows) - len(kept)
        self.plan, self.plan_epoch_index = kept.tolist(), epoch
        return list(self.plan)

    def planned_rows(self, epoch: int) -> int | None:
        return len(self.plan) if self.plan is not None and self.plan_epoch_index == epoch else None

    # -- the Sampler protocol ---------------------------------------------------------------------
    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        pass  # data-level: the model is not wrapped, every loaded row is backpropagated

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        losses, _ = loss_fn(batch)
        index = batch["index"].cpu()
        values = losses.detach().float().cpu()
        self.scores[index], self.seen[index] = values, True
        weights = self.weights[index].to(losses.device, losses.dtype)
        (losses * weights).mean().backward()  # the authors' rescaled mean over the batch
        extra = {"pruned_fraction": self.pruned_fraction, "well_learned_fraction": self.well_learned_fraction}
        return StepStats(loss=float(values.mean()), keep_ratio=1.0, analytic_cost=1.0, extra=extra)

    def monitor_draw(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> None:
        """One of InfoBatch's draws on ``batch`` for the variance monitor: each row the current epoch's
        plan could prune (well-learned when it was planned) is kept with probability ``1 - r`` and
        weighted by its inverse; the loss table and the plan are untouched."""
        losses, _ = loss_fn(batch)
        index = batch["index"].cpu()
        r = self.settings.ratio
        well = self.candidates[index] if len(self.candidates) else torch.zeros(len(index), dtype=torch.bool)
        pruned = well & (torch.rand(len(index), generator=self.generator) < r)
        weights = torch.where(pruned, 0.0, torch.where(well, 1.0 / (1.0 - r), 1.0))
        (losses * weights.to(losses.device, losses.dtype)).mean().backward()

    def detach(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "seen": self.seen.clone(), "weights": self.weights.clone(),
                "candidates": self.candidates.clone(),
                "plan": None if self.plan is None else list(self.plan), "plan_epoch": self.plan_epoch_index,
                "epochs": self.epochs, "pruned_fraction": self.pruned_fraction,
                "well_learned_fraction": self.well_learned_fraction, "pruned_total": self.pruned_total,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores, self.seen = state["scores"].clone(), state["seen"].clone()
        self.weights, self.candidates = state["weights"].clone(), state["candidates"].clone()
        self.plan = None if state["plan"] is None else list(state["plan"])
        self.plan_epoch_index, self.epochs = state["plan_epoch"], state["epochs"]
        self.pruned_fraction = state["pruned_fraction"]
        self.well_learned_fraction = state["well_learned_fraction"]
        self.pruned_total = state["pruned_total"]
        self.generator.set_state(state["generator"])
