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
from vcas_bench.samplers import LossFn, Sampler, StepStats
from vcas_bench.train.data import BatchStream

WARMUP_STEPS = 2  # the first micro-steps pay for allocations and kernel selection: not timed


@dataclass
class LoopOptions:
    """How the loop runs (flat numbers; the objects it drives are :func:`train`'s arguments)."""

    total_steps: int  # optimizer steps
    accumulate: int = 1  # micro-batches per optimizer step; the gradient is their mean
    max_grad_norm: float | None = None
    flops_every: int = 10
    time_detail: bool = False
    progress: bool = True


@dataclass
class LoopResult:
    steps: int = 0  # optimizer steps
    micro_steps: int = 0  # forward+backward passes of training batches (steps x accumulate)
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
    batches: BatchStream,
    next_extra_batch: Callable[[], Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    evaluate: Callable[[], dict[str, float]],
    device: torch.device,
    options: LoopOptions,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Train for ``options.total_steps`` optimizer steps; evaluate after each epoch and at the end."""
    timer, meter = UnitTimer(device), FlopMeter(options.flops_every)
    result = LoopResult(timer=timer, flops=meter)
    loss_fn = meter.wrap_loss_fn(loss_fn)
    if options.time_detail:  # forward timed on its own; backward = step - forward
        loss_fn = timer.time_forward(loss_fn)
    bar = tqdm(total=options.total_steps, desc=sampler.name, disable=not options.progress, dynamic_ncols=True)
    model.train()
    while result.steps < options.total_steps:
        step, epoch = result.steps, batches.epoch
        micro: list[StepStats] = []
        for index in range(options.accumulate):
            batch = batches.next()
            phase = None
            # F counts optimizer steps: the variance phase runs once, before the step's first micro-batch.
            # It takes its gradients with autograd.grad, so a gradient accumulated in .grad is never lost.
            if index == 0 and sampler.adapt_due(step):
                probe = meter.is_probe("phase", len(result.phase_log))
                with timer.unit("phase", timed=not probe), meter.unit("phase", probe):
                    phase = sampler.adapt(step, loss_fn, next_extra_batch, batch)
                result.phase_log.append(phase)
                result.analytic_cost += phase.get("phase_cost", 0.0) / options.accumulate
            if phase is not None and phase.get("folded_step"):
                stats = sampler.step(batch, loss_fn)  # applies the phase's exact gradient: phase work
            else:
                probe = meter.is_probe("step", result.micro_steps)
                # Warm-up and counted steps run like any other but are left out of the timing.
                timed = result.micro_steps >= WARMUP_STEPS and not probe
                with timer.unit("step", timed=timed), meter.unit("step", probe):
                    stats = sampler.step(batch, loss_fn)
            result.micro_steps += 1
            micro.append(stats)
        loss = sum(s.loss for s in micro) / len(micro)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{sampler.name}: loss is {loss} at step {step}")
        with timer.unit("optimizer", timed=step >= WARMUP_STEPS):
            if options.accumulate > 1:  # .grad holds the sum of the micro-batch means
                for param in model.parameters():
                    if param.grad is not None:
                        param.grad.div_(options.accumulate)
            if options.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        cost = sum(s.analytic_cost for s in micro) / len(micro)
        result.analytic_cost += cost
        result.steps += 1
        row = {"step": result.steps, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
               "time_s": timer.total(), "keep_ratio": sum(s.keep_ratio for s in micro) / len(micro),
               "analytic_cost": cost, **micro[-1].extra}
        result.train_log.append(row)
        if on_step:
            on_step(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", keep=f"{row['keep_ratio']:.2f}")
        # After each epoch (an accumulation window may end in the next one) and at the end.
        crossed = batches.epoch_done or batches.epoch != epoch
        if crossed or result.steps >= options.total_steps:
            epochs = batches.epoch + (batches.epoch_done or not crossed)  # a partial last epoch counts
            result.evals.append({"step": result.steps, "epoch": epochs, **evaluate()})
    bar.close()
    return result
