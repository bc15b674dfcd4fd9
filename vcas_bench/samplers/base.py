"""The contract between the training loop and a sampler, and the registry samplers register in.

Every sampler forwards the full batch and then backpropagates all of it (``exact``), a random
unbiased part of it chosen per block and per linear (``vcas``), or a subset of examples chosen at
the loss (``sb``, biased; ``ub``, unbiased). The row-skipping backward is the one engine in
:mod:`vcas_bench.vcas.autograd`; the training loop only sees the :class:`Sampler` protocol and the
typed values it returns (:class:`StepStats`, :class:`PhaseReport`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from vcas_bench.registry import Registry
from vcas_bench.vcas.autograd import RowEngine

SAMPLERS = Registry("sampler")

# (batch) -> (per-example losses (N,), logits (N, C)); the loss graph is live.
LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
# Data parallel: the mean of a tensor over all ranks (samplers that adapt use it to decide alike).
ReduceFn = Callable[[torch.Tensor], torch.Tensor]
# One row of a log file (train_log.csv, sampler_log.csv): column -> value; a list of numbers becomes the
# columns ``<name>_0, <name>_1, ...`` (per block, per linear). The one shape a sampler logs in.
LogRow = dict[str, Any]


@dataclass
class StepStats:
    """What a sampler reports for one training step (micro-batch)."""

    loss: float  # mean loss over the full batch (the forward always sees all of it)
    keep_ratio: float  # fraction of the batch's rows that were backpropagated
    analytic_cost: float  # the step's analytic FLOPs relative to an exact step (docs/method.md §9)
    extra: LogRow = field(default_factory=dict)  # the sampler's own columns of train_log.csv


@dataclass(frozen=True)
class PhaseReport:
    """What one adaptation phase reports to the loop, which decides what to do with it."""

    cost: float  # analytic FLOPs of the phase, in exact FP+BP steps (docs/method.md §9)
    log: LogRow  # its row of sampler_log.csv
    # Set when the phase also did this step's backward (VCAS's fold_batch): the gradient of the scheduled
    # batch is in ``.grad`` already, so the loop takes these stats instead of calling :meth:`Sampler.step`.
    folded_step: StepStats | None = None


class Sampler(Protocol):
    """The contract between the training loop and a sampler.

    Every sampler is built as ``cls(settings, seed=seed, reduce_fn=reduce_fn)``: ``settings`` its
    ``Settings`` dataclass (its config schema), ``reduce_fn`` the mean over data-parallel ranks (None
    in one process), for samplers whose decisions must agree across ranks.
    """

    name: str

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        """Prepare ``model`` (wrap it if needed) before training."""

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        """Forward ``batch`` and write its (sampled) gradient into ``.grad``."""

    def adapt_due(self, step: int) -> bool:
        """Whether an adaptation phase runs before optimizer step ``step`` (VCAS only)."""

    def adapt(self, step: int, loss_fn: LossFn, next_batch: Callable[[], Any], batch: Any) -> PhaseReport:
        """Run the adaptation phase before training on ``batch`` (fresh batches from ``next_batch()``)."""

    def run_metrics(self) -> dict[str, Any]:
        """The sampler's own entries of ``metrics.json`` at the end of a run (VCAS: its final schedule)."""

    def detach(self) -> None:
        """Undo :meth:`attach` (unwrap the model)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class OwnsRowEngine(Protocol):
    """A sampler that drives a :class:`RowEngine` the model's linears may not point to (VCAS on a CNN
    wraps no linear but still samples its blocks' activation gradients). The variance monitor turns
    sampling off in these engines and in the linears' own for its exact passes."""

    def row_engines(self) -> list[RowEngine]: ...


@runtime_checkable
class DrawsForMonitor(Protocol):
    """A sampler whose :meth:`Sampler.step` is not one of its draws as the monitor needs it (InfoBatch's
    step updates its loss table): ``monitor_draw`` leaves one draw's gradient in ``.grad`` and changes
    no state."""

    def monitor_draw(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> None: ...


class WithoutPhases:
    """The part of the protocol a sampler with no adaptation phase shares (all but VCAS)."""

    name = "sampler"

    def adapt_due(self, step: int) -> bool:
        return False

    def adapt(self, step: int, loss_fn: LossFn, next_batch: Callable[[], Any], batch: Any) -> PhaseReport:
        raise RuntimeError(f"{self.name} has no adaptation phase")

    def run_metrics(self) -> dict[str, Any]:
        return {}


def sampler_settings(name: str) -> type:
    """The dataclass of settings a sampler accepts (its config schema)."""
    return SAMPLERS.get(name).Settings


def create_sampler(name: str, seed: int = 0, reduce_fn: ReduceFn | None = None, **settings: Any) -> Sampler:
    """Build the sampler registered as ``name`` from flat settings (the fields of its ``Settings``)."""
    return SAMPLERS.create(name, settings=sampler_settings(name)(**settings), seed=seed, reduce_fn=reduce_fn)


def mean_loss_backward(losses: torch.Tensor) -> float:
    """Backward of the mean loss; returns it as a float (one device sync, after the backward)."""
    loss = losses.mean()
    loss.backward()
    return float(loss.detach())
