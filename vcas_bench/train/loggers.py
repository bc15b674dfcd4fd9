"""Where a run's numbers go besides its CSVs: ``logger=wandb`` or ``logger=tensorboard``.

The loop and ``run_one`` drive one small protocol, :class:`RunLogger`: ``log(section, step, values)`` for
each training step (``train``), variance phase (``phase``, the rows of ``sampler_log.csv``), variance
monitor reading (``monitor``) and evaluation (``eval``), then ``finish(summary)`` with the run's final
metrics (``None`` when it stopped early: what was logged stays, no summary). Every sampler of a
comparison is one logger run, grouped by the comparison: Weights & Biases runs share ``group=`` (the
last two parts of the output folder, e.g. ``proxy/table1-rt-3ep``) and are named by their sampler;
TensorBoard writes ``<output dir>/<sampler>/tb/``, so ``tensorboard --logdir <output dir>`` shows
them side by side. Keys are ``<section>/<name>`` (``train/loss``, ``phase/V_act_over_V_s``,
``eval/eval_accuracy``, ``summary/flops_reduction_measured``); lists spread over ``name_0, name_1, ...``.

The packages are optional and imported only when their logger is asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = ["LOGGERS", "LoggerTarget", "NoLogger", "RunLogger", "Section", "TensorBoardLogger",
           "WandbLogger", "comparison_group", "open_logger", "scalars"]

Section = Literal["train", "phase", "eval", "monitor"]


class RunLogger(Protocol):
    def log(self, section: Section, step: int, values: Mapping[str, Any]) -> None:
        """``values`` of one row of ``section`` at optimizer step ``step`` (steps never go back)."""

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """The run's final metrics (None: it stopped early), then close."""


@dataclass(frozen=True)
class LoggerTarget:
    """What a logger run is about: one sampler's run of a comparison."""

    run_dir: Path  # <output dir>/<sampler>
    sampler: str
    group: str  # the comparison's name, shared by its samplers' runs
    config: dict[str, Any]  # the resolved config, recorded with the run


def comparison_group(out_dir: Path) -> str:
    """``results/proxy/table1-rt-3ep`` -> ``proxy/table1-rt-3ep``; Hydra's ``outputs/<date>/<time>`` ->
    ``<date>/<time>``: the last two parts name a comparison and stay short."""
    return "/".join(Path(out_dir).resolve().parts[-2:])


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (lists of numbers as ``key_0, key_1, ...``), without ``step`` (the
    x-axis) and without text, flags, nested dicts and NaN."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key == "step":
            continue
        items = enumerate(value) if isinstance(value, list | tuple) else [(None, value)]
        for index, item in items:
            if isinstance(item, int | float) and not isinstance(item, bool) and math.isfinite(item):
                out[key if index is None else f"{key}_{index}"] = float(item)
    return out


class WandbLogger:
    """A Weights & Biases run per sampler, in the comparison's group (offline unless WANDB_MODE says)."""

    def __init__(self, target: LoggerTarget) -> None:
        import wandb  # optional dependency: only imported when asked for

        self._run = wandb.init(project="vcas-bench", group=target.group, job_type=target.sampler,
                               name=target.sampler, dir=str(target.run_dir), config=target.config,
                               reinit="finish_previous")

    def log(self, section: Section, step: int, values: Mapping[str, Any]) -> None:
        self._run.log({f"{section}/{k}": v for k, v in scalars(values).items()}, step=step)

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        if summary is not None:
            words = {k: v for k, v in summary.items() if isinstance(v, str)}
            self._run.summary.update({**words, **scalars(summary)})
        self._run.finish()


class TensorBoardLogger:
    """Scalars per section in ``<run dir>/tb/``; the summary as ``summary/*`` at the last step logged."""

    def __init__(self, target: LoggerTarget) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        self._writer = SummaryWriter(log_dir=str(target.run_dir / "tb"))
        self._writer.add_text("config", f"```\n{json.dumps(target.config, indent=1, default=str)}\n```")
        self._last_step = 0

    def log(self, section: Section, step: int, values: Mapping[str, Any]) -> None:
        for key, value in scalars(values).items():
            self._writer.add_scalar(f"{section}/{key}", value, step)
        self._last_step = max(self._last_step, step)

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        if summary is not None:
            for key, value in scalars(summary).items():
                self._writer.add_scalar(f"summary/{key}", value, self._last_step)
        self._writer.close()


class NoLogger:
    """``logger=null`` (and the ranks other than 0): nothing is sent anywhere."""

    def log(self, section: Section, step: int, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        pass


# One per logger= choice (vcas_bench/config.py LOGGER_PACKAGES names them and the package each needs).
LOGGERS: dict[str, Callable[[LoggerTarget], RunLogger]] = {"wandb": WandbLogger,
                                                           "tensorboard": TensorBoardLogger}


def open_logger(kind: str | None, run_dir: Path, sampler: str, config: dict[str, Any]) -> RunLogger:
    """The ``logger=`` setting's logger for one sampler's run in ``run_dir`` (``<output dir>/<sampler>``),
    grouped by its comparison; :class:`NoLogger` for ``None``."""
    if kind is None:
        return NoLogger()
    return LOGGERS[kind](LoggerTarget(run_dir, sampler, comparison_group(run_dir.parent), config))
