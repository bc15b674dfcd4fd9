"""Exact vs sampled forward+backward at fixed keep ratios: time, FLOPs, peak memory (issue #9).

For each case (model, sequence length) and each (rho, nu) of the grid, one process holds two copies
of the same model: a plain one (exact) and one wrapped for VCAS with every block at ``rho`` and every
sampled linear at ``nu`` (fixed: no controller). Steps alternate exact/sampled (the order flips every
repeat), warm-up steps are not timed, every clock read waits for the device, and the medians of the
repeats are reported. FLOPs come from ``FlopCounterMode`` over the same step (mean of a few sampled
draws); peak memory is what the step allocates above its starting level (``measure/memory.py``).

Inputs are random token ids with a full attention mask (no padding, so every row is real work) or
random images; labels are random. The time with the optimizer adds one Adam step, the same for both.
A variance phase (``M = 2``: 2 exact + 4 SampleA passes) is timed once per case for its overhead.

    python scripts/bench_backward.py                        # all cases, writes results/bench/
    python scripts/bench_backward.py --cases minilm-64 --repeats 3
    python scripts/bench_backward.py --cases minilm-64 --grid "" --no-profile --tag phases-cpu  # phases only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification

from vcas_bench.measure.memory import peak_memory_bytes
from vcas_bench.measure.timers import synchronize
from vcas_bench.models import create_model
from vcas_bench.vcas import VcasConfig, VcasController, wrap

BATCH = 32
GRID = [(0.5, 0.5), (0.25, 0.25)]  # the two cases; --grid adds others (e.g. 0.5:1.0 isolates SampleA)


@dataclass
class Case:
    name: str
    model: nn.Module
    block_type: str
    batch: dict[str, torch.Tensor]
    logits: Callable[[nn.Module, dict], torch.Tensor]
    seq: int | None


def _text_batch(vocab: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (BATCH, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _text_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _bert_base_width(layers: int = 2) -> nn.Module:
    """BERT-base-width encoder stack (hidden 768, 12 heads, MLP 3072), random init."""
    config = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=3072, num_labels=2)
    return BertForSequenceClassification(config)


def build_case(name: str, generator: torch.Generator) -> Case:
    """``minilm-64``, ``minilm-128``, ``bert-base-width-128`` or ``vit-tiny``."""
    if name.startswith("minilm-"):
        seq = int(name.split("-")[1])
        bundle = create_model("minilm", num_labels=2)
        return Case(name, bundle.model, bundle.block_type, _text_batch(30522, seq, generator),
                    _text_logits, seq)
    if name.startswith("bert-base-width-"):
        seq = int(name.rsplit("-", 1)[1])
        return Case(name, _bert_base_width(), "BertLayer", _text_batch(30522, seq, generator),
                    _text_logits, seq)
    if name == "vit-tiny":
        bundle = create_model("vit-tiny", num_labels=10)
        images = torch.randn(BATCH, 3, 32, 32, generator=generator)
        return Case(name, bundle.model, bundle.block_type, {"pixel_values": images}, bundle.logits_fn, None)
    raise SystemExit(f"unknown case {name!r}")


def _loss(case: Case, model: nn.Module, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(case.logits(model, batch), labels)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class Pair:
    """The exact model and its VCAS-wrapped twin, with an optimizer each."""

    def __init__(self, case: Case, device: torch.device, seed: int) -> None:
        self.case, self.device = case, device
        self.exact = case.model.to(device).train()
        self.sampled = copy.deepcopy(self.exact)
        self.wrapped = wrap(self.sampled, case.block_type, torch.Generator().manual_seed(seed))
        self.batch = {k: v.to(device) for k, v in case.batch.items()}
        num_labels = self.exact.config.num_labels
        self.labels = torch.arange(BATCH, device=device) % num_labels
        self.optimizers = {m: torch.optim.Adam(m.parameters(), lr=1e-9) for m in (self.exact, self.sampled)}

    def set_ratios(self, rho: float, nu: float) -> None:
        self.wrapped.sampler.rho = [rho] * self.wrapped.sampler.num_blocks
        for slot in self.wrapped.sampler.linears:
            slot.nu = nu

    def forward_backward(self, model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            _loss(self.case, model, self.batch, self.labels).backward()
        return run

    def optimizer_step(self, model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            self.optimizers[model].step()
            self.optimizers[model].zero_grad(set_to_none=True)
        return run


VARIANTS = ("exact", "before", "after")  # plain model; sampled, straightforward backward; sampled, fast


def _run(pair: Pair, variant: str) -> tuple[nn.Module, Callable[[], None]]:
    model = pair.exact if variant == "exact" else pair.sampled
    pair.wrapped.sampler.reference = variant == "before"
    return model, pair.forward_backward(model)


def measure(pair: Pair, rho: float, nu: float, repeats: int, warmup: int, flop_draws: int) -> dict:
    """One row of the table: medians over ``repeats`` interleaved exact/before/after steps."""
    pair.set_ratios(rho, nu)
    times: dict[str, list[float]] = {f"{v}{opt}": [] for v in VARIANTS for opt in ("", "_opt")}
    for r in range(warmup + repeats):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # no variant always runs first
        for variant in order:
            model, step = _run(pair, variant)
            t_fb = _timed(step, pair.device)
            t_opt = _timed(pair.optimizer_step(model), pair.device)
            if r >= warmup:
                times[variant].append(t_fb)
                times[f"{variant}_opt"].append(t_fb + t_opt)
    flops_exact = _flops(_run(pair, "exact")[1])
    flops_sampled = statistics.mean(_flops(_run(pair, "after")[1]) for _ in range(flop_draws))
    mem = {v: peak_memory_bytes(_run(pair, v)[1], pair.device) for v in VARIANTS}
    for model in (pair.exact, pair.sampled):
        model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops_down = 1 - flops_sampled / flops_exact
    row = {"model": pair.case.name, "seq": pair.case.seq, "batch": BATCH, "rho": rho, "nu": nu,
           "flops_exact": flops_exact, "flops_sampled": flops_sampled, "flops_down": flops_down,
           "repeats": repeats, "t_exact_s": med["exact"], "t_exact_opt_s": med["exact_opt"],
           "peak_memory_exact": mem["exact"]}
    for variant, suffix in (("after", ""), ("before", "_before")):
        time_down = 1 - med[variant] / med["exact"]
        time_down_opt = 1 - med[f"{variant}_opt"] / med["exact_opt"]
        row |= {
            f"t_sampled{suffix}_s": med[variant], f"t_sampled_opt{suffix}_s": med[f"{variant}_opt"],
            f"time_down{suffix}": time_down, f"time_down_opt{suffix}": time_down_opt,
            f"conversion{suffix}": time_down / flops_down if flops_down > 0 else None,
            f"conversion_opt{suffix}": time_down_opt / flops_down if flops_down > 0 else None,
            f"peak_memory_sampled{suffix}": mem[variant],
            f"peak_memory_ratio{suffix}": mem[variant] / mem["exact"],
        }
    return row


def forward_share(pair: Pair, repeats: int, warmup: int) -> dict:
    """The conversion a sampled step could reach at best here: VCAS leaves the forward as it is, so if
    the backward's time shrank exactly with its FLOPs, Time↓ / FLOPs↓ = (backward share of the exact
    step's time) / (backward share of its FLOPs), whatever rho and nu are."""
    def forward() -> None:
        _loss(pair.case, pair.exact, pair.batch, pair.labels)

    t_forward, t_step = [], []
    for r in range(warmup + repeats):
        t_f = _timed(forward, pair.device)
        t_fb = _timed(pair.forward_backward(pair.exact), pair.device)
        if r >= warmup:
            t_forward.append(t_f)
            t_step.append(t_fb)
    pair.exact.zero_grad(set_to_none=True)
    flops_forward, flops_step = _flops(forward), _flops(pair.forward_backward(pair.exact))
    pair.exact.zero_grad(set_to_none=True)
    time_share = 1 - statistics.median(t_forward) / statistics.median(t_step)
    flops_share = 1 - flops_forward / flops_step
    return {"model": pair.case.name, "t_forward_s": statistics.median(t_forward),
            "t_exact_s": statistics.median(t_step), "backward_time_share": time_share,
            "backward_flops_share": flops_share, "conversion_ceiling": time_share / flops_share}


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


