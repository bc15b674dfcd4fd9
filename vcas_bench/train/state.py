"""Everything a run must save to resume as if it had never stopped, and the checkpoint files.

A checkpoint is taken between optimizer steps (never inside an accumulation window) and holds the
model, optimizer, scheduler, gradient scaler, the sampler's own state (VCAS: s, rho, nu, step counters,
adaptive-period state, its generator), the global torch RNG (dropout) and Python's ``random``, the
position of the training and variance-phase batch streams, and what the run has logged and measured
so far. Under DDP each rank's RNG, sampler and stream states are gathered into rank 0's file.

Files are ``<run dir>/checkpoints/step_<step>.pt``, written to a temporary file and renamed, so a
run killed mid-write leaves the previous checkpoint intact (the temporary file is removed when the run
dir is next written); only the last ``keep`` are kept. Each also holds the run's settings and the
project version (``meta``), which a resume compares (:mod:`vcas_bench.train.resume`).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcas_bench.errors import UsageError
from vcas_bench.measure.flops import FlopMeter
from vcas_bench.measure.timers import UnitTimer
from vcas_bench.samplers import LogRow, Sampler
from vcas_bench.train.data import BatchStream

__all__ = ["LoopResult", "TrainState", "Checkpointer", "UnreadableCheckpoint", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "checkpoint_dir", "checkpoints", "remove_leftovers"]

FORMAT = 1


@dataclass
class LoopResult:
    steps: int = 0  # optimizer steps
    micro_steps: int = 0  # forward+backward passes of training batches (steps x accumulate)
    train_log: list[LogRow] = field(default_factory=list)
    phase_log: list[LogRow] = field(default_factory=list)  # the PhaseReports' logs: sampler_log.csv
    monitor_log: list[dict[str, Any]] = field(default_factory=list)  # variance monitor records
    evals: list[dict[str, Any]] = field(default_factory=list)
    timer: UnitTimer | None = None
    flops: FlopMeter | None = None
    analytic_cost: float = 0.0  # summed analytic FLOPs, in exact-step units (steps + phases)
    stopped: bool = False  # ended early by ``trainer.stop_after`` or a signal: the run is not finished
    interrupted: bool = False  # the early end was a signal's (SIGINT/SIGTERM)
    resumed_from: int | None = None  # the step a resumed run started from

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "micro_steps": self.micro_steps, "train_log": self.train_log,
                "phase_log": self.phase_log, "monitor_log": self.monitor_log, "evals": self.evals,
                "analytic_cost": self.analytic_cost,
                "timer": self.timer.state_dict(), "flops": self.flops.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("steps", "micro_steps", "train_log", "phase_log", "evals", "analytic_cost"):
            setattr(self, key, state[key])
        self.monitor_log = state.get("monitor_log", [])  # absent in checkpoints of earlier versions
        self.timer.load_state_dict(state["timer"])
        self.flops.load_state_dict(state["flops"])
        self.resumed_from = self.steps


@dataclass
class TrainState:
    """The stateful objects of one run; :meth:`state_dict` is what a checkpoint holds."""

    model: nn.Module
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: BatchStream
    extra: BatchStream
    result: LoopResult
    scaler: torch.amp.GradScaler | None = None

    def local_state(self) -> dict[str, Any]:
        """What differs between DDP ranks: RNGs, the sampler (own generator) and the data position."""
        cuda_used = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda = torch.cuda.get_rng_state_all() if cuda_used else None
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "python_rng": random.getstate(),
                "sampler": self.sampler.state_dict(), "batches": self.batches.state_dict(),
                "extra": self.extra.state_dict()}

    def shared_state(self) -> dict[str, Any]:
        """What every rank holds alike (parameters and optimizer state are synchronised)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "result": self.result.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, checkpoint: dict[str, Any], rank: int = 0, world: int = 1) -> None:
        ranks = len(checkpoint["ranks"])
        if ranks != world:  # data shards and per-rank generators only continue with the same split
            raise ValueError(f"checkpoint step {checkpoint['step']} was written by {ranks} rank(s); "
                             f"resume it with {ranks}, not {world}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint["scaler"] is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.result.load_state_dict(checkpoint["result"])
        local = checkpoint["ranks"][rank]
        self.sampler.load_state_dict(local["sampler"])
        self.batches.load_state_dict(local["batches"])
        self.extra.load_state_dict(local["extra"])
        # Restoring saved states (not reseeding): dropout and any Python-level draw continue as before.
        torch.set_rng_state(local["torch_rng"])
        if local["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(local["cuda_rng"])
        version, state, gauss = local["python_rng"]
        random.setstate((version, tuple(state), gauss))


class Checkpointer:
    """``save(step)``: writes the run's state (rank 0), remembers the last good checkpoint.

    ``gather`` collects every rank's :meth:`TrainState.local_state` (a collective: all ranks call it).
    """

    def __init__(self, state: TrainState, run_dir: Path, sampler: str, keep: int = 2,
                 gather: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None,
                 writer: bool = True, meta: dict[str, Any] | None = None) -> None:
        self.state, self.run_dir, self.sampler, self.keep = state, run_dir, sampler, keep
        self.gather, self.writer, self.meta = gather, writer, meta or {}
        self.last: Path | None = None

    def __call__(self, step: int) -> None:
        local = self.state.local_state()
        ranks = self.gather(local) if self.gather else [local]
        if self.writer:
            content = {"sampler": self.sampler, "ranks": ranks, **self.meta, **self.state.shared_state()}
            self.last = save_checkpoint(self.run_dir, step, content, self.keep)
        else:
            self.last = checkpoint_path(self.run_dir, step)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:09d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically; delete all but the newest ``keep`` checkpoints."""
    path = checkpoint_path(run_dir, step)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, "step": step, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the latest
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step_*.pt"))  # zero-padded: name order is step order; temp files start "."


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    return _checkpoints(checkpoint_dir(run_dir))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of writes that a kill interrupted (only ever complete files are renamed)."""
    for leftover in checkpoint_dir(run_dir).glob(".step_*"):
        leftover.unlink(missing_ok=True)


class UnreadableCheckpoint(UsageError):
    """A checkpoint file that is empty, truncated, garbage or not vcas-bench's; the message names it."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError (empty), RuntimeError (truncated zip), UnpicklingError (garbage)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"checkpoint {path} is unreadable ({type(err).__name__}: {reason[:120]})"
        raise UnreadableCheckpoint(message) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UnreadableCheckpoint(f"checkpoint {path} is not a vcas-bench checkpoint (format {found!r})")
    return checkpoint
