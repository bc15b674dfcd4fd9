"""Each registered sampler's tiny canonical setting, in one place for every registry-parametrized test.

A setting is the command-line overrides that make a sampler do what it is for within a few steps of the
fastest task (digits, vit-tiny, batch 16), and what a run of it must then show. A sampler registered
without one is reported as an xfail by ``tests/samplers/test_registry.py`` (never skipped in silence).
"""

from __future__ import annotations

from dataclasses import dataclass

# The fastest offline task and model: 128 training rows, batch 16 (8 steps an epoch), one thread.
TINY_RUN = ("task=digits", "model=vit-tiny", "task.args.train_size=128",
            "task.args.eval_size=32", "task.batch_size=16", "trainer.num_threads=1")


@dataclass(frozen=True)
class Canonical:
    overrides: tuple[str, ...] = ()
    subsamples: bool = False  # backpropagates fewer rows than the batch (keep ratio < 1) within 4 steps
    adapts: bool = False  # runs adaptation phases, logged in sampler_log.csv


CANONICAL: dict[str, Canonical] = {
    "exact": Canonical(),
    # F = 2, tau = 0.5, alpha = 0.2: s falls to 0.8 at the first phase, so the next steps sample.
    "vcas": Canonical(("sampler.F=2", "sampler.tau=0.5", "sampler.alpha=0.2"), subsamples=True, adapts=True),
    "vcas-plus": Canonical(("sampler.F=2",), subsamples=True, adapts=True),
    "sb": Canonical(subsamples=True),
    "ub": Canonical(subsamples=True),
    # Data-level: every loaded row is backpropagated; the saving is in the rows it does not load.
    "infobatch": Canonical(),
}
