"""Profile one forward+backward of a bench case: self CPU time and call count by op, per variant
(``torch.profiler``), the table behind docs/benchmarks.md's "Profile of the sampled step".

    python scripts/profile_step.py --case bert-base-width-128-nodropout --rho 0.5 --nu 0.5
    python scripts/profile_step.py --case minilm-text-128 --variants exact,sampled --top 15

Each variant runs ``--warmup`` untimed steps, then ``--steps`` profiled ones; times are per step.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vcas_bench.measure import bench
from vcas_bench.measure.bench_cases import build_case

WATCHED = ("aten::copy_", "aten::any", "aten::index_fill_", "aten::index_copy_", "aten::index_select",
           "aten::nonzero", "aten::mm", "aten::bmm")


def profile_variant(pair: bench.Pair, variant: str, steps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Per op: self CPU seconds and calls per step."""
    _, step = pair.step(variant)
    for _ in range(warmup):
        step()
        pair.zero_grad()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
            pair.zero_grad()
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"self_s": 0.0, "calls": 0.0})
    for event in prof.key_averages():
        ops[event.key]["self_s"] += event.self_cpu_time_total / 1e6 / steps
        ops[event.key]["calls"] += event.count / steps
    return dict(ops)


def markdown(case: str, rho: float, nu: float, profiles: dict[str, dict], top: int) -> str:
    variants = list(profiles)
    totals = {v: sum(o["self_s"] for o in ops.values()) for v, ops in profiles.items()}
    ranked = sorted({k for ops in profiles.values() for k in ops},
                    key=lambda k: -max(profiles[v].get(k, {"self_s": 0})["self_s"] for v in variants))
    keys = ranked[:top] + [k for k in WATCHED if k not in ranked[:top]]
    head = " | ".join(f"{v} s (calls)" for v in variants)
    lines = [f"Profile of one step, {case}, rho = {rho}, nu = {nu} (self CPU time per step)", "",
             f"| op | {head} |", "|---|" + "---|" * len(variants)]
    for key in keys:
        cells = []
        for v in variants:
            o = profiles[v].get(key)
            cells.append("–" if o is None else f"{o['self_s']:.3f} ({o['calls']:.0f})")
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{totals[v]:.3f}**" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="bert-base-width-128-nodropout")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--nu", type=float, default=0.5)
    parser.add_argument("--variants", default="exact,reference,sampled")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)  # model init of the random-width stacks; the script owns this process
    pair = bench.Pair(build_case(args.case, torch.Generator().manual_seed(args.seed)), torch.device("cpu"),
                      args.seed)
    pair.set_ratios(args.rho, args.nu)
    profiles = {v: profile_variant(pair, v, args.steps, args.warmup) for v in args.variants.split(",")}
    table = markdown(args.case, args.rho, args.nu, profiles, args.top)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "profiles": profiles}, indent=1))
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
