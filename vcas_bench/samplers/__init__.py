"""Samplers: what one training step's backward does. One file per sampler, one interface for all.

Every sampler forwards the full batch and then backpropagates all of it (``exact``), a random
unbiased part of it chosen per block and per linear (``vcas``), or a subset of examples chosen at
the loss (``sb``, biased; ``ub``, unbiased). The row-skipping backward is the one engine in
:mod:`vcas_bench.vcas.autograd`; the training loop only sees the :class:`Sampler` protocol.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from vcas_bench.registry import Registry

__all__ = ["SAMPLERS", "Sampler", "StepStats", "LossFn", "ReduceFn", "create_sampler", "sampler_settings"]

SAMPLERS = Registry("sampler")

# (batch) -> (per-example losses (N,), logits (N, C)); the loss graph is live.
LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
# Data parallel: the mean of a tensor over all ranks (samplers that adapt use it to decide alike).
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepStats:
    """What a sampler reports for one training step."""

    loss: float  # mean loss over the full batch (the forward always sees all of it)
    keep_ratio: float  # fraction of the batch's rows that were backpropagated
    analytic_cost: float  # the step's analytic FLOPs relative to an exact step (docs/method.md §9)
    extra: dict[str, float] = field(default_factory=dict)


class Sampler(Protocol):
    """The contract between the training loop and a sampler."""

    name: str

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        """Prepare ``model`` (wrap it if needed) before training."""

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        """Forward ``batch`` and write its (sampled) gradient into ``.grad``."""

    def adapt_due(self, step: int) -> bool:
        """Whether an adaptation phase runs before optimizer step ``step`` (VCAS only)."""

    def adapt(self, step: int, loss_fn: LossFn, next_batch: Callable[[], Any], batch: Any) -> dict[str, Any]:
        """Run the adaptation phase before training on ``batch``; returns what it measured and decided.

        ``phase["folded_step"]`` true means the phase already computed this step's gradient (its cost
        is the phase's), so :meth:`step` only applies it.
        """

    def detach(self) -> None:
        """Undo :meth:`attach` (unwrap the model)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def sampler_settings(name: str) -> type:
    """The dataclass of settings a sampler accepts (its config schema)."""
    return SAMPLERS.get(name).Settings


def create_sampler(name: str, seed: int = 0, reduce_fn: ReduceFn | None = None, **settings: Any) -> Sampler:
    """Build the sampler registered as ``name`` from flat settings.

    ``reduce_fn`` (data parallel) goes to samplers that take one: those whose decisions must agree
    across ranks (VCAS). SB and UB decide per example from the rank's own batch and need none.
    """
    cls = SAMPLERS.get(name)
    if reduce_fn is not None and "reduce_fn" in inspect.signature(cls).parameters:
        return cls(cls.Settings(**settings), seed=seed, reduce_fn=reduce_fn)
    return cls(cls.Settings(**settings), seed=seed)


def mean_loss_backward(losses: torch.Tensor) -> float:
    """Backward of the mean loss; returns it as a float (one device sync, after the backward)."""
    loss = losses.mean()
    loss.backward()
    return float(loss.detach())


from vcas_bench.samplers import exact, infobatch, sb, ub, vcas  # noqa: E402,F401  (registration)
