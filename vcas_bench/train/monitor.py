"""The variance monitor: the extra gradient variance and the bias of any sampler, against SGD's (Fig. 5).

Every ``every`` optimizer steps, after the update, on ``batches`` fresh batches ``i`` (drawn from the
training rows by a generator of the monitor's own, seeded by the step), with the same weights, the
same parameter subset and the same estimators as VCAS's variance phase (docs/method.md §7):

- one exact backward per batch gives ``G_i``: ``V_s`` is their unbiased sample variance;
- ``draws`` of the sampler's own step on the same batch, same dropout masks, give ``G_ij``:
  ``V_extra = 1/(batches * draws) * sum_ij ||G_ij - G_i||^2`` (VCAS's V_act when draws = batches; for
  VCAS it holds SampleA and SampleW together, i.e. V_act + V_w; for a biased sampler, bias^2 too);
- the bias, ``d = mean_ij (G_ij - G_i)``: ``bias_sq = ||d||^2 - noise`` with ``noise`` the part of
  ``||d||^2`` the draws' own scatter explains (from the within-batch variance of ``G_ij``), so it
  estimates ``||E d||^2`` without bias and reads about 0 for an unbiased sampler; ``bias_z =
  ||d||^2 / noise`` is about 1 then and well above 1 for a biased one (SB).

All sums run over the weights inside the blocks (``find_blocks``; VCAS's ``variance_weights``), on a
random ``param_sample_ratio`` of their entries, rescaled by the fraction covered.

The monitor leaves no trace on training: the global RNG (dropout), the sampler's state (its generator,
counters, loss history), buffers (BatchNorm statistics) and ``.grad`` are restored afterwards, so a
monitored run trains exactly as an unmonitored one. Its cost is its own: it runs outside the timer's
and the FLOP meter's units; every other measurement is counted (FlopCounterMode), the others timed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

from vcas_bench.measure.timers import synchronize
from vcas_bench.samplers import DrawsForMonitor, LossFn, OwnsRowEngine, Sampler
from vcas_bench.train.data import IndexedRows
from vcas_bench.vcas.autograd import RowEngine
from vcas_bench.vcas.variance import (
    buffer_snapshot,
    cuda_devices,
    random_subset,
    restore_buffers,
    rng_state,
    sample_variance,
    set_rng_state,
    squared_distances,
)
from vcas_bench.vcas.wrap import find_blocks

__all__ = ["MonitorSettings", "VarianceRecord", "VarianceMonitor", "GradientSample", "block_weights",
           "monitor_summary"]

MONITOR_SEED_OFFSET = 2_000_029  # the monitor's batches: apart from training's and the phases' streams


@dataclass
class MonitorSettings:
    """``monitor.*``: how often and on how much the monitor measures."""

    every: int = 100  # optimizer steps between measurements (after the update of step k * every)
    batches: int = 2  # fresh batches per measurement (VCAS's M)
    draws: int | None = None  # sampler draws per batch; None: as many as batches (VCAS's M x M)
    param_sample_ratio: float = 0.01  # of the block weights' entries (VCAS's default)

    @property
    def draws_per_batch(self) -> int:
        return self.batches if self.draws is None else self.draws


@dataclass
class VarianceRecord:
    """One measurement: a row of ``variance_log.csv``."""

    step: int  # optimizer updates done when it ran
    sampler: str
    batches: int
    draws: int  # per batch
    V_s: float  # SGD variance over the batches (exact gradients)
    V_extra: float  # the sampler's mean squared deviation from the exact gradient of the same batch
    extra_over_V_s: float
    bias_sq: float  # ||E(sampled - exact)||^2, noise-corrected (about 0 when unbiased; may be < 0)
    bias_over_V_s: float
    bias_z: float  # ||mean(sampled - exact)||^2 over what the draws' scatter explains (about 1 unbiased)
    time_s: float  # NaN on a FLOP-counted measurement
    flops: float  # NaN on a timed measurement


@dataclass
class GradientSample:
    """Probed gradients of one measurement: ``exact[i][l]`` and ``sampled[i][j][l]`` (batch, draw, weight),
    each a float64 vector over weight ``l``'s probed entries; ``fractions[l]`` of its entries."""

    exact: list[list[torch.Tensor]]
    sampled: list[list[list[torch.Tensor]]]
    fractions: list[float]


