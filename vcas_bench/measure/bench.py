"""Exact vs sampled forward+backward at fixed keep ratios: time, FLOPs, peak memory, host syncs and
graph breaks (``make bench``; docs/benchmarks.md).

One process holds two copies of a case's model: a plain one (exact) and one wrapped for VCAS with
every block at ``rho`` and every sampled linear at ``nu`` (fixed: no controller). Variants of a step:

- ``exact``: the plain model;
- ``reference``: the wrapped model, straightforward backward (``RowEngine.reference``);
- ``sampled``: the wrapped model, the default backward (Bernoulli rows, one host read per block);
- ``static``: the wrapped model with ``static_shapes`` (a fixed number of rows, no host read);
- ``exact-ckpt``: the plain model with activation checkpointing of its blocks (``checkpoint_blocks``);
- ``checkpointed``: a wrapped copy whose blocks re-run on the rows SampleA kept (``vcas/checkpoint.py``),
  compared with ``exact-ckpt`` as well as with ``exact``.

Steps of the variants alternate (the order flips every repeat), warm-up steps are not timed, every
clock read waits for the device (``timers.time_call``), and the medians of the repeats are reported.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vcas_bench.measure.bench_cases import BATCH, Case
from vcas_bench.measure.memory import peak_memory_bytes
from vcas_bench.measure.syncs import SyncCounter
from vcas_bench.measure.timers import time_call
from vcas_bench.vcas import VcasConfig, VcasController, checkpoint_blocks, wrap

__all__ = ["VARIANTS", "Pair", "measure", "forward_share", "phase_overhead", "profile_step", "host_syncs",
           "graph_breaks", "machine"]

VARIANTS = ("exact", "reference", "sampled", "static", "exact-ckpt", "checkpointed")
CHECKPOINTED = {"exact-ckpt", "checkpointed"}


def flops_of(fn: Callable[[], object]) -> float:
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
        self.exact_ckpt = copy.deepcopy(self.exact)
        checkpoint_blocks(self.exact_ckpt, case.block_type)
        self.checkpointed = copy.deepcopy(self.exact)
        checkpoint_blocks(self.checkpointed, case.block_type)
        self.wrapped_ckpt = wrap(self.checkpointed, case.block_type, torch.Generator().manual_seed(seed))
        self.batch = {k: v.to(device) for k, v in case.batch.items()}
        self.labels = torch.arange(BATCH, device=device) % case.num_labels
        self.models = {"exact": self.exact, "exact-ckpt": self.exact_ckpt, "checkpointed": self.checkpointed}
        self.optimizers = {m: torch.optim.Adam(m.parameters(), lr=1e-9)
                           for m in (self.exact, self.sampled, self.exact_ckpt, self.checkpointed)}

    def set_ratios(self, rho: float, nu: float) -> None:
        for wrapped in (self.wrapped, self.wrapped_ckpt):
            wrapped.engine.rho = [rho] * wrapped.engine.num_blocks
            for slot in wrapped.engine.linears:
                slot.nu = nu

    def loss(self, model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(self.case.logits(model, self.batch), self.labels)

    def step(self, variant: str) -> tuple[nn.Module, Callable[[], None]]:
        """The model of ``variant`` and its forward+backward."""
        model = self.models.get(variant, self.sampled)
        self.wrapped.engine.reference = variant == "reference"
        self.wrapped.engine.static_shapes = variant == "static"
        engine = {self.sampled: self.wrapped.engine, self.checkpointed: self.wrapped_ckpt.engine}.get(model)

        def run() -> None:
            self.loss(model).backward()
            if engine is not None:
                # The per-step read a training loop makes (VcasController.count_step): kept fractions,
                # and the draws SampleW sizes its next GEMMs from.
                engine.read_step()

        return model, run

    def optimizer_step(self, model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            self.optimizers[model].step()
            self.optimizers[model].zero_grad(set_to_none=True)

        return run

    def zero_grad(self) -> None:
        for model in self.optimizers:
            model.zero_grad(set_to_none=True)


def measure(pair: Pair, rho: float, nu: float, repeats: int, warmup: int, flop_draws: int,
            variants: tuple[str, ...] = VARIANTS) -> dict:
    """One row of the table: medians over ``repeats`` interleaved steps of each variant."""
    pair.set_ratios(rho, nu)
    times: dict[str, list[float]] = {f"{v}{opt}": [] for v in variants for opt in ("", "_opt")}
    for r in range(warmup + repeats):
        for variant in variants if r % 2 == 0 else variants[::-1]:  # no variant always runs first
            model, step = pair.step(variant)
            t_fb = time_call(step, pair.device)
            t_opt = time_call(pair.optimizer_step(model), pair.device)
            if r >= warmup:
                times[variant].append(t_fb)
                times[f"{variant}_opt"].append(t_fb + t_opt)
    flops = {v: statistics.mean(flops_of(pair.step(v)[1]) for _ in range(1 if v == "exact" else flop_draws))
             for v in variants}
    memory = {v: peak_memory_bytes(pair.step(v)[1], pair.device) for v in variants}
    pair.zero_grad()
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": pair.case.name, "seq": pair.case.seq, "batch": BATCH, "rho": rho, "nu": nu,
           "repeats": repeats, "flops_exact": flops["exact"], "t_exact_s": med["exact"],
           "t_exact_opt_s": med["exact_opt"], "peak_memory_exact": memory["exact"]}
    for variant in variants[1:]:
        flops_down = 1 - flops[variant] / flops["exact"]
        time_down = 1 - med[variant] / med["exact"]
        time_down_opt = 1 - med[f"{variant}_opt"] / med["exact_opt"]
        row[variant] = {
            "flops": flops[variant], "flops_down": flops_down, "t_s": med[variant],
            "t_opt_s": med[f"{variant}_opt"], "time_down": time_down, "time_down_opt": time_down_opt,
            "conversion": time_down / flops_down if flops_down > 0 else None,
            "conversion_opt": time_down_opt / flops_down if flops_down > 0 else None,
            "peak_memory": memory[variant], "peak_memory_ratio": memory[variant] / memory["exact"],
        }
    if "sampled" in variants:
        row["sampled"].update(samplew_padding(pair, flops["sampled"]))
    if "exact-ckpt" in variants and "checkpointed" in variants:
        row["checkpointed"]["vs_exact_ckpt"] = _against(flops, med, memory, "checkpointed", "exact-ckpt")
    return row


def samplew_padding(pair: Pair, step_flops: float) -> dict:
    """FLOPs SampleW's fixed-size GEMMs spent on filler rows in one sampled step, as a share of the
    step's counted FLOPs: what a sampler computing exactly the drawn rows (one host read per linear)
    would save. Also how many linears drew more rows than their capacity (thinned)."""
    pair.step("sampled")[1]()
    pair.zero_grad()
    padding, thinned = 0.0, 0
    for slot, module in zip(pair.wrapped.engine.linears, pair.wrapped.linear_modules):
        if slot.capacity:
            padding += 2.0 * max(slot.capacity - slot.drawn, 0) * module.weight.numel()
            thinned += slot.drawn > slot.capacity
        slot.capacity = 0
    return {"samplew_padding_share": padding / step_flops, "samplew_thinned_linears": thinned}


def _against(flops: dict, med: dict, memory: dict, variant: str, base: str) -> dict:
    """``variant`` measured against ``base`` instead of the plain exact step."""
    flops_down, time_down = 1 - flops[variant] / flops[base], 1 - med[variant] / med[base]
    return {"flops_down": flops_down, "time_down": time_down,
            "conversion": time_down / flops_down if flops_down > 0 else None,
            "peak_memory_ratio": memory[variant] / memory[base]}


def forward_share(pair: Pair, repeats: int, warmup: int) -> dict:
    """The conversion a sampled step could reach at best here: VCAS leaves the forward as it is, so if
    the backward's time shrank exactly with its FLOPs, Time↓ / FLOPs↓ = (backward share of the exact
    step's time) / (backward share of its FLOPs), whatever rho and nu are."""
    def forward() -> None:
        pair.loss(pair.exact)

    _, step = pair.step("exact")
    t_forward, t_step = [], []
    for r in range(warmup + repeats):
        t_f, t_fb = time_call(forward, pair.device), time_call(step, pair.device)
        if r >= warmup:
            t_forward.append(t_f)
            t_step.append(t_fb)
    flops_forward, flops_step = flops_of(forward), flops_of(step)
    pair.zero_grad()
    time_share = 1 - statistics.median(t_forward) / statistics.median(t_step)
    flops_share = 1 - flops_forward / flops_step
    return {"model": pair.case.name, "t_forward_s": statistics.median(t_forward),
            "t_exact_s": statistics.median(t_step), "backward_time_share": time_share,
            "backward_flops_share": flops_share, "conversion_ceiling": time_share / flops_share}


