"""Samplers: what one training step's backward does. One file per sampler, one interface for all.

The contract (:class:`Sampler`, :class:`StepStats`, :class:`PhaseReport`) and the registry live in
:mod:`vcas_bench.samplers.base`; importing this package registers every sampler.
"""

from vcas_bench.samplers import exact, infobatch, sb, ub, vcas  # noqa: F401  (registration)
from vcas_bench.samplers.base import (
    SAMPLERS,
    DrawsForMonitor,
    LogRow,
    LossFn,
    OwnsRowEngine,
    PhaseReport,
    ReduceFn,
    Sampler,
    StepStats,
    WithoutPhases,
    create_sampler,
    mean_loss_backward,
    sampler_settings,
)

__all__ = ["SAMPLERS", "Sampler", "StepStats", "PhaseReport", "LogRow", "LossFn", "ReduceFn", "WithoutPhases",
           "OwnsRowEngine", "DrawsForMonitor", "create_sampler", "sampler_settings", "mean_loss_backward"]
