"""``run(cfg)``: one comparison = the same task, model, seed and data order once per sampler.

The baselines (``exact`` by default) run first, so the sampler under test can report Time↓ and
FLOPs↓ against them. Each run writes ``metrics.json``, ``train_log.csv`` and ``sampler_log.csv``
into ``<output dir>/<sampler>/``; the comparison writes ``comparison.{md,csv,json}`` beside them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vcas_bench.assets import MissingAsset
from vcas_bench.config import GlueEvalConfig, SamplerSpec, sampler_specs
from vcas_bench.errors import RunDiverged, RunInterrupted, UsageError
from vcas_bench.measure.flops import FlopMeter
from vcas_bench.measure.memory import peak_memory_mb, reset_peak_memory
from vcas_bench.measure.timers import UnitTimer
from vcas_bench.models import create_model
from vcas_bench.report.files import write_csv, write_json
from vcas_bench.report.plots import write_comparison_figures
from vcas_bench.report.table import comparison_rows, markdown_table
from vcas_bench.samplers import SAMPLERS, Sampler
from vcas_bench.tasks import TASK_MODALITIES, create_task
from vcas_bench.train import build
from vcas_bench.train.data import EpochPlanner, build_extra_stream, build_train_stream
from vcas_bench.train.distributed import Dist, close_distributed, init_distributed
from vcas_bench.train.glue_eval import glue_eval
from vcas_bench.train.guard import OutputLock, StopSignals, write_status
from vcas_bench.train.loggers import open_logger
from vcas_bench.train.loop import LoopOptions, train
from vcas_bench.train.monitor import MonitorSettings, VarianceMonitor, monitor_summary
from vcas_bench.train.resume import (
    Resume,
    check_resume_target,
    check_settings,
    find_resume,
    project_version,
    run_settings,
)
from vcas_bench.train.state import Checkpointer, LoopResult, TrainState, latest_checkpoint, remove_leftovers
from vcas_bench.vcas import checkpoint_blocks
from vcas_bench.vcas.config import default_update_period


def run(cfg: DictConfig, out_dir: Path, samplers: list[SamplerSpec] | None = None) -> list[dict[str, Any]]:
    """Run every sampler of the comparison; return their metrics (the last one is ``cfg.sampler``).

    ``samplers``: the comparison's samplers as the CLI resolved them (:func:`vcas_bench.config.sampler_specs`,
    baselines with their ``conf/sampler`` settings); None: baselines with their default settings.

    Holds ``out_dir`` against a second writer; SIGINT/SIGTERM end it at a step boundary with
    :class:`RunInterrupted`; ``status.json`` says how it ended (see :mod:`vcas_bench.train.guard`).
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    datasets.disable_progress_bars()  # tokenising a few thousand rows needs no bar of its own
    threads = torch.get_num_threads()  # trainer.num_threads holds for this run only, not for the caller
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    specs = samplers if samplers is not None else sampler_specs(cfg)
    check_resume_target(cfg.trainer.resume, [spec.name for spec in specs])
    dist, device = init_distributed(build.build_device(cfg.trainer.device))  # torchrun's env, if any
    # Each rank may have its own Hydra run directory: all follow rank 0's (its checkpoints, resume).
    out_dir = dist.broadcast(out_dir)
    try:
        with OutputLock(out_dir) if dist.is_main else contextlib.nullcontext(), StopSignals() as stop:
            results = _run_all(cfg, specs, out_dir, device, dist, stop)
    finally:
        if dist.world > 1:
            close_distributed()
        torch.set_num_threads(threads)
    return results


