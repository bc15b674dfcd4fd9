"""``vcas``: the runner's adapter around :mod:`vcas_bench.vcas` (the method lives there, not here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vcas_bench.samplers.base import SAMPLERS, LossFn, PhaseReport, ReduceFn, StepStats, mean_loss_backward
from vcas_bench.vcas import RowEngine, VcasConfig, VcasController, default_update_period

_PAPER = VcasConfig()  # the one definition of the defaults (vcas_bench/vcas/config.py)
_PLUS = VcasConfig.plus()  # the one definition of the preset, shared with library users


@SAMPLERS.register("vcas")
class VcasSampler:
    """Variance-controlled adaptive sampling of activation and weight gradients."""

    name = "vcas"

    @dataclass
    class Settings:
        """:class:`VcasConfig`'s fields with its defaults, but ``tau`` for both thresholds and ``F: null``
        for the task's period or :func:`default_update_period` (docs/method.md §10)."""

        tau: float = _PAPER.tau_act  # sets tau_act and tau_w together unless they are given
        tau_act: float | None = None
        tau_w: float | None = None
        alpha: float = _PAPER.alpha
        beta: float = _PAPER.beta
        M: int = _PAPER.M
        F: int | None = None
        rho_ema: float = _PAPER.rho_ema
        param_sample_ratio: float = _PAPER.param_sample_ratio
        variance_subset: str = _PAPER.variance_subset  # or "rows": the phase computes only those rows
        # Beyond the paper (vcas_bench/vcas/README.md, "vcas-plus"); off here, on in `vcas-plus`.
        reuse_forward: bool = _PAPER.reuse_forward
        fold_batch: bool = _PAPER.fold_batch
        alpha_max: float | None = _PAPER.alpha_max
        beta_min: float | None = _PAPER.beta_min
        F_max_factor: int | None = _PAPER.F_max_factor  # adaptive period up to F_max_factor * F
        static_shapes: bool = _PAPER.static_shapes  # fixed rows per block, no host sync in the backward

        def __post_init__(self) -> None:
            self.to_config(F=1 if self.F is None else self.F)  # range checks live in VcasConfig (F=0 too)

        def to_config(self, F: int, seed: int = 0) -> VcasConfig:
            fields = asdict(self)
            tau = fields.pop("tau")
            fields["tau_act"] = tau if self.tau_act is None else self.tau_act
            fields["tau_w"] = tau if self.tau_w is None else self.tau_w
            fields["F"] = F
            return VcasConfig(**fields, seed=seed)

    def __init__(self, settings: Settings, seed: int = 0, reduce_fn: ReduceFn | None = None) -> None:
        self.settings, self.seed, self.reduce_fn = settings, seed, reduce_fn
        self.controller: VcasController | None = None
        self.period: int | None = None  # F, the base adaptation period, once attached

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        self.period = default_update_period(total_steps) if self.settings.F is None else self.settings.F
        config = self.settings.to_config(self.period, self.seed)
        self.controller = VcasController(model, block_type, config, reduce_fn=self.reduce_fn)

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        ctl = self.controller
        cost = ctl.step_cost()
        losses, _ = loss_fn(batch)
        loss = mean_loss_backward(losses)
        ctl.count_step()
        kept = ctl.kept_fraction
        return StepStats(loss=loss, keep_ratio=kept[0], analytic_cost=cost,
                         extra={"keep_top": kept[-1], "s": ctl.s})

    def adapt_due(self, step: int) -> bool:
        return self.controller.should_adapt(step)

    def adapt(self, step: int, loss_fn: LossFn, next_batch: Callable[[], Any], batch: Any) -> PhaseReport:
        ctl = self.controller
        # The paper's per-interval cost r (docs/method.md §9), at the schedule used since the last phase.
        interval_ratio = ctl.interval_cost()
        stats = ctl.adapt(lambda b: loss_fn(b)[0].mean(), ctl.phase_batches(batch, next_batch), step)
        log = {"step": step, "F": ctl.F_now, **stats.summary(), "interval_flops_ratio": interval_ratio,
               "analytic_flops_ratio_so_far": ctl.analytic_flops_ratio(),
               "folded_step": self.settings.fold_batch, "rho": stats.rho, "nu": stats.nu,
               "V_s_layer": stats.V_s_layer, "V_w_layer": stats.V_w_layer}
        # fold_batch: the phase computed the scheduled batch's exact gradient; it goes into .grad now and
        # that micro-batch is counted (at cost 0: its work is the phase's).
        folded_loss = ctl.apply_folded()
        folded = None if folded_loss is None else StepStats(
            loss=folded_loss, keep_ratio=1.0, analytic_cost=0.0, extra={"folded": 1.0, "s": ctl.s})
        return PhaseReport(cost=stats.cost, log=log, folded_step=folded)

    def run_metrics(self) -> dict[str, Any]:
        """``vcas_F`` (the base period) and the schedule and variance ratios the last phase left."""
        ctl = self.controller
        if ctl is None or not ctl.history:
            return {}
        last = ctl.history[-1]
        summary = last.summary()
        keys = ("s", "rho_mean", "nu_mean", "V_act_over_V_s", "V_w_over_V_s")
        finals = {f"final_{k}": summary[k] for k in keys}
        return {"vcas_F": self.period, **finals, "final_rho": last.rho, "final_nu": last.nu}

    def row_engines(self) -> list[RowEngine]:
        """The engine VCAS drives (:class:`OwnsRowEngine`; none before :meth:`attach`)."""
        return [self.controller.engine] if self.controller is not None else []

    def detach(self) -> None:
        if self.controller is not None:
            self.controller.unwrap()

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


@SAMPLERS.register("vcas-plus")
class VcasPlusSampler(VcasSampler):
    """VCAS with the short-run improvements on (vcas_bench/vcas/README.md, "vcas-plus"):
    the defaults of :meth:`VcasConfig.plus`."""

    name = "vcas-plus"

    @dataclass
    class Settings(VcasSampler.Settings):
        rho_ema: float = _PLUS.rho_ema
        variance_subset: str = _PLUS.variance_subset
        param_sample_ratio: float = _PLUS.param_sample_ratio
        reuse_forward: bool = _PLUS.reuse_forward
        fold_batch: bool = _PLUS.fold_batch
        alpha_max: float | None = _PLUS.alpha_max
        beta_min: float | None = _PLUS.beta_min
        F_max_factor: int | None = _PLUS.F_max_factor
