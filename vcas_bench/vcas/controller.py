"""The VCAS controller: when to adapt, and the s / rho / nu updates (docs/method.md §5–§7, §13).

Every ``F`` optimizer steps the caller hands :meth:`VcasController.adapt` ``M`` fresh batches. Its
:class:`~vcas_bench.vcas.variance.VarianceEstimator` runs the variance phase on them and estimates

- ``V_s``   = unbiased sample variance of the exact gradients over the ``M`` batches,
- ``V_act`` = mean squared distance of the SampleA gradients to their batch's exact gradient,
- ``V_w,l`` = mean analytic SampleW variance (Eq. 3) of linear ``l`` at its current ``nu``,

on the weights inside the blocks (the sampled linears', plus conv kernels in a CNN, on a random
subset of their entries or rows); the controller then moves

- ``s <- clip(s + alpha * sign(V_act - tau_act * V_s), 0, 1)``          (Eq. 5, sign(0) = +1)
- ``rho <- ema * rho + (1 - ema) * envelope(p(s_new))``                   (Eq. 4 at the *new* s)
- ``nu_l <- nu_l / beta`` if ``V_w,l > tau_w * V_s,l`` else ``nu_l * beta``, clamped to (0, 1].
  A model without sampled linears (a CNN: activation-only VCAS) has no ``nu`` and no ``V_w``.

Counting: ``F`` counts optimizer steps, costs count micro-batches. Under gradient accumulation call
:meth:`VcasController.count_step` once per micro-batch (its backward), never once per optimizer step:
the phase's cost is in micro-batch units, so the ratio is the runner's. ``vcas_bench.integrations``
does all of this (and the fold) for a plain loop, HF ``Trainer`` and Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vcas_bench.vcas.autograd import StepReading
from vcas_bench.vcas.config import VcasConfig
from vcas_bench.vcas.flops import interval_cost_ratio, phase_cost_ratio, step_cost_ratio
from vcas_bench.vcas.sampling import monotone_envelope
from vcas_bench.vcas.variance import LossFn, VarianceEstimate, VarianceEstimator, checked_loss_fn
from vcas_bench.vcas.wrap import Wrapped, unwrap, wrap

__all__ = ["VcasController", "PhaseStats", "VcasSummary"]


@dataclass
class PhaseStats:
    """What one variance phase measured and decided."""

    step: int
    s: float
    V_s: float
    V_act: float
    V_w: float
    rho: list[float]
    nu: list[float]
    V_s_layer: list[float] = field(default_factory=list)
    V_w_layer: list[float] = field(default_factory=list)
    cost: float = 0.0  # analytic FLOPs of the phase, in exact FP+BP steps

    def summary(self) -> dict[str, float]:
        """Flat scalars for logs: s, mean rho/nu, the variances and their ratios to V_s."""
        ratio = (lambda v: v / self.V_s) if self.V_s > 0 else (lambda v: math.nan)
        return {
            "s": self.s, "rho_mean": sum(self.rho) / len(self.rho),
            "nu_mean": sum(self.nu) / len(self.nu) if self.nu else math.nan,  # nan: no SampleW
            "V_s": self.V_s, "V_act": self.V_act,
            "V_w": self.V_w, "V_act_over_V_s": ratio(self.V_act), "V_w_over_V_s": ratio(self.V_w),
            "phase_cost": self.cost,
        }


@dataclass
class VcasSummary:
    """What VCAS wrapped and where it stands (for logs and for checking a new architecture)."""

    block_type: str
    blocks: int
    sampled_linears: int
    exact_linear_like: list[str]  # linear-like layers inside the blocks left exact (no SampleW)
    steps: int  # micro-batches counted
    phases: int
    s: float
    rho_mean: float
    nu_mean: float  # nan: no SampleW (activation-only)
    F_now: int  # the current adaptation period, in optimizer steps
    analytic_flops_ratio: float


class VcasController:
    """Wraps a model for VCAS and adapts its keep ratios.

    Usage from any training loop (``vcas_bench.integrations.loop.VcasLoop`` does this for you)::

        vcas = VcasController(model)                       # block_type="auto", VcasConfig()
        for step in range(steps):                           # optimizer steps
            for micro, batch in enumerate(micro_batches()):
                vcas.adapt_if_due(step, loss_fn, batch, lambda: next(extra))
                loss = vcas.folded_loss()                   # set only with fold_batch, right after a phase
                (loss if loss is not None else loss_fn(batch)).div(accumulate).backward()
                vcas.count_step(0.0 if loss is not None else None)   # per micro-batch
            optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module, block_type: type | str = "auto", config: VcasConfig | None = None,
                 reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``block_type``: the repeated block's class or class name, or ``"auto"`` (wrap.auto_block_type).
        ``reduce_fn`` (data parallel): the mean of a 1-D float64 tensor over all ranks. Each rank then
        estimates from its own batches and every rank takes the same decision from the averaged
        estimates; ranks keep their own generators (seed them differently) for independent draws."""
        self.config = config or VcasConfig()
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.wrapped: Wrapped = wrap(model, block_type, self.generator, checkpoint=self.config.checkpoint)
        self.engine = self.wrapped.engine
        self.engine.static_shapes = self.config.static_shapes
        self.last_reading: StepReading | None = None  # the last counted backward's statistics
        self.s = 1.0
        self.history: list[PhaseStats] = []
        self.steps = 0
        self.phases = 0
        self.cost_units = 0.0  # analytic FLOPs spent, in units of one exact FP+BP (docs/method.md §9)
        cfg = self.config
        self.alpha_now = cfg.alpha_max or cfg.alpha  # current s step (shrinks at sign flips)
        self.beta_now = [cfg.beta_min or cfg.beta] * len(self.engine.linears)
        self.nu_direction = [0] * len(self.engine.linears)
        self.direction = 0  # sign of the last s move
        self.F_now = cfg.F
        self.next_phase = 0
        self.last_phase_step: int | None = None  # should_adapt is false again once its step's phase ran
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.variance = VarianceEstimator(self.wrapped, self.config, self.generator, self.params, reduce_fn)

    # -- public API ----------------------------------------------------------------------------
    @property
    def rho(self) -> list[float]:
        return list(self.engine.rho)

    @property
    def nu(self) -> list[float]:
        return [slot.nu for slot in self.engine.linears]

    @property
    def kept_fraction(self) -> list[float]:
        """Per block, the fraction of rows SampleA kept in the last counted backward (bottom block first),
        as read once by :meth:`count_step`; all ones before any sampled backward."""
        reading = self.last_reading
        return list(reading.kept_fraction) if reading is not None else [1.0] * self.engine.num_blocks

    @property
    def device(self) -> torch.device:
        """Where the model's trainable parameters live."""
        return self.params[0].device

    @property
    def F_max(self) -> int | None:
        """The longest adaptive period, ``F_max_factor * F`` (None: the period stays ``F``)."""
        factor = self.config.F_max_factor
        return None if factor is None else factor * self.config.F

    def should_adapt(self, step: int) -> bool:
        """Algorithm 1 adapts before optimizer steps 0, F, 2F, ...; with ``F_max_factor``, ``F_now`` steps
        after the last phase. False once that step's phase ran (asked again by a later micro-batch)."""
        if step == self.last_phase_step:
            return False
        if self.F_max is None:
            return step % self.config.F == 0
        return step >= self.next_phase

    def adapt_if_due(self, step: int, loss_fn: LossFn, batch: Any, next_batch: Callable[[], Any]
                     ) -> PhaseStats | None:
        """The phase of optimizer step ``step`` if it is due: on ``M`` batches from ``next_batch()``, or
        with ``fold_batch`` on ``batch`` (the scheduled one) and ``M - 1`` of them. Then
        :meth:`folded_loss` holds ``batch``'s exact gradient: backpropagate it instead of a sampled loss."""
        if not self.should_adapt(step):
            return None
        return self.adapt(loss_fn, self.phase_batches(batch, next_batch), step)

    def phase_batches(self, batch: Any, next_batch: Callable[[], Any]) -> list[Any]:
        """The ``M`` batches of a phase: fresh ones from ``next_batch()``, with ``fold_batch`` after
        ``batch`` (the scheduled one, whose exact gradient the phase then keeps)."""
        fold = self.config.fold_batch
        return [batch] * fold + [next_batch() for _ in range(self.config.M - fold)]

    def step_cost(self) -> float:
        """Analytic FLOPs of one training step at the current rho / nu, relative to exact (method §9)."""
        return step_cost_ratio(self.engine.rho, self.nu_per_block())

    def phase_cost(self) -> float:
        """Analytic FLOPs of one variance phase at the current rho, in exact FP+BP steps (method §9)."""
        cfg = self.config
        rows = cfg.variance_subset == "rows"
        # A folded first pass computes every weight gradient in full (its update needs them).
        weight_fraction = cfg.param_sample_ratio if rows else 1.0
        return phase_cost_ratio(self.engine.rho, cfg.M, cfg.reuse_forward, weight_fraction) + (
            (1 - weight_fraction) / 3 if rows and cfg.fold_batch else 0.0)

    def interval_cost(self) -> float:
        """The paper's analytic cost r of one adaptation interval (``F`` steps and a phase) at the current
        schedule, relative to exact training (method §9)."""
        return interval_cost_ratio(self.engine.rho, self.nu_per_block(), self.config.M, self.config.F)

    def count_step(self, cost: float | None = None) -> None:
        """Record one micro-batch's backward for the analytic FLOPs ratio (``cost`` overrides the sampled
        one: 0 for a folded micro-batch, whose work is the phase's)."""
        if self.variance.folded is not None:
            raise RuntimeError("fold_batch: the last phase computed this batch's exact gradient and nobody "
                               "applied it; backpropagate vcas.folded_loss() (or take_folded()) first")
        self.steps += 1
        self.cost_units += self.step_cost() if cost is None else cost
        self.last_reading = self.engine.read_step() if cost is None else None  # one read; raises on a leak

    def take_folded(self) -> tuple[float, list[torch.Tensor]] | None:
        """With ``fold_batch``: the loss and full gradient (over ``self.params``) of the last phase's
        first batch, once; the caller uses it as that step's update instead of a sampled backward."""
        return self.variance.take_folded()

    def apply_folded(self) -> float | None:
        """With ``fold_batch``, right after a phase: add the scheduled batch's exact gradient to ``.grad``
        and count that micro-batch at cost 0 (its work is the phase's); return its loss. None when
        there is nothing to fold. For a loop that owns ``.grad``: the gradient is the one of the phase's
        ``loss_fn`` as it is (any loss scaling it applied included), and no DDP hook sees it. Loops that
        scale the loss or average gradients in hooks backpropagate :meth:`folded_loss` instead."""
        folded = self.take_folded()
        if folded is None:
            return None
        loss, grads = folded
        for param, grad in zip(self.params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        self.count_step(cost=0.0)
        return loss

    def folded_loss(self, grad_mean_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
                    ) -> torch.Tensor | None:
        """With ``fold_batch``, right after a phase: a scalar loss tensor (the scheduled batch's loss)
        whose backward adds ``grad_output *`` that batch's exact gradient to every parameter, so any
        scaling (``1 / accumulate``, a GradScaler) and DDP's gradient hooks apply as to a real loss.
        ``grad_mean_fn`` averages the gradients over ranks first (when no DDP forward will sync them).
        None when there is nothing to fold."""
        folded = self.take_folded()
        if folded is None:
            return None
        value, grads = folded
        if grad_mean_fn is not None:
            present = [g for g in grads if g is not None]
            means = iter(grad_mean_fn(present))
            grads = [None if g is None else next(means) for g in grads]
        return _FoldedLoss.apply(torch.tensor(value, device=self.device), grads, *self.params)

    def analytic_flops_ratio(self) -> float:
        """Analytic FLOPs spent so far relative to exact training of the same steps (docs/method.md §9)."""
        return self.cost_units / self.steps if self.steps else math.nan

    def unwrap(self) -> nn.Module:
        return unwrap(self.wrapped)

    def adapt(self, loss_fn: LossFn, batches: Iterable[Any], step: int = 0) -> PhaseStats:
        """Run one variance phase on ``M`` batches and update s, rho and nu. ``loss_fn(batch)`` returns
        the batch's mean loss as a scalar tensor; with ``fold_batch``, ``batches[0]`` is the scheduled one."""
        batches = list(batches)
        if len(batches) != self.config.M:
            raise ValueError(f"adapt needs M={self.config.M} batches, got {len(batches)}")
        if self.variance.folded is not None:
            raise RuntimeError("fold_batch: the previous phase's folded gradient was never applied; "
                               "backpropagate vcas.folded_loss() on the step after each phase")
        loss_fn = checked_loss_fn(loss_fn)
        cost = self.phase_cost()
        self.cost_units += cost
        candidates = {sign: min(max(self.s + sign * self._s_step(sign), 0.0), 1.0) for sign in (+1, -1)}
        stats = self.variance.estimate(loss_fn, batches, candidates)
        self._update(stats, step, cost)
        self.phases += 1
        self.next_phase = step + self.F_now
        self.last_phase_step = step
        return self.history[-1]

    def summary(self) -> VcasSummary:
        """What was wrapped, what was left exact, and the current schedule."""
        nu = self.nu
        return VcasSummary(
            block_type=self.wrapped.block_type, blocks=self.engine.num_blocks, sampled_linears=len(nu),
            exact_linear_like=list(self.wrapped.exact_linear_like), steps=self.steps, phases=self.phases,
            s=self.s, rho_mean=sum(self.rho) / len(self.rho), nu_mean=sum(nu) / len(nu) if nu else math.nan,
            F_now=self.F_now, analytic_flops_ratio=self.analytic_flops_ratio())

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config), "s": self.s, "rho": self.rho, "nu": self.nu,
            "steps": self.steps, "phases": self.phases, "cost_units": self.cost_units,
            "generator": self.generator.get_state(), "device_generators": self.engine.generator_states(),
            "draws": [(slot.drawn_fraction, slot.drawn_nu) for slot in self.engine.linears],
            "history": [asdict(h) for h in self.history],
            "alpha_now": self.alpha_now, "beta_now": self.beta_now, "nu_direction": self.nu_direction,
            "direction": self.direction, "F_now": self.F_now, "next_phase": self.next_phase,
            "last_phase_step": self.last_phase_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s, self.steps, self.phases = state["s"], state["steps"], state["phases"]
        self.cost_units = state["cost_units"]
        self.engine.rho = list(state["rho"])
        for slot, nu in zip(self.engine.linears, state["nu"], strict=True):
            slot.nu = nu
        self.generator.set_state(state["generator"])
        self.engine.load_generator_states(state.get("device_generators", {}))  # absent before they existed
        for slot, (fraction, nu) in zip(self.engine.linears, state.get("draws", []), strict=False):
            slot.drawn_fraction, slot.drawn_nu = fraction, nu  # SampleW's capacities (bit-exact resume)
        self.history = [PhaseStats(**h) for h in state["history"]]
        for key in ("alpha_now", "beta_now", "nu_direction", "direction", "F_now", "next_phase"):
            setattr(self, key, state[key])
        self.last_phase_step = state.get("last_phase_step")  # absent in checkpoints of earlier versions

    # -- updates -------------------------------------------------------------------------------
    def _update(self, est: VarianceEstimate, step: int, cost: float) -> None:
        cfg, engine = self.config, self.engine
        V_s = sum(est.V_s_layer)
        if not all(map(math.isfinite, [V_s, est.V_act, *est.V_w_layer])):
            # An overflow (fp16 gradients) measured nothing usable: record it, change nothing.
            self.history.append(PhaseStats(
                step=step, s=self.s, V_s=V_s, V_act=est.V_act, V_w=sum(est.V_w_layer), rho=self.rho,
                nu=self.nu, V_s_layer=est.V_s_layer, V_w_layer=est.V_w_layer, cost=cost))
            return
        direction = +1 if est.V_act - cfg.tau_act * V_s >= 0 else -1
        self.alpha_now = self._s_step(direction)
        self._adapt_period(direction)
        self.direction = direction
        self.s = min(max(self.s + direction * self.alpha_now, 0.0), 1.0)
        target = monotone_envelope(est.keep_at[direction])
        engine.rho = [cfg.rho_ema * old + (1 - cfg.rho_ema) * new for old, new in zip(engine.rho, target)]
        for i, (slot, v_w, v_s) in enumerate(zip(engine.linears, est.V_w_layer, est.V_s_layer)):
            up = v_w > cfg.tau_w * v_s
            beta = self._nu_multiplier(i, +1 if up else -1)
            slot.nu = min(1.0, slot.nu / beta) if up else slot.nu * beta
        self.history.append(PhaseStats(
            step=step, s=self.s, V_s=V_s, V_act=est.V_act, V_w=sum(est.V_w_layer),
            rho=self.rho, nu=self.nu, V_s_layer=est.V_s_layer, V_w_layer=est.V_w_layer, cost=cost,
        ))

    def _flips(self, direction: int) -> bool:
        return self.direction != 0 and direction != self.direction

    def _s_step(self, direction: int) -> float:
        """The step s takes if it moves in ``direction``: ``alpha_now``, halved (down to ``alpha``) when the
        sign flips. Used for the rho candidates and the move alike, so rho is always Eq. 4 at the new s."""
        return max(self.config.alpha, self.alpha_now / 2) if self._flips(direction) else self.alpha_now

    def _adapt_period(self, direction: int) -> None:
        """With ``F_max_factor``: oscillating around the target, the schedule is settled, adapt half as often;
        moving the same way again, twice as often (down to ``F``). Halving rather than resetting: one
        same-way move is as often noise in the M-batch estimate as a drift, and a real drift keeps
        moving the same way, so it is back at the base rate within log2(F_max / F) phases."""
        cfg = self.config
        if self.F_max is not None and self.direction != 0:
            grown = min(self.F_max, 2 * self.F_now)
            self.F_now = grown if self._flips(direction) else max(cfg.F, self.F_now // 2)

    def _nu_multiplier(self, i: int, direction: int) -> float:
        """The multiplier for linear ``i``: ``beta``, or with ``beta_min`` one that approaches it at flips."""
        cfg = self.config
        if self.nu_direction[i] != 0 and direction != self.nu_direction[i]:
            self.beta_now[i] = min(cfg.beta, 1 - (1 - self.beta_now[i]) / 2)
        self.nu_direction[i] = direction
        return self.beta_now[i]

    def nu_per_block(self) -> list[list[float]]:
        """nu of each block's linears, grouped by block."""
        per_block: list[list[float]] = [[] for _ in range(self.engine.num_blocks)]
        for slot in self.engine.linears:
            per_block[slot.block].append(slot.nu)
        return per_block


class _FoldedLoss(torch.autograd.Function):
    """Forward: the folded batch's loss value; backward: ``grad_output *`` its stored exact gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, grads: list[torch.Tensor | None], *params: torch.Tensor):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = [None if g is None else (g * grad_output).to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return None, None, *grads
