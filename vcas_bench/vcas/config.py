"""VCAS hyper-parameters: the one definition of the paper's defaults and of the ``vcas-plus`` preset.

The runner's ``sampler=vcas`` / ``sampler=vcas-plus`` settings, ``conf/sampler/vcas*.yaml`` and the
report's settings table all derive from :class:`VcasConfig` (a test checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["VcasConfig", "PLUS_PRESET", "default_update_period"]

# What ``vcas-plus`` changes from the paper's defaults (vcas_bench/vcas/README.md, "vcas-plus").
PLUS_PRESET: dict[str, Any] = dict(
    rho_ema=0.0,  # follow s at once: the EMA only adds lag once s converges
    variance_subset="rows",  # a variance pass skips 95% of the weight-gradient GEMMs
    param_sample_ratio=0.05,  # 5% of the rows, correlated within a row
    reuse_forward=True, fold_batch=True, alpha_max=0.16, beta_min=0.7, F_max_factor=8,
)


@dataclass
class VcasConfig:
    """VCAS hyper-parameters; defaults are the paper's (docs/method.md §10)."""

    tau_act: float = 0.025
    tau_w: float = 0.025
    alpha: float = 0.01
    beta: float = 0.95
    M: int = 2
    F: int = 100
    rho_ema: float = 0.6  # the authors' code smooths the rho schedule; 0 disables it
    param_sample_ratio: float = 0.01  # fraction of weight entries used for the variance sums
    # "entries": a random subset of weight entries (App. D); "rows": a random subset of output rows of
    # each weight, so a variance pass computes only those rows of the weight-gradient GEMM.
    variance_subset: str = "entries"
    seed: int = 0
    # Beyond the paper, all off by default (VcasConfig.plus() and the runner's `vcas-plus` turn them on):
    reuse_forward: bool = False  # one forward per variance batch; its exact and SampleA backwards share it
    fold_batch: bool = False  # the scheduled batch is the phase's first batch; its exact gradient is kept
    alpha_max: float | None = None  # s step starts here and halves at every sign flip, down to alpha
    beta_min: float | None = None  # per-linear nu multiplier starts here, moves halfway to beta at each flip
    # Adaptive period: doubles (up to F_max_factor * F) while s oscillates, halves on a drift.
    F_max_factor: int | None = None
    static_shapes: bool = False  # fixed rows per block, no host sync in the backward (docs/method.md §15)
    # Activation checkpointing that re-runs each block on the rows SampleA kept (vcas/checkpoint.py);
    # None: follow the model's own setting (HF gradient_checkpointing_enable()).
    checkpoint: bool | None = None

    @classmethod
    def plus(cls, **overrides: Any) -> VcasConfig:
        """The ``vcas-plus`` preset (``README.md``, "vcas-plus"), shared by the runner's
        ``sampler=vcas-plus`` and the library; ``overrides`` set any field (``F=50``, ``tau_act=0.05``)."""
        return cls(**{**PLUS_PRESET, **overrides})

    def __post_init__(self) -> None:
        checks = {
            "tau_act": self.tau_act >= 0, "tau_w": self.tau_w >= 0, "alpha": 0 < self.alpha <= 1,
            "beta": 0 < self.beta < 1, "M": self.M >= 2, "F": self.F >= 1,
            "rho_ema": 0 <= self.rho_ema < 1, "param_sample_ratio": 0 < self.param_sample_ratio <= 1,
            "alpha_max": self.alpha_max is None or self.alpha <= self.alpha_max <= 1,
            "beta_min": self.beta_min is None or 0 < self.beta_min <= self.beta,
            "F_max_factor": self.F_max_factor is None or self.F_max_factor >= 1,
            "variance_subset": self.variance_subset in ("entries", "rows"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid VCAS settings: {', '.join(f'{b}={getattr(self, b)}' for b in bad)}")


def default_update_period(total_steps: int) -> int:
    """The paper's rule F = min(500, steps / 50): about 50 adaptations per run (App. A.3)."""
    return max(1, min(500, total_steps // 50))
