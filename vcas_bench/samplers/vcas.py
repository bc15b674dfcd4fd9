"""``vcas``: the runner's adapter around :mod:`vcas_bench.vcas` (the method lives there, not here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vcas_bench.samplers import SAMPLERS, LossFn, ReduceFn, StepStats, mean_loss_backward
from vcas_bench.vcas import VcasConfig, VcasController, interval_cost_ratio


def default_update_period(total_steps: int) -> int:
    """The paper's rule F = min(500, steps / 50): about 50 adaptations per run (App. A.3)."""
    return max(1, min(500, total_steps // 50))


@SAMPLERS.register("vcas")
class VcasSampler:
    """Variance-controlled adaptive sampling of activation and weight gradients."""

    name = "vcas"

    @dataclass
    class Settings:
        """Paper defaults (docs/method.md §10); ``F: null`` applies :func:`default_update_period`."""

        tau: float = 0.025  # sets tau_act and tau_w together unless they are given
        tau_act: float | None = None
        tau_w: float | None = None
        alpha: float = 0.01
        beta: float = 0.95
        M: int = 2
        F: int | None = None
        rho_ema: float = 0.6
        param_sample_ratio: float = 0.01
        variance_subset: str = "entries"  # or "rows": the phase computes only those weight-gradient rows
        # Beyond the paper (vcas_bench/vcas/README.md, "vcas-plus"); off here, on in `vcas-plus`.
        reuse_forward: bool = False
        fold_batch: bool = False
        alpha_max: float | None = None
        beta_min: float | None = None
        F_max_factor: int | None = None  # adaptive period up to F_max_factor * F (VcasConfig's name too)
        static_shapes: bool = False  # fixed rows per block, no host sync in the backward (VcasConfig's too)

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

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        F = default_update_period(total_steps) if self.settings.F is None else self.settings.F
        config = self.settings.to_config(F, self.seed)
        self.controller = VcasController(model, block_type, config, reduce_fn=self.reduce_fn)

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        ctl = self.controller
        folded = ctl.take_folded()
        if folded is not None:  # this batch's exact gradient was computed in the phase: use it
            loss, grads = folded
            for param, grad in zip(ctl.params, grads):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad
            ctl.count_step(cost=0.0)  # its FLOPs are in the phase's cost
            extra = {"folded": 1.0, "s": ctl.s}
            return StepStats(loss=loss, keep_ratio=1.0, analytic_cost=0.0, extra=extra)
        cost = ctl.step_cost()
        losses, _ = loss_fn(batch)
        loss = mean_loss_backward(losses)
        ctl.count_step()
        kept = ctl.last_reading.kept_fraction
        return StepStats(loss=loss, keep_ratio=kept[0], analytic_cost=cost,
                         extra={"keep_top": kept[-1], "s": ctl.s})

    def adapt_due(self, step: int) -> bool:
        return self.controller.should_adapt(step)

    def adapt(self, step: int, loss_fn: LossFn, next_batch: Callable[[], Any], batch: Any) -> dict[str, Any]:
        ctl = self.controller
        # The paper's per-interval cost r (docs/method.md §9), at the schedule used since the last phase.
        interval_ratio = interval_cost_ratio(ctl.rho, ctl.nu_per_block(), ctl.config.M, ctl.config.F)
        fold = ctl.config.fold_batch
        batches = [batch] * fold + [next_batch() for _ in range(ctl.config.M - fold)]
        stats = ctl.adapt(lambda b: loss_fn(b)[0].mean(), batches, step)
        return {"step": step, "F": ctl.F_now, **stats.summary(), "interval_flops_ratio": interval_ratio,
                "analytic_flops_ratio_so_far": ctl.analytic_flops_ratio(), "folded_step": fold,
                "rho": stats.rho, "nu": stats.nu, "V_s_layer": stats.V_s_layer, "V_w_layer": stats.V_w_layer}

    def detach(self) -> None:
        if self.controller is not None:
            self.controller.unwrap()

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


_PLUS = VcasConfig.plus()  # the one definition of the preset, shared with library users


@SAMPLERS.register("vcas-plus")
class VcasPlusSampler(VcasSampler):
    """VCAS with the short-run improvements on (vcas_bench/vcas/README.md, "vcas-plus"):
    the defaults of :meth:`VcasConfig.plus`."""

    name = "vcas-plus"

    @dataclass
    class Settings(VcasSampler.Settings):
        rho_ema: float = _PLUS.rho_ema  # follow s at once: the EMA only adds lag once s converges
        variance_subset: str = _PLUS.variance_subset  # a variance pass skips 95% of the weight-gradient GEMMs
        param_sample_ratio: float = _PLUS.param_sample_ratio  # 5% of the rows, correlated within a row
        reuse_forward: bool = _PLUS.reuse_forward
        fold_batch: bool = _PLUS.fold_batch
        alpha_max: float | None = _PLUS.alpha_max
        beta_min: float | None = _PLUS.beta_min
        F_max_factor: int | None = _PLUS.F_max_factor
