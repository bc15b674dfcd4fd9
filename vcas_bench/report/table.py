"""The comparison table printed at the end of a run (pandas -> markdown)."""

from __future__ import annotations

from typing import Any

import pandas as pd

COLUMNS = {  # metrics key -> column title, in display order
    "sampler": "sampler",
    "final_train_loss": "train loss",
    "eval_accuracy": "eval acc",
    "glue_accuracy": "GLUE acc",
    "flops_reduction_analytic": "FLOPs↓ analytic",
    "flops_reduction_measured": "FLOPs↓ measured",
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


def comparison_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run with the table's keys; absent values stay absent (shown as '–')."""
    return [{k: r[k] for k in COLUMNS if k in r and r[k] is not None} for r in results]


PERCENT = ("flops_reduction_analytic", "flops_reduction_measured", "time_reduction")


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if key in PERCENT:
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Percentages for the reductions, 4 decimals elsewhere, '–' where a run has no value."""
    keys = [k for k in COLUMNS if any(k in r for r in rows)]
    cells = [{COLUMNS[k]: _cell(k, r.get(k)) for k in keys} for r in rows]
    return pd.DataFrame(cells).to_markdown(index=False, disable_numparse=True)
