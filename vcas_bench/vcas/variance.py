"""The VCAS variance phase: estimate V_s, V_act and V_w from M batches (docs/method.md §5–§7).

For each batch, one exact backward and ``M`` SampleA-only backwards with independent draws and the
same dropout masks give

- ``V_s``   = unbiased sample variance of the exact gradients over the ``M`` batches,
- ``V_act`` = mean squared distance of the SampleA gradients to their batch's exact gradient,
- ``V_w,l`` = mean analytic SampleW variance (Eq. 3) of linear ``l`` at its current ``nu``,

on the weights inside the blocks (the sampled linears', plus conv kernels in a CNN), summed over a
random subset of their entries or output rows and rescaled by the covered fraction. The decisions
taken from them live in :mod:`vcas_bench.vcas.controller`.

The phase leaves no trace on the model: buffers (BatchNorm running statistics, which every extra
train-mode forward would update) are restored afterwards; with ``fold_batch`` to their state after
the scheduled batch's own forward. Gradients are taken with ``torch.autograd.grad``, so ``.grad``
(and any accumulated gradient) is never touched. Dropout masks are replayed by restoring the global
RNG *state* captured before the exact pass inside ``torch.random.fork_rng``; nothing is reseeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vcas_bench.vcas.config import VcasConfig
from vcas_bench.vcas.sampling import find_top_sum
from vcas_bench.vcas.wrap import Wrapped

__all__ = ["VarianceEstimator", "VarianceEstimate", "LossFn", "random_subset", "sample_variance",
           "squared_distances", "buffer_snapshot", "restore_buffers", "cuda_devices", "rng_state",
           "set_rng_state"]

LossFn = Callable[[Any], torch.Tensor]


def random_subset(n: int, ratio: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``round(n * ratio)`` (at least 1) distinct indices below ``n``, or all of them (§7's 1% of entries)."""
    k = max(1, round(n * ratio))
    if k >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=generator)[:k].to(device)


def sample_variance(total: torch.Tensor, total_sq: torch.Tensor, count: int) -> torch.Tensor:
    """Summed unbiased sample variance of ``count`` samples from their sum and sum of squares (V_s, §7)."""
    return (total_sq - total.square() / count).sum() / (count - 1)