def host_syncs(pair: Pair, variants: tuple[str, ...] = VARIANTS) -> dict:
    """Host syncs of one forward+backward of each variant, in all and in the backward alone."""
    row: dict = {"model": pair.case.name, "blocks": pair.wrapped.engine.num_blocks}
    for variant in variants:
        model, _ = pair.step(variant)
        with SyncCounter() as whole:
            loss = pair.loss(model)
            with SyncCounter() as backward:
                loss.backward()
        row[variant] = {"step": whole.total, "backward": backward.total, "by_op": dict(whole.counts)}
    pair.zero_grad()
    return row


def graph_breaks(pair: Pair, variants: tuple[str, ...] = ("exact", "sampled", "static")) -> dict:
    """Graph breaks ``torch.compile`` (dynamo) meets in the forward of each variant."""
    row: dict = {"model": pair.case.name}
    for variant in variants:
        model, _ = pair.step(variant)
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(lambda m=model: pair.loss(m))()
            reasons = sorted({str(b.reason).splitlines()[0] for b in explained.break_reasons})
            row[variant] = {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
                            "reasons": reasons}
        except Exception as error:  # noqa: BLE001  (a model dynamo cannot trace at all is reported, not fatal)
            row[variant] = {"graph_breaks": None, "error": f"{type(error).__name__}: {error}"[:200]}
    torch._dynamo.reset()
    pair.zero_grad()
    return row


