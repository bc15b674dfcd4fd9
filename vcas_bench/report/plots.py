"""Figures of a comparison or a sweep, after the paper's Figs. 6, 5 and 11 (PNG, matplotlib's Agg renderer).

- ``<name>_loss_vs_flops.png`` (Fig. 6): train loss of every run against normalised FLOPs, the
  cumulative cost (variance phases included) over the cost of the exact run; exact ends at 1.
- ``<name>_variance.png`` (Fig. 5, VCAS's own): V_act/V_s and V_w/V_s of every run with variance phases
  (``vcas``, ``vcas-plus``), per phase, against τ_act and τ_w.
- ``<name>_variance_monitor.png`` (Fig. 5 for every sampler): each run's extra variance over the SGD
  variance from the variance monitor (``variance_log.csv``, ``monitor.enabled=true``), τ marked.
- ``<name>_schedule.png`` (Fig. 11): s, ρ per block and ν per linear over training (with several runs:
  s, mean ρ and mean ν of each).

A comparison's lines are its runs (labelled by sampler); a sweep's are its jobs' runs, labelled by the
swept value (``tau=0.025``) and coloured along it, the exact reference in black. Titles name the
samplers and the setting. Figures are ``matplotlib.figure.Figure`` objects, never pyplot: no global
figure state, no backend switch. A figure with nothing to show is not written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from vcas_bench.report.runs import RunFolder, effective_tau, read_comparison, setting_label
from vcas_bench.report.sweeps import Sweep, read_sweep

log = logging.getLogger(__name__)

__all__ = ["Line", "moving_average", "normalised_flops", "plot_comparison", "plot_lines",
           "plot_loss_vs_flops", "plot_monitored_variance", "plot_schedule", "plot_sweep", "plot_variance",
           "sweep_lines", "write_comparison_figures"]

MEASURED_FLOPS_COLUMNS = ("flops_total", "flops")  # a per-step measured count in train_log.csv, if any
VARIANCE_COLUMNS = ("V_act_over_V_s", "V_w_over_V_s")
BIASED_Z = 10  # the monitor's bias_z above which a reading is marked biased (far beyond its draws' scatter)


@dataclass(frozen=True)
class Line:
    """One run as drawn: its legend label and colour."""

    label: str
    run: RunFolder
    color: str


def moving_average(values: pd.Series, window: int) -> pd.Series:
    """Trailing mean over ``window`` points (fewer at the start)."""
    return values.rolling(max(1, window), min_periods=1).mean()


def normalised_flops(train_log: pd.DataFrame, sampler_log: pd.DataFrame | None, exact_cost: float,
                     column: str = "analytic_cost") -> np.ndarray:
    """Cumulative cost after each step over ``exact_cost`` (the whole exact run's cost, same unit).

    A variance phase logged at step k ran before training step k + 1, so its ``phase_cost`` (in
    exact-step units, analytic only) counts from that step on.
    """
    cumulative = train_log[column].to_numpy(dtype=float).cumsum()
    if sampler_log is not None and column == "analytic_cost" and "phase_cost" in sampler_log:
        phases = sampler_log.sort_values("step")
        phase_total = np.concatenate([[0.0], phases["phase_cost"].to_numpy(dtype=float).cumsum()])
        done = np.searchsorted(phases["step"].to_numpy(), train_log["step"].to_numpy(), side="left")
        cumulative = cumulative + phase_total[done]
    return cumulative / exact_cost


def _title(what: str, subject: str, reference: RunFolder) -> str:
    """What the figure shows, whose runs (the samplers), and the setting they ran in."""
    return f"{what}\n{subject}\n{setting_label(reference.metrics)}, seed {reference.metrics.get('seed', '?')}"


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG atomically (temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finish(fig: Figure, axes: Sequence[Axes], path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", ncols=2 if len(ax.get_legend_handles_labels()[0]) > 6 else 1)
    return _save(fig, path)


def _with(lines: Sequence[Line], log: str, columns: Sequence[str] = ()) -> list[Line]:
    """The lines whose run has a non-empty ``log`` (train_log, sampler_log, variance_log) with ``columns``."""
    def has(line: Line) -> bool:
        frame = getattr(line.run, log)
        return frame is not None and len(frame) > 0 and set(columns) <= set(frame.columns)

    return [line for line in lines if has(line)]


def _cost_column(lines: Sequence[Line]) -> str:
    """A measured per-step FLOPs column when every run (the exact one too) logged one, else analytic."""
    for column in MEASURED_FLOPS_COLUMNS:
        if all(column in line.run.train_log for line in lines):
            return column
    return "analytic_cost"


def plot_loss_vs_flops(lines: Sequence[Line], path: Path, subject: str) -> Path | None:
    """Fig. 6: smoothed train loss against normalised FLOPs, one line per run (raw loss faint)."""
    lines = _with(lines, "train_log", ("step", "loss"))
    exact = next((line for line in lines if line.run.sampler == "exact"), None)
    column = _cost_column(lines) if exact is not None else "analytic_cost"
    lines = [line for line in lines if column in line.run.train_log]
    if not lines:
        return None
    ref = exact or max(lines, key=lambda line: len(line.run.train_log))
    # analytic costs are in exact-step units, so the exact run costs its step count
    log = ref.run.train_log
    exact_cost = float(len(log)) if column == "analytic_cost" else float(log[column].sum())
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for line in lines:
        log = line.run.train_log
        x = normalised_flops(log, line.run.sampler_log, exact_cost, column)
        window = max(1, len(log) // 20)
        ax.plot(x, moving_average(log["loss"], window), color=line.color, label=f"{line.label} (MA {window})")
        ax.plot(x, log["loss"], color=line.color, alpha=0.2, linewidth=0.8)
    unit = "analytic" if column == "analytic_cost" else "measured"
    ax.set(xlabel=f"normalised FLOPs ({unit}; exact run = 1)", ylabel="train loss",
           title=_title("Train loss vs. normalised FLOPs (paper Fig. 6)", subject, ref.run))
    return _finish(fig, [ax], path)


def _mark_tau(ax: Axes, lines: Sequence[Line], which: str) -> None:
    """τ of the runs that have one (``which``: "act", "w" or "both" for the monitor's total): one black
    line when they share it, else a dotted line in each run's colour (its label names its τ)."""
    marks = []
    for line in lines:
        act, w = effective_tau(line.run.settings)
        values = {"act": [act], "w": [w], "both": [act] if act == w else [act, w]}[which]
        marks += [(value, line.color) for value in values if value is not None]
    if len({value for value, _ in marks}) == 1:
        name = {"act": "τ_act", "w": "τ_w", "both": "τ"}[which]
        ax.axhline(marks[0][0], color="k", linestyle="--", linewidth=1, label=f"{name} = {marks[0][0]:g}")
        return
    for value, color in dict.fromkeys(marks):
        ax.axhline(value, color=color, linestyle=":", linewidth=1)


def plot_variance(lines: Sequence[Line], path: Path, subject: str) -> Path | None:
    """Fig. 5 (VCAS's own phases): the extra variance each VCAS run let in, relative to SGD's, against
    its thresholds; activations above, weights below."""
    lines = _with(lines, "sampler_log", ("step", *VARIANCE_COLUMNS))
    if not lines:
        return None
    fig = Figure(figsize=(7, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, column, which, marker in zip(axes, VARIANCE_COLUMNS, ("act", "w"), "os"):
        for line in lines:
            log = line.run.sampler_log
            ax.plot(log["step"], log[column], marker=marker, markersize=3, color=line.color, label=line.label)
        _mark_tau(ax, lines, which)
        ax.set(ylabel=column.replace("_over_", " / "))
        # Each phase's ratio rests on M = 2 batches and spans orders of magnitude; 0 is a phase at rho = 1.
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
    axes[0].set_title(_title("VCAS extra gradient variance vs. τ (paper Fig. 5)", subject, lines[0].run))
    axes[1].set(xlabel="training step (variance phase)")
    return _finish(fig, axes, path)


def plot_monitored_variance(lines: Sequence[Line], path: Path, subject: str) -> Path | None:
    """Fig. 5 for every sampler: the monitor's V_extra / V_s over training, one line each, τ marked.

    Markers are hollow where the monitor found the sampler biased (``bias_z`` > 10: the bias is far
    beyond its draws' scatter), as SB is by design.
    """
    lines = _with(lines, "variance_log", ("step", "extra_over_V_s"))
    if not lines:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    flagged = False
    for line in lines:
        log = line.run.variance_log
        ax.plot(log["step"], log["extra_over_V_s"], marker="o", markersize=3, color=line.color,
                label=line.label)
        biased = log[log["bias_z"] > BIASED_Z] if "bias_z" in log else log.iloc[:0]
        if len(biased):
            ax.plot(biased["step"], biased["extra_over_V_s"], linestyle="none", marker="o", markersize=7,
                    markerfacecolor="none", color=line.color,
                    label=None if flagged else f"biased (bias_z > {BIASED_Z})")
            flagged = True
    _mark_tau(ax, lines, "both")
    ax.set(xlabel="training step (monitor)", ylabel="extra variance / SGD variance",
           title=_title("Extra gradient variance of every sampler vs. τ (paper Fig. 5)", subject,
                        lines[0].run))
    # The ratios span orders of magnitude and exact's is 0.
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    return _finish(fig, [ax], path)


def _indexed(log: pd.DataFrame, prefix: str) -> list[str]:
    """``rho_0, rho_1, ...`` in numeric order."""
    cols = [c for c in log.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def _mean_of(log: pd.DataFrame, prefix: str) -> pd.Series | None:
    """``<prefix>mean`` as logged, else the mean of the indexed columns."""
    if f"{prefix}mean" in log:
        return log[f"{prefix}mean"]
    cols = _indexed(log, prefix)
    return log[cols].mean(axis=1) if cols else None


def _schedule_detail(ax_rho: Axes, ax_nu: Axes, line: Line) -> None:
    """One run: ρ of every block, ν of every linear (faint) and their mean."""
    log = line.run.sampler_log
    rho = _indexed(log, "rho_")
    for col in rho:
        ax_rho.plot(log["step"], log[col], label=f"ρ_{int(col[4:]) + 1}" if len(rho) <= 12 else None)
    nu = _indexed(log, "nu_")
    for i, col in enumerate(nu):
        ax_nu.plot(log["step"], log[col], color="C1", alpha=0.3, linewidth=0.8,
                   label=f"ν per linear ({len(nu)})" if i == 0 else None)
    if "nu_mean" in log:
        ax_nu.plot(log["step"], log["nu_mean"], color="k", linewidth=1.8, label="mean ν")


def plot_schedule(lines: Sequence[Line], path: Path, subject: str) -> Path | None:
    """Fig. 11: s, the keep ratio ρ of each block and ν of each linear, per variance phase (with several
    runs: s, mean ρ and mean ν of each, in its colour)."""
    lines = _with(lines, "sampler_log", ("step", "s"))
    if not lines:
        return None
    fig = Figure(figsize=(7, 8), layout="constrained")
    ax_s, ax_rho, ax_nu = fig.subplots(3, 1, sharex=True)
    several = len(lines) > 1  # one run: its name is in the title, no legend for s
    for line in lines:
        log = line.run.sampler_log
        ax_s.plot(log["step"], log["s"], marker="o", markersize=3, color=line.color,
                  label=line.label if several else None)
        if not several:
            _schedule_detail(ax_rho, ax_nu, line)
            continue
        for ax, prefix in ((ax_rho, "rho_"), (ax_nu, "nu_")):
            mean = _mean_of(log, prefix)
            if mean is not None:
                ax.plot(log["step"], mean, color=line.color, label=line.label)
    ax_s.set(ylabel="s",
             title=_title("VCAS sample ratios over training (paper Fig. 11)", subject, lines[0].run))
    ax_rho.set(ylabel="mean ρ" if several else "ρ per block")
    ax_nu.set(xlabel="training step (variance phase)", ylabel="mean ν" if several else "ν per linear")
    return _finish(fig, [ax_s, ax_rho, ax_nu], path)


def plot_lines(lines: Sequence[Line], out_dir: Path, name: str, subject: str) -> list[Path]:
    """Every figure ``lines`` have data for, named ``<name>_*.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    written = [plot_loss_vs_flops(lines, out_dir / f"{name}_loss_vs_flops.png", subject),
               plot_monitored_variance(lines, out_dir / f"{name}_variance_monitor.png", subject),
               plot_variance(lines, out_dir / f"{name}_variance.png", subject),
               plot_schedule(lines, out_dir / f"{name}_schedule.png", subject)]
    return [p for p in written if p is not None]


def plot_comparison(folder: Path, out_dir: Path, name: str,
                    jobs: Collection[str] | None = None) -> list[Path]:
    """The figures of one comparison folder, named ``<name>_*.png``: all its runs, or those whose folder
    is named in ``jobs``."""
    runs = [run for run in read_comparison(Path(folder)) if jobs is None or run.path.name in jobs]
    lines = [Line(run.label, run, f"C{i % 10}") for i, run in enumerate(runs)]
    return plot_lines(lines, out_dir, name, ", ".join(run.label for run in runs))


def write_comparison_figures(out_dir: Path, samplers: Collection[str]) -> list[Path]:
    """``comparison_*.png`` at the end of a run, of its ``samplers``' folders in ``out_dir``. The results
    are written by then: a figure that fails to draw is named in one line, and the run ends as it finished."""
    try:
        return plot_comparison(out_dir, out_dir, "comparison", jobs=samplers)
    except Exception as error:  # a plotting bug must not turn a finished run into a failed one
        log.warning("comparison figures not written: %s: %s", type(error).__name__, error)
        return []


def sweep_lines(sweep: Sweep) -> list[Line]:
    """A sweep's runs as lines: labelled by the swept value, coloured along it (viridis), exact in black."""
    swept = [job for job in sweep.jobs if not all(run.sampler == "exact" for run in job.runs)]
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(1, len(swept))))
    shade = {job.folder: to_hex(colours[i]) for i, job in enumerate(swept)}
    lines = []
    for job in sweep.jobs:
        for run in job.runs:
            # a job of several runs (a comparison per value) names the run too
            label = job.label if len(job.runs) == 1 else f"{run.label}, {job.label}"
            lines.append(Line(label, run, "k" if run.sampler == "exact" else shade[job.folder]))
    return lines


def plot_sweep(folder: Path, out_dir: Path, name: str) -> list[Path]:
    """One figure of each kind for a whole sweep (see :func:`sweep_lines`), named ``<name>_*.png``."""
    sweep = read_sweep(Path(folder))
    lines = sweep_lines(sweep)
    if not lines:
        return []
    samplers = ", ".join(dict.fromkeys(line.run.sampler for line in lines))
    knobs = ", ".join(key.rsplit(".", 1)[-1] for key in sweep.knobs) or "its jobs"
    return plot_lines(lines, out_dir, name, f"{samplers}; sweep over {knobs}")
