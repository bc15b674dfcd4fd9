"""The row-skipping backward shared by VCAS, SB and UB (vcas-method.md §1.3, §1.4, §1.10).

Two autograd functions do all the work:

- :class:`SampleActivation` sits on each wrapped block's output. Forward is the identity; backward
  draws SampleA over the batch rows of the incoming gradient (``p ∝ per-row norm``, ``sum p = N*rho``),
  rescales kept rows by ``1/p`` and records which rows are alive for the block's linears.
- :class:`SampledLinearFunction` replaces ``nn.Linear``'s backward inside a block: it works only on
  the rows alive in its block, and estimates the weight gradient by leverage-score sampling over
  (kept rows x tokens) at ratio ``nu`` relative to those rows (SampleW).

Everything they read and write lives on one :class:`RowSampler` instance per wrapped model: no
class-level counters, no global state, a private ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vcas_bench.vcas.sampling import (
    bernoulli_keep,
    leverage_sample_matmul,
    leverage_variance,
    row_norms,
    soft_topk,
)

__all__ = ["RowSampler", "SampleActivation", "SampledLinearFunction", "LinearSlot"]


@dataclass
class LinearSlot:
    """One sampled ``nn.Linear``: its name, the block it lives in, its keep ratio and statistics."""

    name: str
    block: int
    nu: float = 1.0
    weight_variance: float = 0.0  # analytic V_w summed over recorded passes (Eq. 3)


@dataclass
class RowSampler:
    """Per-model state of the sampled backward.

    Attributes:
        rho: keep ratio per block, index 0 nearest the input.
        linears: one slot per sampled linear, in module order.
        sample_activations: draw SampleA at block outputs (off: exact backward).
        sample_weights: draw SampleW in linears (off: exact weight gradient over the alive rows).
        record_norms: keep each block's per-row output-gradient norms (variance phase, exact pass).
        record_weight_variance: add each linear's analytic SampleW variance at its ``nu``.
        top_rows: optional bool mask ``(N,)`` of rows whose gradient is non-zero at the top (SB/UB).
        generator: private RNG for every draw.
    """

    num_blocks: int
    linears: list[LinearSlot] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)
    sample_activations: bool = True
    sample_weights: bool = True
    record_norms: bool = False
    record_weight_variance: bool = False
    top_rows: torch.Tensor | None = None
    rho: list[float] = field(default_factory=list)
    alive: list[torch.Tensor | None] = field(default_factory=list)  # per block, this backward
    norms: list[torch.Tensor | None] = field(default_factory=list)  # per block, last exact pass
    kept_fraction: list[float] = field(default_factory=list)  # per block, last backward

    def __post_init__(self) -> None:
        self.rho = self.rho or [1.0] * self.num_blocks
        self.alive = [None] * self.num_blocks
        self.norms = [None] * self.num_blocks
        self.kept_fraction = [1.0] * self.num_blocks

    # -- SampleA -------------------------------------------------------------------------------
    def sample_block_gradient(self, block: int, grad: torch.Tensor) -> torch.Tensor:
        """Apply SampleA to the gradient at ``block``'s output and record the rows left alive."""
        if self.record_norms:
            self.norms[block] = row_norms(grad)
        is_top = block == self.num_blocks - 1
        above_alive = self._top_alive(grad) if is_top else self.alive[block + 1]
        rho_above = 1.0 if is_top else self.rho[block + 1]
        # Nested sets: a block resamples only when it keeps less than the block above it (§1.10).
        if self.sample_activations and (is_top or self.rho[block] < rho_above) and self.rho[block] < 1:
            grad, keep = self._draw_rows(grad, self.rho[block])
            if above_alive is not None:
                keep &= above_alive
            above_alive = keep
        self.alive[block] = above_alive
        n = grad.shape[0]
        self.kept_fraction[block] = 1.0 if above_alive is None else float(above_alive.sum()) / n
        return grad

    def _top_alive(self, grad: torch.Tensor) -> torch.Tensor | None:
        if self.top_rows is None:
            return None
        return self.top_rows.to(grad.device)

    def _draw_rows(self, grad: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = grad.shape[0]
        p = soft_topk(row_norms(grad), n * rho)
        keep = bernoulli_keep(p, self.generator)
        scale = torch.where(keep, 1.0 / p.clamp_min(1e-12), torch.zeros_like(p))
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), keep

    # -- SampleW -------------------------------------------------------------------------------
    def alive_rows(self, block: int) -> torch.Tensor | None:
        """Indices of the rows alive in ``block`` during this backward (None: all of them)."""
        mask = self.alive[block]
        return None if mask is None else mask.nonzero().squeeze(1)

    def weight_gradient(self, slot: LinearSlot, grad_rows: torch.Tensor, input_rows: torch.Tensor):
        """SampleW over flattened rows: ``grad_rows (R, out)``, ``input_rows (R, in)`` -> ``(out, in)``."""
        k = slot.nu * grad_rows.shape[0]
        if self.record_weight_variance:
            slot.weight_variance += float(leverage_variance(grad_rows, input_rows, k))
        if not self.sample_weights or slot.nu >= 1:
            return grad_rows.t() @ input_rows
        return leverage_sample_matmul(grad_rows, input_rows, max(k, 1.0), self.generator)


class SampleActivation(torch.autograd.Function):
    """Identity forward; SampleA on the gradient in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, sampler: RowSampler, block: int) -> torch.Tensor:
        ctx.sampler, ctx.block = sampler, block
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.sampler.sample_block_gradient(ctx.block, grad), None, None


class SampledLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` whose backward touches only the block's alive rows (and samples W's rows)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sampler: RowSampler, slot: LinearSlot):
        ctx.save_for_backward(x, weight)
        ctx.sampler, ctx.slot, ctx.has_bias = sampler, slot, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = ctx.sampler.alive_rows(ctx.slot.block)
        # Rows outside the alive set carry an exactly zero gradient (nothing in a block mixes batch
        # rows), so slicing them away changes no number, only the work done.
        g = grad_out if rows is None else grad_out.index_select(0, rows)
        xs = x if rows is None else x.index_select(0, rows)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if rows is not None:
                grad_x = grad_out.new_zeros(x.shape).index_copy_(0, rows, grad_x)
        g2, x2 = g.reshape(-1, g.shape[-1]), xs.reshape(-1, xs.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = ctx.sampler.weight_gradient(ctx.slot, g2, x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None
