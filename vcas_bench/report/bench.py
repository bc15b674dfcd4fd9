"""Markdown for ``make bench`` (``results/bench/backward-<device>.md``) from what
``vcas_bench.measure.bench`` measured; and the whole-run numbers read from committed comparisons."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["bench_markdown", "whole_runs"]


def _conv(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def steps_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["Time↓ and conversion (= Time↓ / FLOPs↓) of each sampled variant against the exact step;",
             "forward+backward, and with the Adam step (+opt). Peak memory: sampled / exact, allocated",
             "during the step.", "",
             "| model | seq | ρ | ν | variant | t exact (s) | t sampled (s) | FLOPs↓ | Time↓ | conversion "
             "| conversion +opt | peak mem ratio |", "|" + "---|" * 12]
    for r in rows:
        for variant, v in ((k, r[k]) for k in SAMPLED_VARIANTS if k in r):
            lines.append(
                f"| {r['model']} | {r['seq'] or '–'} | {r['rho']} | {r['nu']} | {variant} "
                f"| {r['t_exact_s']:.3f} | {v['t_s']:.3f} | {v['flops_down']:.1%} | {v['time_down']:.1%} "
                f"| {_conv(v['conversion'])} "
                f"| {_conv(v['conversion_opt'])} | {v['peak_memory_ratio']:.3f} |")
    return "\n".join(lines) + "\n" + padding_markdown(rows) + checkpointed_markdown(rows)


def padding_markdown(rows: list[dict]) -> str:
    """SampleW's filler rows against a sampler that computes exactly the drawn rows."""
    rows = [r for r in rows if "samplew_padding_share" in r.get("sampled", {})]
    if not rows:
        return ""
    lines = ["", "SampleW's fixed-size GEMMs: FLOPs on filler rows, as a share of the sampled step's counted",
             "FLOPs (what computing exactly the drawn rows, with a host read per linear, would save), and",
             "linears whose draw overflowed their capacity (thinned: unbiased).", "",
             "| model | seq | ρ | ν | filler FLOPs / step FLOPs | thinned linears |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['seq'] or '–'} | {r['rho']} | {r['nu']} "
              f"| {r['sampled']['samplew_padding_share']:.2%} | {r['sampled']['samplew_thinned_linears']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


SAMPLED_VARIANTS = ("reference", "sampled", "static", "exact-ckpt", "checkpointed")


def checkpointed_markdown(rows: list[dict]) -> str:
    """The row-compact checkpointed step against the exact step with plain checkpointing."""
    rows = [r for r in rows if "vs_exact_ckpt" in r.get("checkpointed", {})]
    if not rows:
        return ""
    lines = ["", "Checkpointed: VCAS re-running each block on its kept rows against exact with plain",
             "checkpointing of the same blocks (both one forward more than the plain step).", "",
             "| model | seq | ρ | ν | t exact-ckpt (s) | t checkpointed (s) | FLOPs↓ | Time↓ | conversion "
             "| peak mem ratio |", "|" + "---|" * 10]
    for r in rows:
        v = r["checkpointed"]["vs_exact_ckpt"]
        lines.append(f"| {r['model']} | {r['seq'] or '–'} | {r['rho']} | {r['nu']} "
                     f"| {r['exact-ckpt']['t_s']:.3f} | {r['checkpointed']['t_s']:.3f} "
                     f"| {v['flops_down']:.1%} | {v['time_down']:.1%} "
                     f"| {_conv(v['conversion'])} | {v['peak_memory_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def syncs_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    variants = [v for v in ("exact", *SAMPLED_VARIANTS) if v in rows[0]]
    lines = ["", "Host syncs of one forward+backward (`measure/syncs.py`): in the backward / in the whole",
             "step (the forward's are the model's own).", "",
             "| model | blocks | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 2)]
    for r in rows:
        cells = " | ".join(f"{r[v]['backward']} / {r[v]['step']}" for v in variants)
        lines.append(f"| {r['model']} | {r['blocks']} | {cells} |")
    return "\n".join(lines) + "\n"


def graph_breaks_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    variants = [v for v in ("exact", "sampled", "static") if v in rows[0]]
    lines = ["", "`torch.compile` graph breaks in the forward (`torch._dynamo.explain`):", "",
             "| model | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
    for r in rows:
        counts = [r[v]["graph_breaks"] for v in variants]
        cells = " | ".join("error" if c is None else str(c) for c in counts)
        lines.append(f"| {r['model']} | {cells} |")
    return "\n".join(lines) + "\n"


def phases_markdown(phases: list[dict]) -> str:
    if not phases:
        return ""
    lines = ["", "Variance phase (M = 2) against one exact forward+backward of the same batch, each",
             "`vcas-plus` phase-cost option alone, then together (`fold_batch` is not in a phase: it",
             "saves the scheduled step's own backward):", "",
             "| model | phase | phase (s) | exact step (s) | phase / step: time | analytic FLOPs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['phase']} | {p['t_phase_s']:.3f} | {p['t_exact_s']:.3f} "
              f"| {p['phase_over_step']:.2f} | {p['phase_flops_ratio']:.2f} |" for p in phases]
    return "\n".join(lines) + "\n"


def ceiling_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "Ceiling: VCAS does not shrink the forward, so a backward whose time fell exactly with",
             "its FLOPs would convert at (backward share of time) / (backward share of FLOPs):", "",
             "| model | forward (s) | forward+backward (s) | backward share: time | backward share: FLOPs "
             "| conversion ceiling |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['t_forward_s']:.3f} | {r['t_exact_s']:.3f} "
              f"| {r['backward_time_share']:.1%} | {r['backward_flops_share']:.1%} "
              f"| {r['conversion_ceiling']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def profile_markdown(profiles: list[dict]) -> str:
    if not profiles:
        return ""
    categories = list(profiles[0]["seconds"])
    lines = ["", "Where a step's time goes (profiler self time, s; first grid point, one step each):", "",
             "| model | variant | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 2)]
    for p in profiles:
        cells = " | ".join(f"{p['seconds'][c]:.3f}" for c in categories)
        lines.append(f"| {p['model']} | {p['variant']} | {cells} |")
    return "\n".join(lines) + "\n"


def whole_runs(dirs: list[str]) -> list[dict]:
    """Whole-run Time↓ / FLOPs↓ (optimizer and variance phases included) from ``vcas-bench`` comparisons."""
    rows = []
    for run_dir in dirs:
        path = Path(run_dir) / "comparison.json"
        if not path.exists():
            print(f"bench: skipping {run_dir}: no comparison.json", file=sys.stderr)
            continue
        for r in json.loads(path.read_text())["rows"]:
            if r["sampler"] == "exact":
                continue
            rows.append({"run": run_dir, "sampler": r["sampler"], "steps": r["steps"],
                         "flops_down": r.get("flops_reduction_measured"),
                         "time_down": r.get("time_reduction"),
                         "conversion": r.get("time_over_flops_reduction"),
                         "phase_time_share": r["time_phases_s"] / r["train_time_s"]})
    return rows


def whole_run_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "Whole runs (optimizer and variance phases included), from `vcas-bench` comparisons:", "",
             "| run | sampler | steps | FLOPs↓ (measured) | Time↓ | conversion | phases' share of time |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['sampler']} | {r['steps']} | {r['flops_down']:.1%} | {r['time_down']:.1%} "
              f"| {r['conversion']:.2f} | {r['phase_time_share']:.1%} |" for r in rows]
    return "\n".join(lines) + "\n"


def bench_markdown(record: dict) -> str:
    """The whole page from the record ``scripts/bench_backward.py`` writes as JSON."""
    return (steps_markdown(record["rows"]) + syncs_markdown(record["syncs"])
            + graph_breaks_markdown(record["graph_breaks"]) + phases_markdown(record["phases"])
            + ceiling_markdown(record["ceilings"]) + profile_markdown(record["profiles"])
            + whole_run_markdown(record["whole_runs"]))