ROW_PROBES = {"variance_subset": "rows", "param_sample_ratio": 0.05}
PHASES = {  # name -> (controller settings, straightforward backward); one option at a time, then all
    "vcas, before": ({}, True),
    "vcas": ({}, False),
    "vcas + reuse_forward": ({"reuse_forward": True}, False),
    "vcas + row probes": (ROW_PROBES, False),
    "vcas-plus": ({"reuse_forward": True, **ROW_PROBES}, False),
}


def phase_overhead(pair: Pair, repeats: int) -> list[dict]:
    """Seconds of one variance phase (M = 2) against one exact forward+backward of the same batch."""
    rows = []
    for name, (settings, reference) in PHASES.items():
        model = copy.deepcopy(pair.exact)
        controller = VcasController(model, pair.case.block_type, VcasConfig(F=1, M=2, **settings))
        controller.sampler.reference = reference

        def loss_fn(batch: dict, model: nn.Module = model) -> torch.Tensor:
            return _loss(pair.case, model, batch, pair.labels)

        def phase(controller: VcasController = controller, loss_fn: Callable = loss_fn) -> None:
            controller.adapt(loss_fn, [pair.batch, pair.batch], 0)

        times = [_timed(phase, pair.device) for _ in range(repeats + 1)]
        t_exact = [_timed(pair.forward_backward(pair.exact), pair.device) for _ in range(repeats)]
        pair.exact.zero_grad(set_to_none=True)
        phase, exact = statistics.median(times[1:]), statistics.median(t_exact)
        rows.append({"model": pair.case.name, "phase": name, "t_phase_s": phase, "t_exact_s": exact,
                     "phase_over_step": phase / exact, "phase_flops_ratio": controller.phase_cost()})
    return rows


