"""Exact vs sampled forward+backward at fixed keep ratios: time, FLOPs, peak memory, host syncs and
graph breaks (`make bench`; docs/benchmarks.md). Cases: ``vcas_bench/measure/bench_cases.py``;
measurements: ``vcas_bench/measure/bench.py``; tables: ``vcas_bench/report/bench.py``.

    python scripts/bench_backward.py                        # all cases, writes results/bench/
    python scripts/bench_backward.py --cases minilm-64 --repeats 3
    python scripts/bench_backward.py --cases tiny-bert-16 --repeats 1 --warmup 0 --no-profile --no-phases
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vcas_bench.measure import bench
from vcas_bench.measure.bench_cases import build_case
from vcas_bench.report.bench import bench_markdown, whole_runs

CASES = ("bert-base-width-128-nodropout,bert-base-width-128,minilm-text-64,minilm-text-128,tiny-width-128,"
         "llama-128")
GRID = "0.5:0.5,0.25:0.25"  # the two cases; e.g. 0.5:1.0 isolates SampleA


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--grid", default=GRID, help="rho:nu,...")
    parser.add_argument("--variants", default=",".join(bench.VARIANTS), help="exact first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flop-draws", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--tag", default=None, help="file name stem; default: backward-<device>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="results/proxy/vcas-plus-demo,results/proxy/vcas-plus-400",
                        help="comparison directories whose whole-run numbers join the table")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one step per variant and break its time down by kind of op (CPU)")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                        help="time a variance phase per option against an exact step")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="count torch.compile graph breaks in each variant's forward")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the .md from the existing .json (whole runs read again)")
    return parser.parse_args(argv)


def run_case(name: str, args: argparse.Namespace, device: torch.device, record: dict) -> None:
    """Every measurement of one case, appended to ``record``'s lists."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # model init of the random-width stacks; the script owns this process
    pair = bench.Pair(build_case(name, generator), device, args.seed)
    variants = tuple(args.variants.split(","))
    grid = [tuple(float(x) for x in item.split(":")) for item in args.grid.split(",") if item]
    for rho, nu in grid:
        row = bench.measure(pair, rho, nu, args.repeats, args.warmup, args.flop_draws, variants)
        record["rows"].append(row)
        print(json.dumps(record["rows"][-1]), file=sys.stderr, flush=True)
    if grid:
        pair.set_ratios(*grid[0])
        record["syncs"].append(bench.host_syncs(pair, variants))
        if args.compile:
            compiled = tuple(v for v in variants if v in ("exact", "sampled", "static"))
            record["graph_breaks"].append(bench.graph_breaks(pair, compiled))
        if args.profile and device.type == "cpu":  # the op breakdown reads CPU self times
            record["profiles"] += [{"model": name, "variant": v, "seconds": bench.profile_step(pair, v)}
                                   for v in variants]
    record["ceilings"].append(bench.forward_share(pair, args.repeats, args.warmup))
    if args.phases:
        record["phases"] += bench.phase_overhead(pair, max(2, args.repeats // 2))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if args.render_only:
        return render(Path(args.out) / f"{args.tag or f'backward-{device.type}'}.json", args.runs)
    record = {"machine": bench.machine(device), "args": vars(args), "rows": [], "syncs": [],
              "graph_breaks": [], "phases": [], "ceilings": [], "profiles": []}
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for name in args.cases.split(","):
            run_case(name, args, device, record)
    record["whole_runs"] = whole_runs([d for d in args.runs.split(",") if d])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"backward-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = bench_markdown(record)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return record


def render(path: Path, runs: str) -> dict:
    """The page again from a committed record, with the whole runs read from their folders now."""
    record = json.loads(path.read_text())
    record["whole_runs"] = whole_runs([d for d in runs.split(",") if d])
    path.write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".md").write_text(bench_markdown(record))
    return record


if __name__ == "__main__":
    main()