def block_weights(model: nn.Module, block_type: str) -> list[nn.Parameter]:
    """The matrices and kernels inside the blocks: the weights VCAS's phase measures (variance_weights)."""
    seen, weights = set(), []
    for _, block in find_blocks(model, block_type):
        for param in block.parameters():
            if param.requires_grad and param.ndim >= 2 and id(param) not in seen:
                seen.add(id(param))
                weights.append(param)
    return weights


def statistics(sample: GradientSample) -> dict[str, float]:
    """V_s, V_extra and the bias statistics of :class:`VarianceRecord` from one measurement's gradients."""
    M, D, n = len(sample.exact), len(sample.sampled[0]), len(sample.fractions)
    scale = torch.tensor([1 / f for f in sample.fractions], dtype=torch.float64)
    total = [sum(g[k] for g in sample.exact) for k in range(n)]
    total_sq = [sum(g[k].square() for g in sample.exact) for k in range(n)]
    V_s = sum(float(sample_variance(t, t2, M)) * float(c) for t, t2, c in zip(total, total_sq, scale))
    extra = torch.zeros(n, dtype=torch.float64)
    noise = torch.zeros(n, dtype=torch.float64)  # sum_i s_i^2 / D, s_i^2 the within-batch variance
    mean_dev = [torch.zeros_like(t) for t in total]  # mean over all draws of G_ij - G_i
    for exact, draws in zip(sample.exact, sample.sampled):
        devs = [[g - e for g, e in zip(draw, exact)] for draw in draws]
        batch_mean = [sum(dev[k] for dev in devs) / D for k in range(n)]
        for dev in devs:
            extra += squared_distances(dev, _zeros(dev))
            noise += squared_distances(dev, batch_mean) / ((D - 1) * D)
        for k in range(n):
            mean_dev[k] += batch_mean[k] / M
    noise_total = float((noise * scale).sum()) / M**2  # E||mean_dev||^2 if the sampler is unbiased
    norm_sq = float((squared_distances(mean_dev, _zeros(mean_dev)) * scale).sum())
    V_extra = float((extra * scale).sum()) / (M * D)
    bias_sq = norm_sq - noise_total
    z = norm_sq / noise_total if noise_total > 0 else (0.0 if norm_sq == 0 else math.inf)

    def over_V_s(value: float) -> float:
        return value / V_s if V_s > 0 else math.nan

    return {"V_s": V_s, "V_extra": V_extra, "extra_over_V_s": over_V_s(V_extra), "bias_sq": bias_sq,
            "bias_over_V_s": over_V_s(bias_sq), "bias_z": z}


def monitor_summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    """The monitor's own cost (kept out of the sampler's time and FLOPs) and its mean readings."""
    if not log:
        return {}
    timed = [r["time_s"] for r in log if math.isfinite(r["time_s"])]
    counted = [r["flops"] for r in log if math.isfinite(r["flops"])]
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"monitor_measurements": len(log),
            "monitor_time_s": mean(timed) * len(log) if timed else None,
            "monitor_flops": mean(counted) * len(log) if counted else None,
            "monitor_extra_over_V_s_mean": mean([r["extra_over_V_s"] for r in log]),
            "monitor_bias_over_V_s_mean": mean([r["bias_over_V_s"] for r in log])}


def _zeros(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) for t in tensors]


