"""The comparison table printed at the end of a run.

``comparison.{csv,json}`` keep every metric of :data:`COLUMNS`; the markdown table a reader scans
shows the :data:`SHOWN` few, one precision per kind of number, and a legend under it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

COLUMNS = {  # metrics key -> column title, in display order (the CSV/JSON keep all of them)
    "sampler": "sampler",
    "final_train_loss": "train loss",
    "eval_accuracy": "eval acc",
    "glue_accuracy": "GLUE acc",
    "flops_reduction_measured": "FLOPs↓ measured",
    "flops_reduction_analytic": "FLOPs↓ analytic",
    "time_reduction": "Time↓",
    "time_over_flops_reduction": "Time↓/FLOPs↓",
    "train_time_s": "train time (s)",
    "time_forward_s": "fwd (s)",
    "time_backward_s": "bwd (s)",
    "time_optimizer_s": "opt (s)",
    "time_phases_s": "phases (s)",
    "keep_ratio_mean": "kept rows",
    "steps": "steps",
    "adapt_phases": "phases",
    "final_s": "s",
    "final_rho_mean": "mean ρ",
    "final_nu_mean": "mean ν",
}
# What the markdown table shows: at most 8 columns (9 with a pretraining run's GLUE accuracy).
SHOWN = ("sampler", "final_train_loss", "eval_accuracy", "glue_accuracy", "flops_reduction_measured",
         "flops_reduction_analytic", "time_reduction", "time_over_flops_reduction", "train_time_s")
PERCENT = ("flops_reduction_analytic", "flops_reduction_measured", "time_reduction")
DECIMALS = {"final_train_loss": 4, "eval_accuracy": 4, "glue_accuracy": 4, "time_over_flops_reduction": 2,
            "train_time_s": 1}
NO_SAVING = "—"  # Time↓/FLOPs↓ of a run that measured no FLOPs saving
LEGEND = (
    "FLOPs↓ = 1 − FLOPs / the reference's over the whole run, adaptation phases included: measured by "
    "FlopCounterMode on probe steps, analytic by the 1:1:1 layer model of docs/method.md §9 (which counts "
    "padding rows and every linear alike, so the two differ). Time↓/FLOPs↓ is how much of the FLOPs saving "
    f"became time; {NO_SAVING} where nothing was saved (a ratio of two losses would read as a gain). "
    "Every metric: comparison.csv."
)


def comparison_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run with the table's keys; absent values stay absent (shown as '–')."""
    return [{k: r[k] for k in COLUMNS if k in r and r[k] is not None} for r in results]


def _cell(key: str, value: Any, row: dict[str, Any]) -> str:
    if key == "time_over_flops_reduction" and row.get("flops_reduction_measured", 1.0) <= 0:
        return NO_SAVING
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if key in PERCENT:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.{DECIMALS.get(key, 4)}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], legend: bool = True) -> str:
    """The :data:`SHOWN` columns that any row has, '–' where a run has no value, then the legend."""
    keys = [k for k in SHOWN if any(k in r for r in rows)]
    cells = [{COLUMNS[k]: _cell(k, r.get(k), r) for k in keys} for r in rows]
    table = pd.DataFrame(cells).to_markdown(index=False, disable_numparse=True)
    return f"{table}\n\n{LEGEND}" if legend else table
