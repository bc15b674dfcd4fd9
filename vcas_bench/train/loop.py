"""The training loop: the only place training happens (nanoGPT-style, one function, top to bottom)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vcas_bench.measure.timers import PhaseTimer
from vcas_bench.samplers import LossFn, Sampler

WARMUP_STEPS = 2  # the first steps pay for allocations and kernel selection: not timed


@dataclass
class LoopResult:
    steps: int = 0
    train_log: list[dict[str, Any]] = field(default_factory=list)
    phase_log: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    timer: PhaseTimer | None = None
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
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Train for ``total_steps`` optimizer steps; evaluate after each epoch and at the end."""
    result = LoopResult(timer=PhaseTimer(device))
    timer = result.timer
    bar = tqdm(total=total_steps, desc=sampler.name, disable=not progress, dynamic_ncols=True)
    model.train()
    epoch = 0
    while result.steps < total_steps:
        for batch in loader:
            step = result.steps
            timed = step >= WARMUP_STEPS
            # A variance phase costs real time and FLOPs: it is timed whenever it happens.
            with timer.time("adapt"):
                phase = sampler.maybe_adapt(step, loss_fn, next_extra_batch)
            if phase is not None:
                result.phase_log.append(phase)
                result.analytic_cost += phase.get("phase_cost", 0.0)
            with timer.time("forward_backward", record=timed):
                stats = sampler.step(batch, loss_fn)
            with timer.time("optimizer", record=timed):
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
            bar.set_postfix(loss=f"{stats.loss:.4f}", keep=f"{stats.keep_ratio:.2f}",
                            it_s=f"{bar.format_dict.get('rate') or 0:.2f}")
            if result.steps >= total_steps:
                break
        epoch += 1
        result.evals.append({"step": result.steps, "epoch": epoch, **evaluate()})
    bar.close()
    return result