def markdown(rows: list[dict], phases: list[dict]) -> str:
    def conv(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines = [] if not rows else [
        "Time↓ and conversion (= Time↓ / FLOPs↓) before → after the fast backward; forward+backward,",
        "and with the Adam step (+opt). Peak memory: sampled / exact, allocated during the step.", "",
        "| model | seq | ρ | ν | t exact (s) | t sampled (s) | FLOPs↓ | Time↓ | conversion "
        "| conversion +opt | peak mem ratio |", "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seq'] or '–'} | {r['rho']} | {r['nu']} | {r['t_exact_s']:.3f} "
            f"| {r['t_sampled_before_s']:.3f} → {r['t_sampled_s']:.3f} | {r['flops_down']:.1%} "
            f"| {r['time_down_before']:.1%} → {r['time_down']:.1%} "
            f"| {conv(r['conversion_before'])} → {conv(r['conversion'])} "
            f"| {conv(r['conversion_opt_before'])} → {conv(r['conversion_opt'])} "
            f"| {r['peak_memory_ratio_before']:.3f} → {r['peak_memory_ratio']:.3f} |")
    if phases:
        lines += ["", "Variance phase (M = 2) against one exact forward+backward of the same batch, each",
                  "`vcas-plus` phase-cost option alone, then together (`fold_batch` is not in a phase: it",
                  "saves the scheduled step's own backward):", "",
                  "| model | phase | phase (s) | exact step (s) | phase / step: time | analytic FLOPs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['phase']} | {p['t_phase_s']:.3f} | {p['t_exact_s']:.3f} "
                  f"| {p['phase_over_step']:.2f} | {p['phase_flops_ratio']:.2f} |" for p in phases]
    return "\n".join(lines) + "\n"


# Self-time categories of a profiled step (CPU op names): what the fast backward can and cannot shrink.
CATEGORIES = {
    "linear forward (addmm)": ("aten::addmm",),
    "linear backward (mm)": ("aten::mm",),
    "attention matmuls": ("aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product"),
    "dropout": ("aten::bernoulli_", "aten::native_dropout"),
    "elementwise/norm (softmax, GELU, LayerNorm, mul, add)": (
        "aten::_softmax", "aten::gelu", "aten::native_layer_norm", "aten::mul", "aten::add", "aten::div",
        "aten::where", "aten::masked_fill", "aten::tanh", "aten::_log_softmax", "aten::nll_loss"),
    "row engine (gather, scatter, norms, sampling)": (
        "aten::index", "aten::index_select", "aten::index_copy_", "aten::index_fill_", "aten::any",
        "aten::ne", "aten::all", "aten::linalg_vector_norm", "aten::sort", "aten::cumsum", "aten::rand",
        "aten::nonzero", "aten::scatter_", "aten::fill_", "aten::zero_", "aten::clamp"),
}


def profile_step(pair: Pair, variant: str) -> dict[str, float]:
    """Seconds per category of one step of ``variant`` (self CPU time; the rest is "other")."""
    from torch.profiler import ProfilerActivity, profile

    _, step = _run(pair, variant)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    pair.exact.zero_grad(set_to_none=True)
    pair.sampled.zero_grad(set_to_none=True)
    seconds = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        name = next((c for c, prefixes in CATEGORIES.items() if event.key.startswith(prefixes)), "other")
        seconds[name] += event.self_cpu_time_total / 1e6
    return seconds


def profile_markdown(profiles: list[dict]) -> str:
    if not profiles:
        return ""
    header = "| model | variant | " + " | ".join(CATEGORIES) + " | other |"
    lines = ["", "Where a step's time goes (profiler self time, s; first grid point, one step each):", "",
             header, "|" + "---|" * (len(CATEGORIES) + 3)]
    for p in profiles:
        cells = " | ".join(f"{p['seconds'][c]:.3f}" for c in [*CATEGORIES, "other"])
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


def machine() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="minilm-64,minilm-128,bert-base-width-128,vit-tiny")
    parser.add_argument("--grid", default=",".join(f"{r}:{n}" for r, n in GRID), help="rho:nu,...")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flop-draws", type=int, default=3)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--tag", default=None, help="file name stem; default: backward-<device>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="results/proxy/vcas-plus-demo,results/proxy/vcas-plus-400",
                        help="comparison directories whose whole-run numbers join the table")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one step per variant and break its time down by kind of op (CPU)")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                        help="time a variance phase per option against an exact step")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device.type == "cpu"  # the op breakdown reads CPU self times
    grid = [tuple(float(x) for x in item.split(":")) for item in args.grid.split(",") if item]
    rows, phases, profiles, ceilings = [], [], [], []
    for name in args.cases.split(","):
        generator = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)  # model init of the random-width stacks; the script owns this process
        pair = Pair(build_case(name, generator), device, args.seed)
        for rho, nu in grid:
            rows.append(measure(pair, rho, nu, args.repeats, args.warmup, args.flop_draws))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.profile and cpu:
            pair.set_ratios(*grid[0])
            profiles += [{"model": name, "variant": v, "seconds": profile_step(pair, v)} for v in VARIANTS]
        ceilings.append(forward_share(pair, args.repeats, args.warmup))
        print(json.dumps(ceilings[-1]), file=sys.stderr, flush=True)
        if args.phases:
            phases += phase_overhead(pair, max(2, args.repeats // 2))
            print(json.dumps(phases[-len(PHASES):]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"backward-{device.type}"
    runs = whole_runs([d for d in args.runs.split(",") if d])
    record = {"machine": machine(), "args": vars(args), "rows": rows, "phases": phases, "whole_runs": runs,
              "profiles": profiles, "ceilings": ceilings}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = (markdown(rows, phases) + ceiling_markdown(ceilings) + profile_markdown(profiles)
             + whole_run_markdown(runs))
    (out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
