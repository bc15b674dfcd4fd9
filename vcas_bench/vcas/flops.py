"""The paper's analytic FLOPs model (docs/method.md §9).

Forward : activation backward : weight backward = 1 : 1 : 1 for every linear, whatever its size, and
everything that is not a sampled linear is ignored. Costs are in units of one exact FP+BP (= 3).
:mod:`vcas_bench.measure` counts the real FLOPs next to this.
"""

from __future__ import annotations

__all__ = ["step_cost_ratio", "phase_cost_ratio", "interval_cost_ratio", "keep_ratio_cost"]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 1.0


def step_cost_ratio(rho: list[float], nu_per_block: list[list[float]]) -> float:
    """``C_s / 3`` with ``C_s = 1 + mean_j rho_j + mean_j(rho_j * mean_k nu_jk)``: one VCAS step."""
    weight_bwd = _mean([r * _mean(nus) for r, nus in zip(rho, nu_per_block)])
    return (1 + _mean(rho) + weight_bwd) / 3


def phase_cost_ratio(
    rho: list[float], M: int, reuse_forward: bool = False, weight_fraction: float = 1.0
) -> float:
    """One variance phase: ``M`` exact passes plus ``M^2`` SampleA-only passes (``C_a = 1 + 2 mean rho``;
    without their forward, ``2 mean rho``, when they reuse the exact pass's forward). A pass computing
    only ``weight_fraction`` of each weight gradient (row probes) pays that share of its weight GEMM:
    ``2 + w`` per exact pass and ``rho (1 + w)`` per SampleA backward."""
    w = weight_fraction
    exact, sampled_backward = 1 + 1 + w, (1 + w) * _mean(rho)
    return (M * exact + M**2 * ((0 if reuse_forward else 1) + sampled_backward)) / 3


def interval_cost_ratio(rho: list[float], nu_per_block: list[list[float]], M: int, F: int) -> float:
    """The authors' ``r = (F C_s + 3M + M^2 C_a) / (3F)`` for one adaptation interval."""
    return (F * step_cost_ratio(rho, nu_per_block) + phase_cost_ratio(rho, M)) / F


def keep_ratio_cost(r: float) -> float:
    """SB/UB at keep ratio ``r``: full forward, backward on ``r`` of the batch: ``(1 + 2r) / 3``."""
    return (1 + 2 * r) / 3