ROW_PROBES = {"variance_subset": "rows", "param_sample_ratio": 0.05}
PHASES = {  # name -> (controller settings, straightforward backward); one option at a time, then all
    "vcas, reference": ({}, True),
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
        controller.engine.reference = reference

        def phase(controller: VcasController = controller, model: nn.Module = model) -> None:
            controller.adapt(lambda batch: pair.loss(model), [pair.batch, pair.batch], 0)

        times = [time_call(phase, pair.device) for _ in range(repeats + 1)]
        t_exact = [time_call(pair.step("exact")[1], pair.device) for _ in range(repeats)]
        pair.zero_grad()
        phase_s, exact = statistics.median(times[1:]), statistics.median(t_exact)
        rows.append({"model": pair.case.name, "phase": name, "t_phase_s": phase_s, "t_exact_s": exact,
                     "phase_over_step": phase_s / exact, "phase_flops_ratio": controller.phase_cost()})
    return rows


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
        "aten::nonzero", "aten::scatter_", "aten::fill_", "aten::zero_", "aten::clamp", "aten::argsort",
        "aten::topk", "aten::searchsorted", "aten::randperm"),
}


def profile_step(pair: Pair, variant: str) -> dict[str, float]:
    """Seconds per category of one step of ``variant`` (self CPU time; the rest is "other")."""
    from torch.profiler import ProfilerActivity, profile

    _, step = pair.step(variant)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    pair.zero_grad()
    seconds = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        name = next((c for c, prefixes in CATEGORIES.items() if event.key.startswith(prefixes)), "other")
        seconds[name] += event.self_cpu_time_total / 1e6
    return seconds


def machine(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "torch": torch.__version__}