def _run_all(cfg: DictConfig, specs: list[SamplerSpec], out_dir: Path, device: torch.device, dist: Dist,
             stop: StopSignals) -> list[dict[str, Any]]:
    status = (lambda *a, **k: write_status(out_dir, *a, **k)) if dist.is_main else (lambda *a, **k: None)
    results: list[dict[str, Any]] = []
    for spec in specs:
        name = spec.name
        status("running", sampler=name)
        reference = results[0] if results else None
        try:
            if stop.requested():  # the signal came as the previous sampler finished: do not start this one
                signame = signal.Signals(stop.signum).name
                raise RunInterrupted(f"interrupted by {signame} before {name} started; resume with "
                                     f"output_dir={out_dir} trainer.resume=auto", stop.signum)
            metrics = run_one(cfg, spec, out_dir / name, reference, device, dist, stop)
        except RunInterrupted as interrupt:
            status("interrupted", sampler=name, signal=interrupt.signal_name, message=str(interrupt),
                   **interrupt.details)
            raise
        except RunDiverged as err:
            status("diverged", sampler=name, step=err.step, last_checkpoint=err.last_checkpoint,
                   message=str(err))
            raise
        except (UsageError, MissingAsset) as err:  # found once the data or a checkpoint was read
            status("refused", sampler=name, message=str(err))
            raise
        except KeyboardInterrupt:  # a second signal: stopped at once, mid-step
            status("interrupted", sampler=name, message="stopped at once (a second signal), no checkpoint")
            raise
        results.append(metrics)
        if "stopped_at_step" in metrics:  # trainer.stop_after: resume later with trainer.resume=auto
            last = latest_checkpoint(out_dir / name)
            status("stopped", sampler=name, step=metrics["stopped_at_step"],
                   last_checkpoint=str(last) if last else None)
            return results
    if dist.is_main:
        _write_comparison(out_dir, results)
    status("finished", samplers=[spec.name for spec in specs])
    return results


def _write_comparison(out_dir: Path, results: list[dict[str, Any]]) -> None:
    rows = comparison_rows(results)
    write_csv(out_dir / "comparison.csv", rows)
    write_json(out_dir / "comparison.json", {"rows": rows})
    table = markdown_table(rows)
    (out_dir / "comparison.md").write_text(table + "\n")
    print(table)
    write_comparison_figures(out_dir, [r["sampler"] for r in results])  # comparison_*.png


