"""Write the comparison table of runs made as separate jobs (one sampler each, ``baselines=[]``).

    python scripts/combine_runs.py results/proxy/vcas-plus-2000 \
        --exact results/proxy/vcas-plus-400/exact/metrics.json

Measured FLOPs↓ is taken against the folder's own ``exact`` run, else against ``--exact`` scaled to each
run's steps: a FLOP count depends only on shapes, so the same task, model, batch and sequence length
give the same count per exact step. Times are left out: jobs that shared a machine do not time each
other fairly (`vcas-bench` with baselines in one process does).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vcas_bench.report.files import write_json
from vcas_bench.report.runs import read_comparison, read_run
from vcas_bench.report.table import comparison_rows, markdown_table

SAME_SHAPES = ("task", "model", "batch_size", "accumulate")
TIMES = ("time_reduction", "time_over_flops_reduction", "train_time_s", "time_forward_s", "time_backward_s",
         "time_optimizer_s", "time_phases_s")


def load(folder: Path) -> list[dict[str, Any]]:
    """The metrics of each ``<folder>/<job>/``, in method order, with the run's ``label``: a job folder
    named other than its sampler (an ablation of one sampler's options) labels the row ``sampler (job)``."""
    runs = [{**run.metrics, "label": run.label} for run in read_comparison(folder)]
    if not runs:
        raise SystemExit(f"combine_runs: no */metrics.json under {folder}")
    return runs


def exact_flops_per_step(runs: list[dict[str, Any]], exact_path: Path | None) -> dict[str, Any]:
    own = [m for m in runs if m["sampler"] == "exact"]
    if own:
        return own[0]
    if exact_path is None:
        raise SystemExit("combine_runs: the folder has no exact run; pass --exact <metrics.json>")
    reference = read_run(exact_path)
    if reference is None:
        raise SystemExit(f"combine_runs: cannot read {exact_path} (a run's metrics.json)")
    return reference.metrics


def combine(runs: list[dict[str, Any]], exact: dict[str, Any]) -> list[dict[str, Any]]:
    per_step = exact["flops_total"] / exact["steps"]
    for m in runs:
        differ = [k for k in SAME_SHAPES if m.get(k) != exact.get(k)]
        if differ:
            raise SystemExit(f"combine_runs: {m['sampler']} differs from exact in {', '.join(differ)}")
        for key in TIMES:
            m.pop(key, None)
        if m["sampler"] != "exact":
            m["flops_reduction_measured"] = 1 - m["flops_total"] / (per_step * m["steps"])
    rows = comparison_rows(runs)
    for row, m in zip(rows, runs):
        row["sampler"] = m["label"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--exact", type=Path, default=None, help="metrics.json of an exact run elsewhere")
    args = parser.parse_args(argv)
    runs = load(args.folder)
    exact = exact_flops_per_step(runs, args.exact)
    rows = combine(runs, exact)
    write_json(args.folder / "comparison.json", {"rows": rows, "exact_reference": str(args.exact or "")})
    table = markdown_table(rows)
    (args.folder / "comparison.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