class VarianceMonitor:
    """Measures a sampler's extra variance and bias every ``settings.every`` steps (module docstring)."""

    def __init__(self, settings: MonitorSettings, rows: Dataset, batch_size: int, block_type: str,
                 seed: int = 0) -> None:
        if settings.batches < 2 or settings.draws_per_batch < 2:
            raise ValueError("the variance monitor needs at least 2 batches and 2 draws per batch")
        self.settings, self.batch_size, self.block_type, self.seed = settings, batch_size, block_type, seed
        self.rows = IndexedRows(rows)  # InfoBatch keys its draws by row

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0

    def fresh_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """``batches`` distinct random batches of training rows, the same for every sampler at ``step``."""
        generator = torch.Generator().manual_seed(self.seed + MONITOR_SEED_OFFSET + step)
        count = self.settings.batches * self.batch_size
        order = torch.randperm(len(self.rows), generator=generator)[:count].tolist()
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [default_collate([self.rows[i] for i in chunk]) for chunk in chunks]

    def measure(self, step: int, model: nn.Module, sampler: Sampler, loss_fn: LossFn) -> VarianceRecord:
        """One measurement after the update of step ``step`` (the model is left as it was)."""
        # As the FLOP meter does with phases: every other measurement counted, the others timed.
        probe = (step // self.settings.every) % 2 == 1
        device = next(model.parameters()).device
        counter = FlopCounterMode(display=False) if probe else contextlib.nullcontext()
        synchronize(device)
        start = time.perf_counter()
        with counter:
            sample = self.gradients(step, model, sampler, loss_fn)
        synchronize(device)
        seconds = time.perf_counter() - start
        return VarianceRecord(
            step=step, sampler=sampler.name, batches=self.settings.batches,
            draws=self.settings.draws_per_batch,
            **statistics(sample), time_s=math.nan if probe else seconds,
            flops=float(counter.get_total_flops()) if probe else math.nan)

    def gradients(self, step: int, model: nn.Module, sampler: Sampler, loss_fn: LossFn) -> GradientSample:
        """Exact and sampled probed gradients on the step's fresh batches; training state untouched."""
        params = [p for p in model.parameters() if p.requires_grad]
        weights = block_weights(model, self.block_type)
        generator = torch.Generator().manual_seed(self.seed + MONITOR_SEED_OFFSET + step)
        probes = [random_subset(w.numel(), self.settings.param_sample_ratio, generator, w.device)
                  for w in weights]
        fractions = [len(p) / w.numel() for p, w in zip(probes, weights)]
        saved_grads = [p.grad for p in params]
        saved_state = copy.deepcopy(sampler.state_dict())
        buffers = buffer_snapshot(model)
        exact, sampled = [], []
        try:
            with torch.random.fork_rng(devices=cuda_devices(params)):
                for batch in self.fresh_batches(step):
                    rng = rng_state()
                    with _exact_backward(model, sampler):
                        exact.append(self._pass(params, weights, probes, lambda b: _mean_backward(loss_fn, b),
                                                batch))
                    draws = []
                    for _ in range(self.settings.draws_per_batch):
                        set_rng_state(rng)  # the exact pass's dropout masks: only the sampler's draws differ
                        draws.append(self._pass(params, weights, probes, _draw(sampler, loss_fn), batch))
                    sampled.append(draws)
        finally:
            sampler.load_state_dict(saved_state)
            restore_buffers(model, buffers)
            for param, grad in zip(params, saved_grads):
                param.grad = grad
        return GradientSample(exact, sampled, fractions)

    @staticmethod
    def _pass(params, weights, probes, backward, batch) -> list[torch.Tensor]:
        for param in params:
            param.grad = None
        backward(batch)
        return [(w.grad.detach().flatten()[e] if w.grad is not None else torch.zeros(len(e), device=w.device))
                .double() for w, e in zip(weights, probes)]


def _mean_backward(loss_fn: LossFn, batch) -> None:
    losses, _ = loss_fn(batch)
    losses.mean().backward()


def _draw(sampler: Sampler, loss_fn: LossFn):
    """One of the sampler's own draws into ``.grad``: its ``monitor_draw`` (InfoBatch), else its step."""
    if isinstance(sampler, DrawsForMonitor):
        return lambda b: sampler.monitor_draw(b, loss_fn)
    return lambda b: sampler.step(b, loss_fn)


def _engines(model: nn.Module, sampler: Sampler) -> list[RowEngine]:
    """The row-skipping engines driving ``model``'s backward (VCAS's, or SB/UB's with rho = nu = 1)."""
    found = {id(m._vcas_engine): m._vcas_engine for m in model.modules() if hasattr(m, "_vcas_engine")}
    if isinstance(sampler, OwnsRowEngine):
        found.update({id(engine): engine for engine in sampler.row_engines()})
    return list(found.values())


@contextlib.contextmanager
def _exact_backward(model: nn.Module, sampler: Sampler) -> Iterator[None]:
    """Sampling off in every engine (as VCAS's exact pass): a plain backward is then the exact gradient."""
    engines = _engines(model, sampler)
    saved = [(e.sample_activations, e.sample_weights) for e in engines]
    for engine in engines:
        engine.sample_activations = engine.sample_weights = False
    try:
        yield
    finally:
        for engine, (act, w) in zip(engines, saved):
            engine.sample_activations, engine.sample_weights = act, w
