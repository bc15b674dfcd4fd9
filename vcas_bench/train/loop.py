"""The training loop: the only place training happens (nanoGPT-style, one function, top to bottom)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vcas_bench.errors import RunDiverged
from vcas_bench.samplers import LossFn, StepStats
from vcas_bench.train.distributed import Dist
from vcas_bench.train.state import Checkpointer, LoopResult, TrainState

if TYPE_CHECKING:
    from vcas_bench.train.loggers import RunLogger
    from vcas_bench.train.monitor import VarianceMonitor

__all__ = ["LoopOptions", "LoopResult", "train"]

WARMUP_STEPS = 2  # the first micro-steps of a process pay for allocations and kernel selection: not timed


@dataclass
class LoopOptions:
    """How the loop runs (flat numbers; the objects it drives are in :class:`TrainState`)."""

    total_steps: int  # optimizer steps
    accumulate: int = 1  # micro-batches per optimizer step; the gradient is their mean
    max_grad_norm: float | None = None
    flops_every: int = 10
    time_detail: bool = False
    progress: bool = True
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: none); the last step is saved too
    stop_after: int | None = None  # end this process after that many steps (checkpointed), unfinished
    # A data-level sampler (InfoBatch, short epochs): full-data optimizer steps per epoch. The run then
    # ends when its epochs cover total_steps full-data steps, not after total_steps optimizer steps.
    epoch_steps: int | None = None


def train(
    state: TrainState,
    loss_fn: LossFn,
    evaluate: Callable[[], dict[str, float]],
    options: LoopOptions,
    save: Checkpointer | None = None,
    logger: RunLogger | None = None,
    dist: Dist | None = None,
    should_stop: Callable[[], bool] | None = None,
    monitor: VarianceMonitor | None = None,
) -> LoopResult:
    """Train up to ``options.total_steps`` optimizer steps from wherever ``state`` stands.

    Evaluates after each epoch and at the end; calls ``save(step)`` every ``checkpoint_every`` steps, at
    the end, and before a ``stop_after`` stop or a ``should_stop()`` one (a signal, read once per step).
    Under ``dist`` (data parallel) gradients and the logged loss are averaged over ranks before the update.
    A ``monitor`` measures the sampler's extra variance after the update of every ``every``-th step,
    outside the timer's and the FLOP meter's units (its cost is its own). A ``logger`` gets every step's
    row, phase, monitor reading and evaluation as they are made.
    """
    dist = dist or Dist()
    model, sampler, optimizer, scheduler = state.model, state.sampler, state.optimizer, state.scheduler
    result, batches = state.result, state.batches
    timer, meter = result.timer, result.flops
    loss_fn = meter.wrap_loss_fn(loss_fn)
    if state.scaler is not None:
        loss_fn = _with_loss_scale(loss_fn, state.scaler)
    if options.time_detail:  # forward timed on its own; backward = step - forward
        loss_fn = timer.time_forward(loss_fn)
    warm = result.micro_steps + WARMUP_STEPS
    started = result.steps
    bar = tqdm(total=options.total_steps, initial=started, desc=sampler.name, disable=not options.progress,
               dynamic_ncols=True)
    model.train()
    while _budget_used(result, batches, options) < options.total_steps:
        step = result.steps
        micro: list[StepStats] = []
        for index in range(options.accumulate):
            batch = batches.next()
            if index == 0:  # the stream rolls over to the next epoch lazily, when this batch is drawn
                epoch = batches.epoch
            folded = None
            # F counts optimizer steps: the variance phase runs once, before the step's first micro-batch.
            # It takes its gradients with autograd.grad, so a gradient accumulated in .grad is never lost.
            if index == 0 and sampler.adapt_due(step):
                probe = meter.is_probe("phase", len(result.phase_log))
                with timer.unit("phase", timed=not probe), meter.unit("phase", probe):
                    report = sampler.adapt(step, loss_fn, state.extra, batch)
                result.phase_log.append(report.log)
                if logger:
                    logger.log("phase", step, report.log)
                result.analytic_cost += report.cost / options.accumulate
                folded = report.folded_step
            if folded is not None:  # the phase did this micro-batch's backward: its work is the phase's
                stats = folded
            else:
                probe = meter.is_probe("step", result.micro_steps)
                timed = result.micro_steps >= warm and not probe  # warm-up and counted steps: not timed
                with timer.unit("step", timed=timed), meter.unit("step", probe):
                    stats = sampler.step(batch, loss_fn)
            result.micro_steps += 1
            micro.append(stats)
        loss = dist.mean(sum(s.loss for s in micro) / len(micro))  # all ranks see (and guard) the same
        _check_finite(loss, "loss", sampler.name, step, save)  # before the update: no bad state is saved
        with timer.unit("optimizer", timed=result.micro_steps > warm):
            dist.mean_gradients(model)
            _apply_update(model, optimizer, state.scaler, options, sampler.name, step, save)
            scheduler.step()
        cost = sum(s.analytic_cost for s in micro) / len(micro)
        result.analytic_cost += cost
        result.steps += 1
        row = {"step": result.steps, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
               "time_s": timer.total(), "keep_ratio": sum(s.keep_ratio for s in micro) / len(micro),
               "analytic_cost": cost, **micro[-1].extra}
        result.train_log.append(row)
        if logger:
            logger.log("train", result.steps, row)
        if monitor is not None and monitor.due(result.steps):  # after the update: .grad is clear
            result.monitor_log.append(asdict(monitor.measure(result.steps, model, sampler, loss_fn)))
            if logger:
                logger.log("monitor", result.steps, result.monitor_log[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", keep=f"{row['keep_ratio']:.2f}")
        # After each epoch (an accumulation window may end in the next one) and at the end.
        crossed = batches.epoch_done or batches.epoch != epoch
        done = _budget_used(result, batches, options) >= options.total_steps
        if crossed or done:
            epochs = batches.epoch + (batches.epoch_done or not crossed)  # a partial last epoch counts
            result.evals.append({"step": result.steps, "epoch": epochs, **evaluate()})
            if logger:
                logger.log("eval", result.steps, result.evals[-1])
        asked = should_stop is not None and dist.mean(float(should_stop())) > 0  # any rank: all stop here
        stop = (asked or options.stop_after is not None and result.steps - started >= options.stop_after) \
            and not done
        every = options.checkpoint_every
        if save and every and (result.steps % every == 0 or done or stop):
            _check_finite_parameters(model, sampler.name, result.steps, save)
            save(result.steps)
        if stop:
            result.stopped, result.interrupted = True, asked
            break
    bar.close()
    return result


def _budget_used(result: LoopResult, batches, options: LoopOptions) -> float:
    """Optimizer steps taken, or with ``epoch_steps`` the full-data steps the epochs so far cover."""
    if options.epoch_steps is None:
        return result.steps
    return batches.progress * options.epoch_steps + 1e-9  # float sums of epoch shares


def _apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                  options: LoopOptions, name: str, step: int, save: Checkpointer | None) -> None:
    """Unscale (fp16), mean over micro-batches, optional clipping, the optimizer step; clears ``.grad``."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if options.accumulate > 1:  # .grad holds the sum of the micro-batch means
        for param in model.parameters():
            if param.grad is not None:
                param.grad.div_(options.accumulate)
    if options.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.max_grad_norm)
        if scaler is None:  # with fp16 an overflow is the scaler's to handle: it skips the step
            _check_finite(float(norm), "gradient norm", name, step, save)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _ScaleGradient(torch.autograd.Function):
    """Identity on the per-example losses; their gradient is multiplied by the fp16 loss scale.

    Every gradient below is scaled as ``scaler.scale(loss).backward()`` would scale it, while samplers
    see true loss values (SB's loss percentiles, logged losses). VCAS's decisions use ratios of
    norms and variances, which a common scale leaves unchanged.
    """

    @staticmethod
    def forward(ctx, losses: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return losses.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def _with_loss_scale(loss_fn: LossFn, scaler: torch.amp.GradScaler) -> LossFn:
    def scaled(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        losses, logits = loss_fn(batch)
        scale = scaler.scale(torch.ones((), device=losses.device))  # the current scale, without a sync
        return _ScaleGradient.apply(losses, scale), logits

    return scaled


def _check_finite(value: float, what: str, name: str, step: int, save) -> None:
    if not math.isfinite(value):
        raise RunDiverged(f"{name}: {what} is {value} at step {step + 1}; stopped before the update"
                          f"{_last_checkpoint(save)}", step + 1, _last_path(save))


def _check_finite_parameters(model: nn.Module, name: str, step: int, save) -> None:
    """Checkpoints hold finite parameters only: an update that overflowed stops the run instead."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        others = " and others" if len(bad) > 1 else ""
        raise RunDiverged(f"{name}: parameters became non-finite at step {step} ({bad[0]}{others}); not "
                          f"checkpointed{_last_checkpoint(save)}", step, _last_path(save))


def _last_path(save: Checkpointer | None) -> str | None:
    last = save.last if save is not None else None
    return str(last) if last else None


def _last_checkpoint(save: Checkpointer | None) -> str:
    last = _last_path(save)
    return f"; last good checkpoint: {last}" if last else "; no checkpoint was written"
