"""Markdown for ``make bench`` (``results/bench/backward-<device>.md``) from what
``vcas_bench.measure.bench`` measured; and the whole-run numbers read from committed comparisons."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["bench_markdown", "whole_runs", "targets", "targets_markdown", "Target"]


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


@dataclass
class Target:
    """One benchmark target of docs/benchmarks.md: what is measured, the bar, and whether it was met."""

    what: str
    measured: str
    met: bool | None  # None: the record has no such case


def _row(rows: list[dict], model: str, rho: float) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["rho"] == rho), None)


def _conversion_target(rows: list[dict], model: str, rho: float, bar: float, label: str) -> Target:
    r = _row(rows, model, rho)
    if r is None:
        return Target(f"{label}, ρ = ν = {rho}: conversion ≥ {bar}", "not run", None)
    conv = r["sampled"]["conversion"]
    others = ", ".join(f"{v} {_conv(r[v]['conversion'])}" for v in ("static", "reference") if v in r)
    return Target(f"{label}, ρ = ν = {rho}: conversion ≥ {bar}", f"{_conv(conv)} ({others})",
                  conv is not None and conv >= bar)


def _extreme(rows: list[dict], key, fmt: str, lowest: bool = False) -> tuple[float, str]:
    """The largest (or lowest) ``key`` over ``rows`` and where it is, formatted."""
    pick = min if lowest else max
    value, where = pick((key(r), f"{r['model']} at {r['rho']}") for r in rows)
    return value, f"{fmt.format(value)} ({where})"


BERT_NODROPOUT = "bert-base-width-128-nodropout"


def targets(record: dict) -> list[Target]:
    """The targets of the fast-backward work against this record (docs/benchmarks.md)."""
    rows = record["rows"]
    out = [_conversion_target(rows, BERT_NODROPOUT, 0.5, 0.95, "BERT-base width, dropout off"),
           _conversion_target(rows, BERT_NODROPOUT, 0.25, 0.90, "BERT-base width, dropout off"),
           _conversion_target(rows, "minilm-text-128", 0.5, 0.60, "MiniLM, real text padded to 128")]
    timed = [r for r in rows if "reference" in r and "sampled" in r]
    if timed:
        ratio, text = _extreme(timed, lambda r: r["sampled"]["t_s"] / r["reference"]["t_s"], "{:.3f}")
        out.append(Target("default never slower than the reference (t default / t reference ≤ 1)",
                          f"worst {text}", ratio <= 1.0))
    padded = [r for r in rows if "samplew_padding_share" in r.get("sampled", {})]
    if padded:
        share, text = _extreme(padded, lambda r: r["sampled"]["samplew_padding_share"], "{:.2%}")
        out.append(Target("counted FLOPs ≤ 2% above computing exactly the drawn rows", f"worst {text}",
                          share <= 0.02))
    tiny = [r for r in rows if r["model"].startswith("tiny-width-") and "sampled" in r]
    if tiny:
        ratio, text = _extreme(tiny, lambda r: r["sampled"]["t_s"] / r["t_exact_s"], "{:.2f}x")
        out.append(Target("tiny width (hidden 64, 2 layers): sampled step ≤ 1.2x exact", f"worst {text}",
                          ratio <= 1.2))
    out += _checkpoint_targets([r for r in rows if "vs_exact_ckpt" in r.get("checkpointed", {})])
    arms = [(r, v) for r in rows for v in ("reference", "sampled", "static") if v in r]
    if arms:
        mem, where = max((r[v]["peak_memory_ratio"], f"{v}, {r['model']} at {r['rho']}") for r, v in arms)
        out.append(Target("peak memory of the non-checkpointed arms ≤ 1.05x exact",
                          f"worst {mem:.3f} ({where})", mem <= 1.05))
    for w in record.get("whole_runs", []):
        if w["sampler"] == "vcas-plus" and "demo" in w["run"]:
            time_down = w["time_down"]
            out.append(Target("whole run, vcas-plus in the demo setting: Time↓ ≥ 25% against exact",
                              f"{time_down:.1%} ({w['run']})", time_down is not None and time_down >= 0.25))
    return out


def _checkpoint_targets(rows: list[dict]) -> list[Target]:
    if not rows:
        return []

    def against(r: dict) -> dict:
        return r["checkpointed"]["vs_exact_ckpt"]

    conv, text = _extreme(rows, lambda r: against(r)["conversion"] or 0.0, "{:.2f}", lowest=True)
    mem, mem_text = _extreme(rows, lambda r: against(r)["peak_memory_ratio"], "{:.3f}")
    return [Target("checkpointed: conversion ≥ 0.9 against exact-checkpointed", f"lowest {text}",
                   conv >= 0.9),
            Target("checkpointed: peak memory ≤ 1.05x exact-checkpointed's", f"worst {mem_text}",
                   mem <= 1.05)]


def targets_markdown(record: dict) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets(record):
        met = "–" if t.met is None else ("yes" if t.met else "no")
        lines.append(f"| {t.what} | {t.measured} | {met} |")
    return "\n".join(lines) + "\n"


def bench_markdown(record: dict) -> str:
    """The whole page from the record ``scripts/bench_backward.py`` writes as JSON."""
    return ("Targets (docs/benchmarks.md):\n\n" + targets_markdown(record) + "\n"
            + steps_markdown(record["rows"]) + syncs_markdown(record["syncs"])
            + graph_breaks_markdown(record["graph_breaks"]) + phases_markdown(record["phases"])
            + ceiling_markdown(record["ceilings"]) + profile_markdown(record["profiles"])
            + whole_run_markdown(record["whole_runs"]))