def squared_distances(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``||a_l - b_l||^2`` per weight ``l`` (float64): one term of V_act (§7)."""
    return torch.tensor([(x - y).square().sum().item() for x, y in zip(a, b)], dtype=torch.float64)


@dataclass
class VarianceEstimate:
    """What one variance phase measured (averaged over ranks under data parallelism)."""

    V_s_layer: list[float]  # SGD variance per measured weight (sampled linears first)
    V_w_layer: list[float]  # SampleW variance per sampled linear at its current nu
    V_act: float  # SampleA variance, summed over the measured weights
    # Per block, the keep ratio Eq. 4 gives at each candidate s: {+1: at s_up, -1: at s_down}.
    keep_at: dict[int, list[float]]


class VarianceEstimator:
    """The variance phase of one wrapped model: its passes, probes and (with ``fold_batch``) the kept
    exact gradient of the scheduled batch. Draws come from the controller's ``generator``."""

    def __init__(self, wrapped: Wrapped, config: VcasConfig, generator: torch.Generator,
                 params: list[nn.Parameter], reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> None:
        self.wrapped, self.config, self.generator = wrapped, config, generator
        self.engine = wrapped.engine
        self.params = params
        self.reduce_fn = reduce_fn
        self.folded: tuple[float, list[torch.Tensor]] | None = None  # (loss, gradient) of a folded batch

    # -- passes ------------------------------------------------------------------------
    def estimate(self, loss_fn: LossFn, batches: list[Any], s_candidates: dict[int, float]
                 ) -> VarianceEstimate:
        """V_s and V_w per weight, V_act, and per block the keep ratio Eq. 4 gives at each candidate s
        (``{+1: s_up, -1: s_down}``), averaged over ranks when there is a ``reduce_fn``."""
        estimate = self._estimate(loss_fn, batches, s_candidates)
        return estimate if self.reduce_fn is None else self._reduce(estimate)

    def take_folded(self) -> tuple[float, list[torch.Tensor]] | None:
        """With ``fold_batch``: the loss and full gradient of the last phase's first batch, once."""
        folded, self.folded = self.folded, None
        return folded

    def _estimate(self, loss_fn: LossFn, batches: list[Any], s_candidates: dict[int, float]
                  ) -> VarianceEstimate:
        cfg, engine = self.config, self.engine
        weights = self.wrapped.variance_weights  # sampled linears first: V_s_layer[l] pairs with linear l
        buffers = buffer_snapshot(self.wrapped.model)
        probes = [self.probe_subset(w) for w in weights]
        fractions = torch.tensor([self._probe_fraction(w, p) for w, p in zip(weights, probes)],
                                 dtype=torch.float64)
        sum_g = sum_g2 = None
        act_sq = torch.zeros(len(weights), dtype=torch.float64)
        candidates = {+1: torch.zeros(engine.num_blocks), -1: torch.zeros(engine.num_blocks)}
        for slot in engine.linears:
            slot.weight_variance = 0.0
        for i, batch in enumerate(batches):
            rng_before = rng_state()
            loss = loss_fn(batch)
            if i == 0 and cfg.fold_batch:  # the scheduled batch's forward is a real training forward
                buffers = buffer_snapshot(self.wrapped.model)
            g_exact = self._pass(loss, weights, probes, exact=True, fold=cfg.fold_batch and i == 0)
            for sign, s_cand in s_candidates.items():
                candidates[sign] += torch.tensor([find_top_sum(n, s_cand) for n in engine.norms])
            if sum_g is None:
                sum_g, sum_g2 = [torch.zeros_like(g) for g in g_exact], [torch.zeros_like(g) for g in g_exact]
            for g, t, t2 in zip(g_exact, sum_g, sum_g2):
                t += g
                t2 += g.square()
            for j in range(cfg.M):
                if not cfg.reuse_forward:
                    with torch.random.fork_rng(devices=cuda_devices(weights)):
                        set_rng_state(rng_before)  # same dropout masks as the exact pass
                        loss = loss_fn(batch)
                g_act = self._pass(loss, weights, probes, exact=False, retain=j < cfg.M - 1)
                act_sq += squared_distances(g_act, g_exact)
        restore_buffers(self.wrapped.model, buffers)
        M = cfg.M
        V_s_layer = [float(sample_variance(t, t2, M) / r)
                     for t, t2, r in zip(sum_g, sum_g2, fractions.tolist())]
        V_w_layer = [slot.weight_variance / M**2 for slot in engine.linears]
        return VarianceEstimate(V_s_layer=V_s_layer, V_w_layer=V_w_layer,
                                V_act=float((act_sq / fractions).sum()) / M**2,
                                keep_at={sign: (c / M).tolist() for sign, c in candidates.items()})

    def _reduce(self, est: VarianceEstimate) -> VarianceEstimate:
        """The estimates averaged over ranks with ``reduce_fn``, in one call."""
        n_s, n_w, n_b = len(est.V_s_layer), len(est.V_w_layer), self.engine.num_blocks
        flat = [*est.V_s_layer, *est.V_w_layer, est.V_act, *est.keep_at[+1], *est.keep_at[-1]]
        mean = self.reduce_fn(torch.tensor(flat, dtype=torch.float64)).tolist()
        cut = [n_s, n_s + n_w, n_s + n_w + 1, n_s + n_w + 1 + n_b]
        return VarianceEstimate(V_s_layer=mean[: cut[0]], V_w_layer=mean[cut[0] : cut[1]], V_act=mean[cut[1]],
                                keep_at={+1: mean[cut[2] : cut[3]], -1: mean[cut[3] :]})

    def _pass(self, loss: torch.Tensor, weights, probes, exact: bool, retain: bool = False,
              fold: bool = False) -> list[torch.Tensor]:
        """One backward of ``loss``; returns the probed part of each weight's gradient.

        The graph is kept for the SampleA passes when they reuse the forward. With ``fold`` the exact
        gradient of every parameter is computed and kept for :meth:`take_folded`. With row probes
        (and no ``fold``) the sampled linears compute only the probed rows of their weight gradient;
        other weights (conv kernels) are probed from their full gradient.
        """
        engine, by_rows = self.engine, self.config.variance_subset == "rows"
        probe_linears = by_rows and not fold
        saved = (engine.sample_activations, engine.sample_weights)
        engine.sample_activations, engine.sample_weights = not exact, False
        engine.record_norms, engine.record_weight_variance = exact, not exact
        engine.check_leaks = not exact  # once per phase, off the training steps' hot path
        retain = retain or (exact and self.config.reuse_forward)
        if probe_linears:
            for slot, rows in zip(engine.linears, probes):
                slot.probe_rows = rows
        try:
            targets = self.params if fold else weights
            grads = list(torch.autograd.grad(loss, targets, retain_graph=retain, allow_unused=fold))
            probed = [slot.probe_grad for slot in engine.linears] if probe_linears else []
        finally:
            engine.sample_activations, engine.sample_weights = saved
            engine.record_norms = engine.record_weight_variance = engine.check_leaks = False
            for slot in engine.linears:
                slot.probe_rows = slot.probe_grad = None
        if fold:
            self.folded = (float(loss.detach()), grads)
            by_id = {id(p): g for p, g in zip(self.params, grads)}
            grads = [by_id[id(w)] for w in weights]
        if not by_rows:
            return [g.detach().flatten()[e].float() for g, e in zip(grads, probes)]
        done = len(probed)  # the linears' probed rows; the rest are cut from full gradients
        rest = [self.wrapped.rows_view(w, g.detach())[rows].flatten().float()
                for w, g, rows in zip(weights[done:], grads[done:], probes[done:])]
        return [p.detach().flatten().float() for p in probed] + rest

    def probe_subset(self, weight: torch.Tensor) -> torch.Tensor:
        """This phase's random subset: flat entry indices, or output-row indices with ``rows``."""
        if self.config.variance_subset == "rows":
            return self._random_subset(self.wrapped.output_rows(weight), weight.device)
        return self._random_subset(weight.numel(), weight.device)

    def _probe_fraction(self, weight: torch.Tensor, probe: torch.Tensor) -> float:
        """The fraction of the weight's entries a probe covers (the paper rescales by its nominal 1%)."""
        if self.config.variance_subset == "rows":
            return len(probe) / self.wrapped.output_rows(weight)
        return self.config.param_sample_ratio

    def _random_subset(self, n: int, device: torch.device) -> torch.Tensor:
        return random_subset(n, self.config.param_sample_ratio, self.generator, device)


# Shared with the runner's variance monitor, which leaves no trace on training the same way.
def buffer_snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(buf, buf.detach().clone()) for buf in model.buffers()]


def restore_buffers(model: nn.Module, snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo the variance phase's forwards on buffers (BatchNorm running mean/var, batch counter)."""
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


def cuda_devices(tensors: list[torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda_used = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if cuda_used else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def checked_loss_fn(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` that fails in one line unless it returns a scalar tensor (not logits, a float, a tuple)."""

    def checked(batch: Any) -> torch.Tensor:
        loss = loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            is_tensor = isinstance(loss, torch.Tensor)
            got = f"a tensor of shape {tuple(loss.shape)}" if is_tensor else type(loss).__name__
            raise TypeError(f"VCAS loss_fn(batch) must return the batch's mean loss as a scalar tensor; "
                            f"got {got}")
        return loss

    return checked