def run_one(
    cfg: DictConfig, spec: SamplerSpec, run_dir: Path, reference: dict[str, Any] | None,
    device: torch.device, dist: Dist | None = None, stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Train one sampler with the comparison's seed (or resume it); write and return its metrics.

    Returns ``{"sampler": ..., "stopped_at_step": k}`` instead when ``trainer.stop_after`` ended it early;
    raises :class:`RunInterrupted` when ``stop`` saw a signal. Under data parallelism only rank 0
    evaluates and writes.
    """
    started = time.perf_counter()
    dist = dist or Dist()
    settings, force = run_settings(cfg, {"name": spec.name, **spec.configured}), cfg.trainer.resume_force
    finished = run_dir / "metrics.json"
    if cfg.trainer.resume == "auto" and finished.exists():  # finished before: not redone
        metrics = json.loads(finished.read_text())
        if "config" in metrics:  # written by a version that records its settings
            check_settings(Resume(finished, metrics), settings, force, "trainer.resume=auto")
        return metrics
    resumed = find_resume(cfg.trainer.resume, run_dir, spec.name, settings, force, writer=dist.is_main)
    if dist.is_main:
        remove_leftovers(run_dir)  # temporary files of a killed write (this process holds the directory)
    # Same model init and dropout stream for every sampler of a comparison; under DDP each rank its own
    # dropout stream, and rank 0's initial weights for all.
    torch.manual_seed(cfg.seed + dist.rank)
    bundle, data = _build_model_and_data(cfg)
    _check_data(cfg, data, dist.world)  # before anything trains: a batch the data cannot fill, ...
    bundle.model.to(device)
    dist.broadcast_parameters(bundle.model)
    batch_size, accumulate = cfg.task.batch_size, cfg.trainer.accumulate
    total_steps, per_epoch = build.planned_steps(len(data.train) // dist.world, batch_size * accumulate,
                                                  cfg.task.epochs, cfg.trainer.max_steps)
    state = _build_state(cfg, spec, bundle, data, total_steps, per_epoch, device, dist)
    sampler, optim = state.sampler, cfg.model.optim
    if resumed is not None:
        state.load(resumed.checkpoint, rank=dist.rank, world=dist.world)
    eval_loaders = {"": DataLoader(data.eval, batch_size=cfg.task.eval_batch_size)}
    eval_loaders.update({f"{name}_": DataLoader(ds, batch_size=cfg.task.eval_batch_size)
                         for name, ds in data.extra_eval.items()})  # e.g. MNLI mismatched
    reset_peak_memory(device)
    options = LoopOptions(
        total_steps=total_steps, accumulate=accumulate, max_grad_norm=optim.max_grad_norm,
        flops_every=cfg.trainer.flops_every, progress=cfg.trainer.progress,
        time_detail=device.type == "cpu" if cfg.trainer.time_detail is None else cfg.trainer.time_detail,
        checkpoint_every=cfg.trainer.checkpoint_every, stop_after=cfg.trainer.stop_after,
        epoch_steps=per_epoch if isinstance(sampler, EpochPlanner) else None,
    )
    save = Checkpointer(state, run_dir, spec.name, keep=cfg.trainer.keep_checkpoints,
                        gather=dist.gather if dist.world > 1 else None, writer=dist.is_main,
                        meta={"config": settings, "version": project_version()})
    save.last = resumed.path if resumed is not None else None
    logger = open_logger(cfg.logger if dist.is_main else None, run_dir, spec.name,
                         OmegaConf.to_container(cfg, resolve=True))
    try:
        result = train(
            state, build.build_loss_fn(bundle, device, cfg.trainer.precision, cfg.trainer.compile),
            evaluate=lambda: build.evaluate_all(bundle, eval_loaders, device) if dist.is_main else {},
            options=options, save=save, logger=logger, dist=dist,
            should_stop=stop.requested if stop is not None else None,
            monitor=_build_monitor(cfg, data, cfg.model.block_type or bundle.block_type, total_steps, dist),
        )
    except BaseException:
        logger.finish(None)  # what it logged stays; no summary
        raise
    finally:
        sampler.detach()
    if result.interrupted or result.stopped:
        logger.finish(None)
    if result.interrupted:
        raise _interrupted(cfg, spec.name, result.steps, total_steps, save, stop.signum, run_dir.parent)
    if result.stopped:
        return {"sampler": spec.name, "stopped_at_step": result.steps}
    metrics = _metrics(cfg, spec, result, device, total_steps, per_epoch, reference, sampler.run_metrics())
    metrics["config"] = settings  # a later trainer.resume=auto compares against these
    if resumed is not None and resumed.forced:
        metrics.update(resume_force=True, resume_differences=resumed.forced)
    metrics["wall_clock_s"] = time.perf_counter() - started  # this process's share when resumed
    metrics["resumed_from_step"] = result.resumed_from
    metrics["world_size"] = dist.world
    metrics["global_batch_size"] = batch_size * accumulate * dist.world
    if not dist.is_main:
        return metrics
    if cfg.task.glue_eval.task is not None:  # pretraining is scored by fine-tuning on GLUE
        glue = GlueEvalConfig(**OmegaConf.to_container(cfg.task.glue_eval, resolve=True))
        metrics.update(glue_eval(bundle, glue, cfg.seed, device))
    write_json(run_dir / "metrics.json", metrics)
    write_csv(run_dir / "train_log.csv", result.train_log)
    if result.phase_log:
        write_csv(run_dir / "sampler_log.csv", [_flatten(p) for p in result.phase_log])
    if result.monitor_log:
        write_csv(run_dir / "variance_log.csv", result.monitor_log)
    logger.finish(metrics)
    return metrics


def _interrupted(cfg: DictConfig, name: str, step: int, total: int, save: Checkpointer, signum: int,
                 out_dir: Path) -> RunInterrupted:
    """The one line an interrupt ends with: where it stopped, the checkpoint, how to go on."""
    where = f"interrupted by {signal.Signals(signum).name} at step {step}/{total} of {name}"
    if cfg.trainer.checkpoint_every and save.last is not None:
        then = f"checkpoint {save.last}; resume with output_dir={out_dir} trainer.resume=auto"
    else:
        then = "no checkpoint (trainer.checkpoint_every=0): a rerun starts afresh"
    last = str(save.last) if save.last is not None else None
    return RunInterrupted(f"{where}; {then}", signum,
                          {"step": step, "total_steps": total, "last_checkpoint": last})


def _check_data(cfg: DictConfig, data, world: int) -> None:
    """Problems only the loaded data shows, in the same one-line form as the config's."""
    rows, problems = len(data.train) // world, []
    if cfg.task.batch_size > rows:
        shard = f" per rank of {world}" if world > 1 else ""
        problems.append(f"task.batch_size={cfg.task.batch_size}: larger than the training set ({rows} rows"
                        f"{shard}); lower it or raise task.args.train_size")
    if data.num_labels != cfg.task.num_labels:
        problems.append(f"task.num_labels={cfg.task.num_labels}: task {cfg.task.name!r} has "
                        f"{data.num_labels} labels; set task.num_labels={data.num_labels}")
    if len(data.eval) == 0:
        problems.append(f"task {cfg.task.name!r}: the eval set is empty (task.args.eval_size, its data)")
    if problems:
        raise UsageError("; ".join(problems))


def _build_state(cfg: DictConfig, spec: SamplerSpec, bundle, data, total_steps: int, per_epoch: int,
                 device: torch.device, dist: Dist) -> TrainState:
    """Sampler, optimizer, schedule, data streams, meters and loss scaler of a fresh run."""
    optim, batch_size, model = cfg.model.optim, cfg.task.batch_size, bundle.model
    optimizer = build.build_optimizer(model, optim.name, optim.lr, optim.weight_decay, optim.momentum)
    block_type = cfg.model.block_type or bundle.block_type
    sampler = _create_sampler(cfg, spec, model, block_type, total_steps, dist)
    # A data-level sampler (InfoBatch) plans each epoch's rows: its run and schedule count epochs.
    planner = sampler if isinstance(sampler, EpochPlanner) else None
    batches = build_train_stream(data.train, batch_size, cfg.seed, dist.rank, dist.world, planner)
    clock = None
    if planner is not None:
        planner.set_epochs(total_steps / per_epoch)
        clock = lambda: batches.progress * per_epoch  # noqa: E731  (full-data steps done)
    return TrainState(
        model=model, sampler=sampler, optimizer=optimizer,
        scheduler=build.build_scheduler(optimizer, optim.schedule, total_steps, optim.warmup_ratio, clock),
        batches=batches,
        extra=build_extra_stream(_phase_rows(data), batch_size, cfg.seed, dist.rank, dist.world),
        result=LoopResult(timer=UnitTimer(device), flops=FlopMeter(cfg.trainer.flops_every)),
        scaler=build.build_grad_scaler(cfg.trainer.precision, device),
    )


def _create_sampler(cfg: DictConfig, spec: SamplerSpec, model, block_type: str, total_steps: int,
                    dist: Dist) -> Sampler:
    # Own generator per rank (independent draws); decisions shared through the reduced statistics.
    reduce_fn = dist.mean_tensor if dist.world > 1 else None
    sampler = SAMPLERS.create(spec.name, settings=spec.settings, seed=cfg.seed + dist.rank,
                              reduce_fn=reduce_fn)
    if cfg.trainer.gradient_checkpointing:
        checkpoint_blocks(model, block_type)  # a sampler that wraps the blocks makes it row-compact
    sampler.attach(model, block_type, total_steps)
    return sampler


def _build_monitor(cfg: DictConfig, data, block_type: str, total_steps: int, dist: Dist
                   ) -> VarianceMonitor | None:
    """The variance monitor when ``monitor.enabled``: the same steps and batches for every sampler."""
    mon = cfg.monitor
    if not mon.enabled:
        return None
    every = mon.every or cfg.task.vcas_F or default_update_period(total_steps)
    settings = MonitorSettings(every=every, batches=mon.batches, draws=mon.draws,
                               param_sample_ratio=mon.param_sample_ratio)
    # The phases' rows: reading them draws no training randomness (c4's masks; docs of TaskData).
    return VarianceMonitor(settings, _phase_rows(data), cfg.task.batch_size, block_type, cfg.seed + dist.rank)


def _build_model_and_data(cfg: DictConfig):
    task_args = OmegaConf.to_container(cfg.task.args, resolve=True)
    model_args = OmegaConf.to_container(cfg.model.args, resolve=True)
    mlm = TASK_MODALITIES.get(cfg.task.name) == "mlm"  # pretraining: the model's masked-LM variant
    bundle = create_model(cfg.model.name, num_labels=cfg.task.num_labels, mlm=mlm, **model_args)
    data = create_task(cfg.task.name, bundle, model_name=cfg.model.name, seed=cfg.seed, **task_args)
    return bundle, data


def _phase_rows(data):
    """Where VCAS's variance phases read their batches (their own copy when reading draws masks)."""
    return data.phase_train if data.phase_train is not None else data.train


def final_train_loss(losses: list[float]) -> float:
    """Mean over the last 1% of steps, or the last 10 steps when that is more."""
    window = max(10, len(losses) // 100)
    tail = losses[-window:]
    return sum(tail) / len(tail)


def _metrics(cfg, spec: SamplerSpec, result: LoopResult, device, total_steps: int, per_epoch: int,
             reference: dict[str, Any] | None, sampler_metrics: dict[str, Any]) -> dict[str, Any]:
    timer = result.timer
    train_time = timer.total()
    # Over the planned steps (those of the exact run): a data-level sampler takes fewer steps than planned.
    analytic = result.analytic_cost / total_steps
    flops = result.flops.totals()
    metrics = {
        "task": cfg.task.name, "model": cfg.model.name, "sampler": spec.name, "seed": cfg.seed,
        "steps": result.steps, "steps_per_epoch": per_epoch, "batch_size": cfg.task.batch_size,
        "accumulate": cfg.trainer.accumulate, "precision": cfg.trainer.precision,
        "sampler_settings": spec.configured,
        "final_train_loss": final_train_loss([r["loss"] for r in result.train_log]),
        **{k: v for k, v in result.evals[-1].items() if k.startswith("eval_")},
        "evals": result.evals,
        "train_time_s": train_time,
        "time_step_s": timer.total("step"),
        "time_optimizer_s": timer.total("optimizer"),
        "time_phases_s": timer.total("phase"),
        "time_per_step_ms": 1000 * (timer.mean("step") or math.nan),
        **_forward_backward_split(timer),
        "timed_steps": timer.timed["step"],
        "timed_phases": timer.timed["phase"],
        "keep_ratio_mean": sum(r["keep_ratio"] for r in result.train_log) / result.steps,
        "analytic_flops_ratio": analytic,
        "flops_reduction_analytic": 1 - analytic,
        "adapt_phases": len(result.phase_log),
        "vcas_F": None,  # the sampler's run_metrics() give it when it has a period (VCAS)
        "experiment": cfg.get("name"),
        **monitor_summary(result.monitor_log),
        **flops,
        "device": str(device),
        **peak_memory_mb(device),
    }
    metrics.update(sampler_metrics)  # the sampler's own (VCAS: vcas_F and its final schedule)
    if reference is not None:
        if reference["train_time_s"] > 0:  # 0 in very short runs: every step was warm-up or a probe
            metrics["time_reduction"] = 1 - train_time / reference["train_time_s"]
        if flops["flops_total"] and reference.get("flops_total"):
            metrics["flops_reduction_measured"] = 1 - flops["flops_total"] / reference["flops_total"]
        # Only a real saving has a conversion: Time↓/FLOPs↓ of two negatives would read as a gain.
        if metrics.get("flops_reduction_measured", 0.0) > 0 and "time_reduction" in metrics:
            conversion = metrics["time_reduction"] / metrics["flops_reduction_measured"]
            metrics["time_over_flops_reduction"] = conversion
    return metrics


def _forward_backward_split(timer) -> dict[str, float]:
    """Forward and backward seconds of all steps, when the forward was timed (detail mode)."""
    forward, step = timer.mean("forward"), timer.mean("step")
    if forward is None or step is None:
        return {}
    steps = timer.units["step"]
    return {"time_forward_s": forward * steps, "time_backward_s": (step - forward) * steps}


def _flatten(phase: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in phase.items():
        if isinstance(value, list):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat

