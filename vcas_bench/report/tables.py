"""The paper's Tables 1–7 beside our CPU proxy runs: ``results/tables/table{1..7}.{md,csv,tex}``.

Every ``metrics.json`` under ``results/`` (except ``paper/``, ``tables/``, ``bench/``) is one run. Runs
that fill the same cell (same setting, method and sampler settings: seeds) are averaged and counted.
Our proxy tasks and models stand for the paper's by ``PROXY_FOR``; the paper's numbers come from
``results/paper/`` (docs/method.md §14). A cell that no run fills says "not run"; nothing is made up.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vcas_bench.report.files import _atomic_write, write_csv
from vcas_bench.report.plots import plot_comparison, plot_sweep
from vcas_bench.report.runs import RunFolder, effective_tau, find_runs, finite_number, setting_label
from vcas_bench.report.sweeps import is_sweep
from vcas_bench.vcas.config import VcasConfig

log = logging.getLogger(__name__)

__all__ = ["PROXY_FOR", "TABLES", "TableSpec", "aggregate", "build_table", "load_paper", "load_runs",
           "make_tables", "side_by_side", "write_index", "write_table"]

PROXY_FOR: dict[str, str] = {
    # our task -> the paper dataset it stands in for
    "rt-polarity": "SST-2",  # Rotten Tomatoes snippets: SST-2's source domain, binary sentiment
    "mnist5k": "CIFAR10",  # 10-class image classification stand-in
    "digits": "CIFAR10",
    # our model -> the paper model it stands in for
    "minilm": "BERT-base",
    "bert-tiny": "BERT-base",
    "bert-base": "BERT-base",
    "bert-large": "BERT-large",
    "vit-tiny": "ViT-base",
    "timm-vit-tiny": "ViT-base",
    "vit-base": "ViT-base",
    "vit-large": "ViT-large",
}
METHODS = {"exact": "exact", "sb": "SB", "ub": "UB", "vcas": "VCAS"}  # our sampler -> the paper's name
# The paper's defaults a run's variant names only when it departs from them (docs/method.md §10).
VCAS_DEFAULTS = {k: getattr(VcasConfig(), k) for k in ("alpha", "beta", "M", "rho_ema", "param_sample_ratio")}
SKIP_DIRS = frozenset({"paper", "tables", "bench"})
NOT_RUN, NOT_IN_PAPER, NONE = "not run", "not in paper", "–"

OURS = {  # our value column -> (metrics.json key, factor to the paper's unit)
    "train_loss": ("final_train_loss", 1.0),
    "eval_acc_pct": ("eval_accuracy", 100.0),
    "flops_reduction_analytic_pct": ("flops_reduction_analytic", 100.0),
    "flops_reduction_measured_pct": ("flops_reduction_measured", 100.0),
    "time_reduction_pct": ("time_reduction", 100.0),
    "train_time_s": ("train_time_s", 1.0),
    "wall_clock_s": ("wall_clock_s", 1.0),
}
PAPER = {"train_loss": "paper_train_loss", "eval_acc": "paper_eval_acc_pct",
         "wall_clock_h": "paper_wall_clock_h", "flops_reduction_pct": "paper_flops_reduction_pct",
         "time_reduction_pct": "paper_time_reduction_pct"}
ACCURACY = ["train_loss", "eval_acc_pct", "flops_reduction_analytic_pct", "flops_reduction_measured_pct"]
WALLCLOCK = [*ACCURACY, "train_time_s", "wall_clock_s", "time_reduction_pct"]


@dataclass(frozen=True)
class TableSpec:
    """One paper table: how it is laid out and which of our runs stand in for its rows."""

    number: int
    kind: str  # "main" (Table 1), "wallclock" (2, 3), "tau" (4, 5) or "F" (6, 7)
    title: str
    note: str = ""
    model_prefix: str = ""  # our runs whose stand-in model starts with this...
    dataset: str | None = None  # ...and whose stand-in dataset is this (None: any)
    experiment: str | None = None  # runs of this experiment belong here only, whatever their stand-in


TABLES = (
    TableSpec(1, "main", "Table 1: VCAS vs. exact, SB, UB (final train loss, eval accuracy, FLOPs reduction)",
              "Paper: mean of 3 seeds (1 for BERT-base pretraining and ViT-base ImageNet-1k); SB/UB FLOPs↓ "
              "fixed by design (caption); VCAS FLOPs↓ includes the adaptation overhead."),
    TableSpec(2, "wallclock", "Table 2: wall-clock, BERT-large finetuning on MNLI vs. our BERT stand-ins",
              "Paper: NVIDIA 3090Ti, hours. Ours: every run of a BERT stand-in, seconds on our hardware. "
              "Time↓ = 1 − t/t_exact within one comparison; time_per_flops = Time↓ / FLOPs↓ (paper's: "
              "derived by us from its two printed columns).", model_prefix="BERT"),
    TableSpec(3, "wallclock",
              "Table 3: wall-clock, ViT-large finetuning on ImageNet-1k vs. our ViT stand-ins",
              "Paper: NVIDIA 3090Ti, hours. Ours: every run of a ViT stand-in, seconds on our hardware. "
              "Time↓ = 1 − t/t_exact within one comparison; time_per_flops = Time↓ / FLOPs↓ (paper's: "
              "derived by us from its two printed columns).", model_prefix="ViT"),
    TableSpec(4, "tau", "Table 4: ablation on tau (tau-act = tau-w = tau), BERT-base finetuning on SST-2",
              "Paper: 3 seeds, F = 100. Exact training is tau = 0. Ours: the `table4-proxy` experiment.",
              "BERT-base", "SST-2", experiment="table4-proxy"),
    TableSpec(5, "tau", "Table 5: ablation on tau (tau-act = tau-w = tau), BERT-base finetuning on MNLI",
              "Paper: 3 seeds, F = 500. Exact training is tau = 0.", "BERT-base", "MNLI"),
    TableSpec(6, "F", "Table 6: ablation on F, BERT-base finetuning on SST-2 (6,315 steps)",
              "Paper: tau = 0.025. Exact training is F = 0; our F is the one the run used (vcas_F). "
              "Ours: the `table6-proxy` experiment.", "BERT-base", "SST-2", experiment="table6-proxy"),
    TableSpec(7, "F", "Table 7: ablation on F, BERT-base finetuning on MNLI (36,816 steps)",
              "Paper: tau = 0.025. Exact training is F = 0; our F is the one the run used (vcas_F).",
              "BERT-base", "MNLI"),
)


# ---------------------------------------------------------------------------------------------- our runs
def vcas_F(metrics: dict[str, Any]) -> float | None:
    """The adaptation period a VCAS run used: ``vcas_F``, else an explicit ``sampler_settings.F``."""
    used = finite_number(metrics.get("vcas_F"))
    return used if used is not None else finite_number((metrics.get("sampler_settings") or {}).get("F"))


def variant(sampler: str | None, settings: dict[str, Any], F: float | None) -> str:
    """The sampler settings that keep runs apart (ASCII, LaTeX-safe), e.g. ``tau=0.025, F=25``."""
    if sampler == "vcas":
        act, w = effective_tau(settings)
        parts = [f"tau={act:g}" if act == w and act is not None else f"tau-act={act}, tau-w={w}",
                 f"F={F:g}" if F is not None else "F=?"]
        parts += [f"{k}={settings[k]:g}" for k, v in VCAS_DEFAULTS.items()
                  if finite_number(settings.get(k)) is not None and settings[k] != v]
    elif sampler == "sb":
        ratio = finite_number(settings.get("fixed_ratio"))
        parts = [f"ratio={ratio:g}" if ratio is not None else f"beta={settings.get('beta')}"]
    else:
        parts = [f"{k}={v:g}" for k, v in settings.items() if finite_number(v) is not None]
    return ", ".join(parts) or NONE


def _record(run: RunFolder, results_dir: Path) -> dict[str, Any]:
    """One run as a flat row in the paper's units."""
    metrics, sampler, settings = run.metrics, run.sampler, run.settings
    F = vcas_F(metrics) if sampler == "vcas" else None
    act, w = effective_tau(settings) if sampler == "vcas" else (None, None)
    model = PROXY_FOR.get(str(metrics.get("model")), f"({metrics.get('model')})")
    return {
        "run_dir": str(run.path.relative_to(results_dir)), "comparison_dir": str(run.path.parent),
        "task": metrics.get("task"), "model": metrics.get("model"), "sampler": sampler,
        "method": METHODS.get(sampler, sampler), "seed": metrics.get("seed"),
        "experiment": metrics.get("experiment"),
        "paper_task": f"{model} finetuning", "paper_model": model,
        "dataset": PROXY_FOR.get(str(metrics.get("task")), f"({metrics.get('task')})"),
        "setting": setting_label(metrics), "variant": variant(sampler, settings, F),
        "tau": 0.0 if sampler == "exact" else (act if act == w else None),
        "F": 0.0 if sampler == "exact" else F, "flops_total": finite_number(metrics.get("flops_total")),
        **{col: (None if (v := finite_number(metrics.get(key))) is None else v * factor)
           for col, (key, factor) in OURS.items()},
    }


def load_runs(results_dir: Path) -> pd.DataFrame:
    """Every run under ``results_dir`` (one row each), skipping ``paper/``, ``tables/`` and ``bench/``."""
    results_dir = Path(results_dir)
    records = [_record(run, results_dir) for run in find_runs(results_dir, skip=SKIP_DIRS)]
    columns = ["run_dir", "comparison_dir", "task", "model", "sampler", "method", "seed", "experiment",
               "paper_task", "paper_model", "dataset", "setting", "variant", "tau", "F", "flops_total", *OURS]
    runs = pd.DataFrame(records, columns=columns)
    runs[[*OURS, "flops_total"]] = runs[[*OURS, "flops_total"]].astype(float)
    return _measured_reduction_from_sweep_reference(runs)


def _measured_reduction_from_sweep_reference(runs: pd.DataFrame) -> pd.DataFrame:
    """Sweep jobs run without an exact baseline of their own: their measured FLOPs↓ is taken against the
    exact run of the same experiment, task, model, steps/batch and seed. FLOP counts do not depend on
    the process or the machine's load, so this is sound for FLOPs (not for time, which is left out)."""
    keys = ["experiment", "task", "model", "setting", "seed"]
    exact = runs[(runs["sampler"] == "exact") & runs["flops_total"].notna()]
    reference = {tuple(row[k] for k in keys): row["flops_total"] for _, row in exact.iterrows()}
    missing = (runs["flops_reduction_measured_pct"].isna() & runs["flops_total"].notna()
               & (runs["sampler"] != "exact"))
    for index in runs.index[missing]:
        total = reference.get(tuple(runs.at[index, k] for k in keys))
        if total:
            runs.at[index, "flops_reduction_measured_pct"] = 100 * (1 - runs.at[index, "flops_total"] / total)
    return runs


def aggregate(runs: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Mean of ``values`` per group of ``keys`` (NaN only where no run has it) and the run count."""
    columns = [*keys, "ours_setting", "ours_variant", "ours_n", *(f"ours_{v}" for v in values)]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    grouped = runs.groupby([*keys, "setting", "variant"], dropna=False, sort=True)
    out = grouped[values].mean().round(6)  # drops float noise from the x100 (44.440000000000005)
    out.insert(0, "n", grouped.size().astype("Int64"))  # stays a count through the outer merge
    out = out.reset_index().rename(columns={"setting": "ours_setting", "variant": "ours_variant",
                                            **{v: f"ours_{v}" for v in ["n", *values]}})
    return out[columns]


# ------------------------------------------------------------------------------------ paper beside ours
def load_paper(paper_dir: Path, number: int) -> pd.DataFrame:
    """``results/paper/table<number>.csv`` as printed (text, so ``0.0600`` keeps its zeros)."""
    return pd.read_csv(Path(paper_dir) / f"table{number}.csv", dtype=str, keep_default_na=False)


def side_by_side(paper: pd.DataFrame, ours: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Paper rows in their order, each with the runs of ours that match ``keys``; then ours without one.

    Our cells with no run say "not run"; paper cells of a run the paper does not have say "not in
    paper"; everything else missing is "–".
    """
    ours = ours.astype({k: paper[k].dtype for k in keys})  # an empty aggregate has object keys
    merged = paper.assign(_order=range(len(paper))).merge(ours, on=keys, how="outer", indicator=True)
    merged["_order"] = merged["_order"].fillna(len(paper))
    merged = merged.sort_values(["_order", *keys, "ours_setting", "ours_variant"], kind="stable")
    ours_cols = [c for c in ours.columns if c not in keys]
    paper_cols = [c for c in paper.columns if c not in keys]
    merged = merged.astype({c: object for c in [*ours_cols, *paper_cols]})
    merged.loc[merged["_merge"] == "left_only", ours_cols] = NOT_RUN
    merged.loc[merged["_merge"] == "right_only", paper_cols] = NOT_IN_PAPER
    merged[paper_cols] = merged[paper_cols].replace("", NONE)
    merged = merged.fillna(NONE)
    return merged.drop(columns=["_order", "_merge"]).reset_index(drop=True)


def _scope(runs: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Runs of the table's own experiment, plus stand-in matches that no other table's experiment claims."""
    claimed = {t.experiment for t in TABLES if t.experiment}
    keep = runs["paper_model"].str.startswith(spec.model_prefix) & ~runs["experiment"].isin(claimed)
    if spec.dataset is not None:
        keep &= runs["dataset"] == spec.dataset
    if spec.experiment is not None:
        keep |= runs["experiment"] == spec.experiment
    return runs[keep]


def _ratio(num: Any, den: Any) -> float | None:
    """Time↓ per FLOPs↓; only where both are numbers and the FLOPs really went down."""
    try:
        num, den = float(num), float(den)
    except (TypeError, ValueError):
        return None
    return num / den if den > 0 and math.isfinite(num) else None


def _main_table(runs: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    keys = ["paper_task", "dataset", "method"]
    paper = paper[[*keys, "train_loss", "eval_acc", "flops_reduction_pct"]].rename(columns=PAPER)
    return side_by_side(paper, aggregate(runs, keys, ACCURACY), keys)


def _wallclock_table(runs: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    paper = paper[["method", "train_loss", "eval_acc", "wall_clock_h", "flops_reduction_pct",
                   "time_reduction_pct"]].rename(columns=PAPER)
    pairs = zip(paper["paper_time_reduction_pct"], paper["paper_flops_reduction_pct"])
    paper["paper_time_per_flops"] = ["" if (r := _ratio(t, f)) is None else f"{r:.2f}" for t, f in pairs]
    runs = runs.copy()
    for kind in ("analytic", "measured"):  # per run, so a mean only covers runs that have both numbers
        runs[f"time_per_flops_{kind}"] = np.array(
            [_ratio(t, f) for t, f in zip(runs["time_reduction_pct"], runs[f"flops_reduction_{kind}_pct"])],
            dtype=float)
    values = [*WALLCLOCK, "time_per_flops_analytic", "time_per_flops_measured"]
    return side_by_side(paper, aggregate(runs, ["method"], values), ["method"])


def _ablation_table(runs: pd.DataFrame, paper: pd.DataFrame, param: str) -> pd.DataFrame:
    paper = paper[["value", "method", "train_loss", "eval_acc", "flops_reduction_pct"]].rename(columns=PAPER)
    paper = paper.rename(columns={"value": param}).astype({param: float})
    runs = runs[runs["method"].isin(["exact", "VCAS"]) & runs[param].notna()]
    table = side_by_side(paper, aggregate(runs, [param, "method"], ACCURACY), [param, "method"])
    table[param] = [f"{v:g}" for v in table[param]]
    return table


def build_table(spec: TableSpec, runs: pd.DataFrame, paper_dir: Path) -> pd.DataFrame:
    """The paper's Table ``spec.number`` with our matching runs beside it (long format, one row per pair)."""
    paper = load_paper(paper_dir, spec.number)
    runs = _scope(runs, spec)
    if spec.kind == "main":
        return _main_table(runs, paper)
    if spec.kind == "wallclock":
        return _wallclock_table(runs, paper)
    return _ablation_table(runs, paper, spec.kind)


# --------------------------------------------------------------------------------------------- writing
def _cell(column: str, value: Any) -> str:
    """Text for md/tex: percentages 2 decimals, losses 4, seconds 1; words and paper text as they are."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    if column.endswith("_n"):
        return str(int(value))
    if "loss" in column:
        return f"{value:.4f}"
    if column.endswith("_s"):
        return f"{value:.1f}"
    return f"{value:.2f}"


def _display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: [_cell(c, v) for v in table[c]] for c in table.columns})


NOTES = ("Paper: Wang, Chen, Zhu, ICLR 2024 (arXiv 2402.17227), numbers from `results/paper/table{n}.csv`. "
         "Ours: vcas-bench proxy runs (`ours_setting` = task / model / steps, batch size), mean over "
         "`ours_n` runs (seeds) with the same `ours_variant`; the proxy mapping is in `README.md`. "
         "Accuracy, FLOPs↓ and Time↓ in %. FLOPs↓ analytic = the paper's cost model (docs/method.md "
         "§9); measured = counted FLOPs of the real sampled backward. "
         "\"not run\": no run of ours fills the cell; \"–\": not reported or not applicable; "
         "\"not in paper\": our run has no paper counterpart.")


def write_table(table: pd.DataFrame, spec: TableSpec, out_dir: Path) -> list[Path]:
    """``table<n>.csv`` (values), ``.md`` (title, notes, table) and ``.tex`` (a tabular with caption)."""
    out_dir = Path(out_dir)
    stem = out_dir / f"table{spec.number}"
    write_csv(stem.with_suffix(".csv"), table.to_dict("records"))
    shown = _display(table)
    notes = f"{NOTES.format(n=spec.number)}\n\n{spec.note}".strip()
    markdown = shown.to_markdown(index=False, disable_numparse=True)
    _atomic_write(stem.with_suffix(".md"), f"# {spec.title}\n\n{notes}\n\n{markdown}\n")
    caption = spec.title.replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")
    latex = shown.replace(NONE, "--").to_latex(index=False, escape=True, caption=caption,
                                               label=f"tab:vcas-table{spec.number}")
    _atomic_write(stem.with_suffix(".tex"), latex)
    return [stem.with_suffix(s) for s in (".md", ".csv", ".tex")]


def _figure_name(folder: Path, results_dir: Path) -> str:
    """``results/proxy/table4-proxy`` -> ``table4-proxy``; ``results/x/y`` -> ``x_y``."""
    parts = folder.relative_to(results_dir).parts if folder.is_relative_to(results_dir) else (folder.name,)
    parts = parts[1:] if parts[:1] == ("proxy",) and len(parts) > 1 else parts
    return "_".join(parts) or results_dir.name


def write_figures(runs: pd.DataFrame, results_dir: Path, out_dir: Path) -> list[Path]:
    """The figures of every comparison folder, and one overlaid set per sweep (a folder with Hydra's
    ``multirun.yaml``: its jobs' comparisons are drawn together, labelled by the swept value)."""
    comparisons = sorted({Path(folder) for folder in runs["comparison_dir"]})
    sweeps = sorted({folder.parent for folder in comparisons if is_sweep(folder.parent)})
    written = [p for sweep in sweeps for p in plot_sweep(sweep, out_dir, _figure_name(sweep, results_dir))]
    for folder in comparisons:
        if folder.parent not in sweeps:
            written += plot_comparison(folder, out_dir, _figure_name(folder, results_dir))
    return written


def write_index(out_dir: Path, runs: pd.DataFrame, tables: list[Path], figures: list[Path]) -> Path:
    """``README.md`` of the generated folder: what each file is, the proxy mapping, the runs read."""
    lines = ["# Generated tables: the paper's numbers beside our CPU proxy runs", "",
             "Generated by `python scripts/make_tables.py` (`make tables`); do not edit by hand. The paper's "
             "numbers (Wang, Chen, Zhu, ICLR 2024, arXiv 2402.17227) come from `results/paper/`; ours from "
             f"{len(runs)} `metrics.json` files under `results/`. \"not run\" marks a cell no run of ours "
             "fills; no value is ever filled in otherwise.", "",
             "## Proxy mapping (`vcas_bench.report.tables.PROXY_FOR`)", "",
             "| ours | stands in for |", "|---|---|",
             *(f"| `{ours}` | {paper} |" for ours, paper in PROXY_FOR.items()), "",
             "## Tables", "", "| table | files |", "|---|---|"]
    for spec in TABLES:
        files = ", ".join(f"[`{p.name}`]({p.name})" for p in tables if p.stem == f"table{spec.number}")
        lines.append(f"| {spec.title} | {files} |")
    lines += ["", "Tables 8 (WideResNet-18 ImageNet pretraining) and 9 (BERT-base pretraining, GLUE) have no "
              "proxy here: see `results/paper/table8.csv`, `table9.csv`.", "", "## Figures", ""]
    lines += [f"- [`{p.name}`]({p.name})" for p in figures] or ["No run yet."]
    return _write_text(Path(out_dir) / "README.md", "\n".join(lines) + "\n")


def _write_text(path: Path, text: str) -> Path:
    _atomic_write(path, text)
    return path


def make_tables(results_dir: Path, out_dir: Path, paper_dir: Path | None = None) -> list[Path]:
    """Write every table, the figures of each comparison and sweep, and the index; return the paths."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    paper_dir = Path(paper_dir) if paper_dir is not None else results_dir / "paper"
    runs = load_runs(results_dir)
    tables = [p for spec in TABLES for p in write_table(build_table(spec, runs, paper_dir), spec, out_dir)]
    figures = write_figures(runs, results_dir, out_dir)
    return [*tables, *figures, write_index(out_dir, runs, tables, figures)]
