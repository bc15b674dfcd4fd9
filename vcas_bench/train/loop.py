"""The training loop: the only place training happens (nanoGPT-style, one function, top to bottom)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vcas_bench.measure.flops import FlopMeter
from vcas_bench.measure.timers import UnitTimer
from vcas_bench.samplers import LossFn, Sampler

WARMUP_STEPS = 2  # the first steps pay for allocations and kernel selection: not timed


@dataclass
class LoopResult:
    steps: int = 0
    train_log: list[dict[str, Any]] = field(default_factory=list)
    phase_log: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    timer: UnitTimer | None = None
    flops: FlopMeter | None = None
    analytic_cost: float = 0.0  # summed analytic FLOPs, in exact-step units (steps + phases)


def train(
    model: nn.Module,
    sampler: Sampler,
    loss_fn: LossFn,
    loader: torch.utils.data.DataLoader,
    next_extra_batch: Callable[[], Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    total_steps: int,
    evaluate: Callable[[], dict[str, float]],
    device: torch.device,
    max_grad_norm: float | None = None,
    flops_every: int = 10,
    time_detail: bool = False,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Train for ``total_steps`` optimizer steps; evaluate after each epoch and at the end."""
    timer, meter = UnitTimer(device), FlopMeter(flops_every)
    result = LoopResult(timer=timer, flops=meter)
    loss_fn = meter.wrap_loss_fn(loss_fn)
    if time_detail:  # forward timed on its own; backward = step - forward
        loss_fn = timer.time_forward(loss_fn)
    bar = tqdm(total=total_steps, desc=sampler.name, disable=not progress, dynamic_ncols=True)
    model.train()
    epoch = 0
    while result.steps < total_steps:
        for batch in loader:
            step, phase = result.steps, None
            if sampler.adapt_due(step):  # VCAS's variance phase: extra passes on their own batches
                probe = meter.is_probe("phase", len(result.phase_log))
                with timer.unit("phase", timed=not probe), meter.unit("phase", probe):
                    phase = sampler.adapt(step, loss_fn, next_extra_batch, batch)
                result.phase_log.append(phase)
                result.analytic_cost += phase.get("phase_cost", 0.0)
            if phase is not None and phase.get("folded_step"):
                stats = sampler.step(batch, loss_fn)  # applies the phase's exact gradient: phase work
            else:
                probe = meter.is_probe("step", step)
                # Warm-up and counted steps run like any other but are left out of the timing.
                with timer.unit("step", timed=step >= WARMUP_STEPS and not probe), meter.unit("step", probe):
                    stats = sampler.step(batch, loss_fn)
            with timer.unit("optimizer", timed=step >= WARMUP_STEPS):
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"{sampler.name}: loss is {stats.loss} at step {step}")
            result.analytic_cost += stats.analytic_cost
            result.steps += 1
            row = {"step": result.steps, "epoch": epoch, "loss": stats.loss, "lr": scheduler.get_last_lr()[0],
                   "time_s": timer.total(), "keep_ratio": stats.keep_ratio,
                   "analytic_cost": stats.analytic_cost, **stats.extra}
            result.train_log.append(row)
            if on_step:
                on_step(row)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", keep=f"{stats.keep_ratio:.2f}")
            if result.steps >= total_steps:
                break
        epoch += 1
        result.evals.append({"step": result.steps, "epoch": epoch, **evaluate()})
    bar.close()
    return result
