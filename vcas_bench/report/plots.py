"""Figures of one comparison folder, after the paper's Figs. 6, 5 and 11 (PNG, matplotlib's Agg renderer).

- ``<name>_loss_vs_flops.png`` (Fig. 6): train loss of every sampler against normalised FLOPs, the
  cumulative cost (variance phases included) over the cost of the exact run; exact ends at 1.
- ``<name>_variance.png`` (Fig. 5): VCAS's V_act/V_s and V_w/V_s per variance phase against τ_act, τ_w.
- ``<name>_variance_monitor.png`` (Fig. 5 for every sampler): each run's extra variance over the SGD
  variance from the variance monitor (``variance_log.csv``, ``monitor.enabled=true``), τ marked.
- ``<name>_schedule.png`` (Fig. 11): s, ρ per block and ν per linear over training.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot: no global figure state, no backend switch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["moving_average", "normalised_flops", "plot_comparison", "plot_loss_vs_flops", "plot_schedule",
           "plot_variance", "plot_monitored_variance"]

MEASURED_FLOPS_COLUMNS = ("flops_total", "flops")  # a per-step measured count in train_log.csv, if any
METHOD_ORDER = ("exact", "sb", "ub", "infobatch", "vcas", "vcas-plus")


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


def _read_runs(folder: Path) -> dict[str, dict[str, Any]]:
    """Sampler -> its metrics and logs, for every run sub-folder of a comparison."""
    runs = {}
    for path in sorted(folder.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        train = path.parent / "train_log.csv"
        phases = path.parent / "sampler_log.csv"
        monitored = path.parent / "variance_log.csv"
        runs[str(metrics.get("sampler", path.parent.name))] = {
            "metrics": metrics,
            "train_log": pd.read_csv(train) if train.exists() else None,
            "sampler_log": pd.read_csv(phases) if phases.exists() else None,
            "variance_log": pd.read_csv(monitored) if monitored.exists() else None,
        }
    return dict(sorted(runs.items(), key=lambda kv: (_rank(kv[0]), kv[0])))


def _rank(sampler: str) -> int:
    return METHOD_ORDER.index(sampler) if sampler in METHOD_ORDER else len(METHOD_ORDER)


def _title(metrics: dict[str, Any], what: str) -> str:
    device = str(metrics.get("device") or "")
    proxy = "CPU proxy" if device.startswith("cpu") else "proxy"
    return (f"{what}\n{metrics.get('task', '?')} / {metrics.get('model', '?')} / "
            f"{metrics.get('steps', '?')} steps, seed {metrics.get('seed', '?')} ({proxy})")


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


def _cost_column(runs: dict[str, dict[str, Any]]) -> str:
    """A measured per-step FLOPs column when every run (the exact one too) logged one, else analytic."""
    logs = [r["train_log"] for r in runs.values()]
    for column in MEASURED_FLOPS_COLUMNS:
        if all(column in log for log in logs):
            return column
    return "analytic_cost"


def plot_loss_vs_flops(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Fig. 6: smoothed train loss against normalised FLOPs, one line per sampler (raw loss faint)."""
    runs = {k: r for k, r in runs.items() if r["train_log"] is not None and len(r["train_log"])}
    if not runs:
        return None
    column = _cost_column(runs) if "exact" in runs else "analytic_cost"
    if not all(column in r["train_log"] for r in runs.values()):
        return None
    ref = runs.get("exact") or max(runs.values(), key=lambda r: len(r["train_log"]))
    # analytic costs are in exact-step units, so the exact run costs its step count
    log = ref["train_log"]
    exact_cost = float(len(log)) if column == "analytic_cost" else float(log[column].sum())
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for sampler, run in runs.items():
        log = run["train_log"]
        x = normalised_flops(log, run["sampler_log"], exact_cost, column)
        window = max(1, len(log) // 20)
        line, = ax.plot(x, moving_average(log["loss"], window), label=f"{sampler} (MA {window})")
        ax.plot(x, log["loss"], color=line.get_color(), alpha=0.2, linewidth=0.8)
    unit = "analytic" if column == "analytic_cost" else "measured"
    ax.set(xlabel=f"normalised FLOPs ({unit}; exact run = 1)", ylabel="train loss",
           title=_title(ref["metrics"], "Train loss vs. normalised FLOPs (paper Fig. 6)"))
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _tau_lines(ax: Axes, settings: dict[str, Any]) -> None:
    tau = settings.get("tau")
    act = settings.get("tau_act") if settings.get("tau_act") is not None else tau
    w = settings.get("tau_w") if settings.get("tau_w") is not None else tau
    if act is not None and act == w:
        ax.axhline(act, color="k", linestyle="--", linewidth=1, label=f"τ = {act:g}")
        return
    for value, name, color in ((act, "τ_act", "C0"), (w, "τ_w", "C1")):
        if value is not None:
            ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{name} = {value:g}")


def plot_variance(run: dict[str, Any], path: Path) -> Path | None:
    """Fig. 5: the extra variance VCAS lets in, relative to SGD's, against its thresholds."""
    log = run["sampler_log"]
    if log is None or not {"V_act_over_V_s", "V_w_over_V_s"} <= set(log.columns):
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(log["step"], log["V_act_over_V_s"], marker="o", markersize=3, color="C0", label="V_act / V_s")
    ax.plot(log["step"], log["V_w_over_V_s"], marker="s", markersize=3, color="C1", label="V_w / V_s")
    _tau_lines(ax, run["metrics"].get("sampler_settings") or {})
    ax.set(xlabel="training step (variance phase)", ylabel="extra variance / SGD variance",
           title=_title(run["metrics"], "VCAS extra gradient variance vs. τ (paper Fig. 5)"))
    # Each phase's ratio rests on M = 2 batches and spans orders of magnitude; 0 is a phase at rho = 1.
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_monitored_variance(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Fig. 5 for every sampler: the monitor's V_extra / V_s over training, one line each, τ marked.

    τ is the VCAS run's (``vcas``, else ``vcas-plus``); SB and UB have none to hold. Markers are hollow
    where the monitor found the sampler biased (``bias_z`` > 10: the bias is far beyond its draws'
    scatter), as SB is by design.
    """
    logs = {k: r["variance_log"] for k, r in runs.items() if r.get("variance_log") is not None
            and {"step", "extra_over_V_s"} <= set(r["variance_log"].columns) and len(r["variance_log"])}
    if not logs:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    flagged = False
    for sampler, log in logs.items():
        line, = ax.plot(log["step"], log["extra_over_V_s"], marker="o", markersize=3, label=sampler)
        biased = log[log["bias_z"] > 10] if "bias_z" in log else log.iloc[:0]
        if len(biased):
            ax.plot(biased["step"], biased["extra_over_V_s"], linestyle="none", marker="o", markersize=7,
                    markerfacecolor="none", color=line.get_color(),
                    label=None if flagged else "biased (bias_z > 10)")
            flagged = True
    vcas = runs.get("vcas") or runs.get("vcas-plus")
    if vcas is not None:
        _tau_lines(ax, vcas["metrics"].get("sampler_settings") or {})
    first = next(iter(runs.values()))["metrics"]
    ax.set(xlabel="training step (monitor)", ylabel="extra variance / SGD variance",
           title=_title(first, "Extra gradient variance of every sampler vs. τ (paper Fig. 5)"))
    # The ratios span orders of magnitude and exact's is 0.
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _indexed(log: pd.DataFrame, prefix: str) -> list[str]:
    """``rho_0, rho_1, ...`` in numeric order."""
    cols = [c for c in log.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def plot_schedule(run: dict[str, Any], path: Path) -> Path | None:
    """Fig. 11: s, the keep ratio ρ of each block and ν of each linear, per variance phase."""
    log = run["sampler_log"]
    if log is None or "s" not in log:
        return None
    fig = Figure(figsize=(7, 8), layout="constrained")
    ax_s, ax_rho, ax_nu = fig.subplots(3, 1, sharex=True)
    ax_s.plot(log["step"], log["s"], marker="o", markersize=3)
    ax_s.set(ylabel="s", title=_title(run["metrics"], "VCAS sample ratios over training (paper Fig. 11)"))
    rho = _indexed(log, "rho_")
    for col in rho:
        ax_rho.plot(log["step"], log[col], label=f"ρ_{int(col[4:]) + 1}" if len(rho) <= 12 else None)
    ax_rho.set(ylabel="ρ per block")
    nu = _indexed(log, "nu_")
    for i, col in enumerate(nu):
        ax_nu.plot(log["step"], log[col], color="C1", alpha=0.3, linewidth=0.8,
                   label=f"ν per linear ({len(nu)})" if i == 0 else None)
    if "nu_mean" in log:
        ax_nu.plot(log["step"], log["nu_mean"], color="k", linewidth=1.8, label="mean ν")
    ax_nu.set(xlabel="training step (variance phase)", ylabel="ν per linear")
    for ax in (ax_s, ax_rho, ax_nu):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def plot_comparison(folder: Path, out_dir: Path, name: str) -> list[Path]:
    """The figures of one comparison folder (those it has data for), named ``<name>_*.png``."""
    runs = _read_runs(Path(folder))
    out_dir = Path(out_dir)
    written = [plot_loss_vs_flops(runs, out_dir / f"{name}_loss_vs_flops.png"),
               plot_monitored_variance(runs, out_dir / f"{name}_variance_monitor.png")]
    if "vcas" in runs:
        written += [plot_variance(runs["vcas"], out_dir / f"{name}_variance.png"),
                    plot_schedule(runs["vcas"], out_dir / f"{name}_schedule.png")]
    return [p for p in written if p is not None]
