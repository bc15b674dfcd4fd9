"""VCAS: Variance-Controlled Adaptive Sampling for backpropagation (Wang, Chen, Zhu, ICLR 2024).

The backward pass is run on a random subset of the work, without bias:

- **SampleA** drops whole data rows of the activation gradient at each block output, keeping row
  ``i`` with probability ``p_i ∝ ||grad_i||`` (``sum p = N * rho``) and rescaling kept rows by ``1/p``;
- **SampleW** estimates each linear's weight gradient from (row x token) pairs drawn by leverage score
  ``||grad_row|| * ||input_row||`` at ratio ``nu`` of the rows SampleA left;
- a **controller** measures, every ``F`` steps, the extra variance each sampler adds against the SGD
  variance and moves the keep ratios so that ``V_act ≈ tau_act * V_s`` and ``V_w,l ≈ tau_w * V_s,l``.

This package is the method alone (torch only: no trainer, Hydra or dataset code); see ``README.md``
beside it. ``vcas_bench.integrations`` drives it from a plain loop, HF ``Trainer`` or Lightning.
"""

from vcas_bench.vcas.autograd import LinearSlot, RowEngine
from vcas_bench.vcas.checkpoint import CheckpointError
from vcas_bench.vcas.config import VcasConfig, default_update_period
from vcas_bench.vcas.controller import PhaseStats, VcasController, VcasSummary
from vcas_bench.vcas.flops import interval_cost_ratio, keep_ratio_cost, phase_cost_ratio, step_cost_ratio
from vcas_bench.vcas.sampling import (
    bernoulli_keep,
    find_top_sum,
    leverage_sample_matmul,
    leverage_variance,
    monotone_envelope,
    row_norms,
    soft_topk,
)
from vcas_bench.vcas.wrap import (
    SampledLinear,
    Wrapped,
    auto_block_type,
    checkpoint_blocks,
    find_blocks,
    unwrap,
    wrap,
)

__all__ = [
    "VcasConfig", "default_update_period", "VcasController", "PhaseStats", "VcasSummary", "RowEngine",
    "LinearSlot", "SampledLinear",
    "Wrapped", "wrap", "unwrap", "find_blocks", "auto_block_type", "checkpoint_blocks", "CheckpointError",
    "soft_topk", "bernoulli_keep", "row_norms",
    "find_top_sum",
    "monotone_envelope", "leverage_variance", "leverage_sample_matmul", "step_cost_ratio",
    "phase_cost_ratio", "interval_cost_ratio", "keep_ratio_cost",
]
