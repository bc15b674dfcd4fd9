"""The row-skipping backward shared by VCAS, SB and UB (docs/method.md §3, §4).

Two autograd functions do all the work:

- :class:`SampleActivation` sits on each wrapped block's output. Forward is the identity; backward
  draws SampleA over the batch rows of the incoming gradient (``p ∝ per-row norm``, ``sum p = N*rho``)
  and rescales kept rows by ``1/p``; dropped rows become exactly zero.
- :class:`SampledLinearFunction` replaces ``nn.Linear``'s backward inside a block: it works only on
  the batch rows whose output gradient is non-zero, and estimates the weight gradient by
  leverage-score sampling over (those rows x tokens) at ratio ``nu`` relative to them (SampleW).

The rows a linear skips are read off its own output gradient, not off the block's SampleA mask:
gradient may also reach a block by another path (a tuple block's second output, a hidden state used
in the loss), and such rows must be backpropagated to stay unbiased. SB and UB rely on the same
rule: examples they drop get weight 0 in the loss, so their rows are zero everywhere below.

Host syncs (docs/method.md §15): a block reads its kept rows back once (:func:`row_set`, at its
SampleA) and its linears reuse them; SampleA's probabilities, SampleW's draws (fixed-size GEMMs) and
the kept fractions stay on the device. A linear re-reads its own rows only where gradient may enter
the block elsewhere: a tuple block's other outputs received gradient, or the block holds BatchNorm in
train mode (``BlockRows.other_paths``). Any other entry (a hook inside a block feeding the loss) is
caught on the device and reported by :meth:`RowEngine.read_step`. With ``static_shapes`` a block
keeps a fixed number of rows (systematic sampling) and nothing is read back at all.

Everything they read and write lives on one :class:`RowEngine` instance per wrapped model: no
class-level counters, no global state, a private ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vcas_bench.vcas.rowsets import BlockRows, RowSet, fixed_row_set, row_set
from vcas_bench.vcas.sampling import (
    bernoulli_keep,
    fixed_capacity,
    leverage_sample_matmul,
    leverage_variance,
    row_norms,
    soft_topk,
    systematic_sample,
)

__all__ = ["RowEngine", "SampleActivation", "SampledLinearFunction", "LinearSlot", "RowSet", "BlockRows",
           "StepReading", "OtherPath", "nonzero_rows", "row_set"]


# Relative slack of SampleW's capacity over the last draw (the batch's share of padding moves between
# steps); beyond it the draw is thinned, which stays unbiased but adds variance.
CAPACITY_MARGIN = 0.1


@dataclass
class LinearSlot:
    """One sampled ``nn.Linear``: its name, the block it lives in, its keep ratio and statistics."""

    name: str
    block: int
    index: int = 0  # position in RowEngine.linears
    nu: float = 1.0
    weight_variance: float = 0.0  # analytic V_w summed over recorded passes (Eq. 3)
    # Variance phase with a row subset: compute only these output rows of the weight gradient
    # (``probe_grad``) instead of all of it; the full gradient handed to autograd is then a zero view.
    probe_rows: torch.Tensor | None = None
    probe_grad: torch.Tensor | None = None
    # SampleW's GEMM capacity follows the last read draw (rows drawn / rows offered, at ``drawn_nu``):
    # sized from ``nu`` alone it would pay for rows whose score is zero (padding tokens).
    drawn_fraction: float | None = None
    drawn_nu: float = 1.0
    offered: int = 0  # rows offered to SampleW in the backward not read back yet (0: none)
    capacity: int = 0  # rows of the last SampleW GEMM
    drawn: int = 0  # rows SampleW drew in the last read backward (the GEMM's useful rows, up to capacity)


@dataclass
class StepReading:
    """What one sampled backward left on the device, read back in one go."""

    kept_fraction: list[float]  # per block, SampleA's


@dataclass
class RowEngine:
    """Per-model state of the sampled backward.

    Attributes:
        rho: keep ratio per block, index 0 nearest the input.
        linears: one slot per sampled linear, in module order.
        sample_activations: draw SampleA at block outputs (off: exact backward).
        sample_weights: draw SampleW in linears (off: exact weight gradient over the non-zero rows).
        static_shapes: SampleA keeps exactly ``ceil(N * rho)`` rows (systematic sampling) and the
            backward reads nothing back from the device (docs/method.md §15).
        record_norms: keep each block's per-row output-gradient norms (variance phase, exact pass).
        record_weight_variance: add each linear's analytic SampleW variance at its ``nu``.
        check_leaks: check in every linear that no gradient reached rows its block's SampleA dropped
            (a full pass over each output gradient). Off on the hot path; the controller turns it on
            for the variance phase's sampled passes, and a debug run may keep it on.
        reference: run the straightforward backward the fast one must match bit for bit.
        generator: private RNG for every draw (a CPU generator; draws move to the tensors' device).
        step_rows: rows that every block's gradient is confined to for this backward (SB and UB set
            the examples they keep), so that no block reads them back.
    """

    num_blocks: int
    linears: list[LinearSlot] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)
    sample_activations: bool = True
    sample_weights: bool = True
    static_shapes: bool = False
    record_norms: bool = False
    record_weight_variance: bool = False
    reference: bool = False  # the straightforward backward (full-size zero fills): tests and benchmarks
    check_leaks: bool = False
    rho: list[float] = field(default_factory=list)
    norms: list[torch.Tensor | None] = field(default_factory=list)  # per block, last exact pass
    step_rows: RowSet | None = None
    current: list[BlockRows] = field(default_factory=list)  # per block, its latest forward call
    _kept: torch.Tensor | None = None  # per block, SampleA's kept fraction (device), last backward
    _leaks: torch.Tensor | None = None  # per linear: gradient outside its block's rows was seen
    _drawn: torch.Tensor | None = None  # per linear: rows SampleW drew in the last backward
    _decided: dict[int, RowSet | None] = field(default_factory=dict)  # SampleA -> SampleActivation
    device_generators: dict[str, torch.Generator] = field(default_factory=dict)  # see generator_for

    def __post_init__(self) -> None:
        self.rho = self.rho or [1.0] * self.num_blocks
        self.norms = [None] * self.num_blocks
        self.current = [BlockRows(other_paths=True) for _ in range(self.num_blocks)]

    @property
    def kept_fraction(self) -> list[float]:
        """SampleA's kept fraction per block in the last backward (one host read)."""
        return self.read_step().kept_fraction

    def read_step(self) -> StepReading:
        """Read the last backward's statistics back from the device at once (one host read per step).

        Raises if gradient reached a linear outside the rows its block kept by a path the engine
        could not see (it was dropped: see ``BlockRows``); name the linear and how to avoid it."""
        if self._kept is None:
            return StepReading([1.0] * self.num_blocks)
        leaks = self._leaks if self._leaks is not None else self._kept.new_zeros(0)
        drawn = self._drawn if self._drawn is not None else self._kept.new_zeros(0)
        values = torch.cat([self._kept.float(), leaks.float().to(self._kept.device),
                            drawn.to(self._kept.device)]).tolist()
        b, n_leaks = self.num_blocks, leaks.numel()
        kept, leaked = values[:b], values[b : b + n_leaks]
        self._note_draws(values[b + n_leaks :])
        bad = [slot.name for slot, flag in zip(self.linears, leaked) if flag]
        if bad:
            self._leaks.zero_()
            raise RuntimeError(
                f"VCAS: gradient reached {', '.join(bad[:3])} outside the rows its block kept, by a path "
                "that bypasses the block's outputs (e.g. a hook inside the block feeding the loss); that "
                "gradient was dropped. Return the tensor from the block, or set engine.current[...]"
                ".other_paths / wrap a smaller block_type")
        return StepReading(kept)

    def _note_draws(self, drawn: list[float]) -> None:
        for slot, count in zip(self.linears, drawn):
            if slot.offered:
                slot.drawn_fraction, slot.drawn_nu, slot.offered = count / slot.offered, slot.nu, 0
                slot.drawn = int(count)

    # -- SampleA -------------------------------------------------------------------------------
    def open_block(self, block: int, mixes_rows: bool) -> BlockRows:
        """A new forward call of ``block``; ``mixes_rows`` (BatchNorm in train mode) makes its linears
        read their own rows."""
        self.current[block] = BlockRows(other_paths=mixes_rows)
        return self.current[block]

    def sample_block_gradient(self, block: int, grad: torch.Tensor) -> torch.Tensor:
        """Apply SampleA to the gradient at ``block``'s output (index 0 nearest the input); the rows it
        is then confined to wait in :meth:`take_rows` for the block's linears."""
        grad, rows = self._sample(block, grad)
        self._decided[block] = rows
        return grad

    def take_rows(self, block: int) -> tuple[bool, RowSet | None]:
        """(decided, rows) of ``block``'s last SampleA (``None``: every row); not decided: its linears
        read their own rows."""
        if block not in self._decided:
            return False, None
        return True, self._decided.pop(block)

    def _sample(self, block: int, grad: torch.Tensor) -> tuple[torch.Tensor, RowSet | None]:
        if self.record_norms:
            self.norms[block] = row_norms(grad)
        if self.static_shapes:
            return self._sample_fixed(block, grad)
        if self._resamples(block):
            grad, keep = self._draw_rows(grad, self.rho[block])
            self._kept_tensor(grad)[block] = keep.float().mean()
            return grad, row_set(keep)
        self._pass_kept(block, grad)
        if self.step_rows is not None or not self._sampled_above(block):
            return grad, self.step_rows
        # Below a sampled block the gradient is zero outside the rows kept above (and rows reached by
        # other consumers of the block output): read them off the gradient itself.
        return grad, row_set(grad.reshape(grad.shape[0], -1).any(dim=1))

    def _resamples(self, block: int) -> bool:
        # Nested sets: a block resamples only when it keeps less than the block above it (docs/method.md §3);
        # otherwise the gradient, already zero outside the rows kept above, passes through.
        is_top = block == self.num_blocks - 1
        rho_above = 1.0 if is_top else self.rho[block + 1]
        return self.sample_activations and self.rho[block] < 1 and (is_top or self.rho[block] < rho_above)

    def _sampled_above(self, block: int) -> bool:
        return self.sample_activations and any(r < 1 for r in self.rho[block:])

    def _draw_rows(self, grad: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = grad.shape[0]
        p = soft_topk(row_norms(grad), n * rho)
        keep = bernoulli_keep(p, self.generator_for(grad.device))
        scale = torch.where(keep, 1.0 / p.clamp_min(1e-12), torch.zeros_like(p))
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), keep

    def _sample_fixed(self, block: int, grad: torch.Tensor) -> tuple[torch.Tensor, RowSet | None]:
        """Static shapes: exactly ``m = ceil(N * rho)`` rows, row ``i`` among them with probability
        ``p_i`` (``soft_topk`` at ``m``), weight ``1/p_i``. Every block with ``rho < 1`` draws: where the
        gradient has at most ``m`` non-zero rows, ``p`` is 1 on them and the draw keeps them all."""
        n = grad.shape[0]
        if not self.sample_activations or self.rho[block] >= 1:
            self._pass_kept(block, grad)
            return grad, self.step_rows
        m = min(n, max(1, math.ceil(n * self.rho[block] - 1e-9)))
        p = soft_topk(row_norms(grad), m)
        index, drawn = systematic_sample(p, m, self.generator_for(grad.device))
        weight = torch.where(drawn, 1.0 / p[index].clamp_min(1e-12), 0.0)
        scale = torch.zeros_like(p).index_copy_(0, index, weight)
        self._kept_tensor(grad)[block] = drawn.float().sum() / n
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), fixed_row_set(index, n)

    def _kept_tensor(self, grad: torch.Tensor) -> torch.Tensor:
        if self._kept is None or self._kept.device != grad.device:
            self._kept = torch.ones(self.num_blocks, device=grad.device)
        return self._kept

    def _pass_kept(self, block: int, grad: torch.Tensor) -> None:
        kept = self._kept_tensor(grad)
        if block == self.num_blocks - 1:
            kept[block] = 1.0
        else:
            kept[block] = kept[block + 1]

    # -- rows of a linear ----------------------------------------------------------------------
    def linear_rows(self, slot: LinearSlot, block_rows: BlockRows | None, grad_out: torch.Tensor
                    ) -> RowSet | None:
        """The rows ``slot``'s backward works on: its block's, or (where gradient may enter the block
        by another path) the non-zero rows of its own output gradient."""
        if block_rows is None or not block_rows.decided or block_rows.other_paths:
            if self.static_shapes:
                return None  # nothing may be read back: work on every row (exact, no skipping)
            return self._own_rows(grad_out)
        rows = block_rows.rows
        if rows is not None and rows.mask.shape[0] != grad_out.shape[0]:
            # The block reshapes its batch inside (Swin's windows): the block's rows do not index it.
            return None if self.static_shapes else self._own_rows(grad_out)
        if rows is not None and self.check_leaks:
            self._note_leak(slot, grad_out, rows.mask)
        return rows

    def _own_rows(self, grad_out: torch.Tensor) -> RowSet | None:
        rows = nonzero_rows(grad_out, self.reference)
        return None if rows is None else fixed_row_set(rows, grad_out.shape[0])

    def _note_leak(self, slot: LinearSlot, grad_out: torch.Tensor, mask: torch.Tensor) -> None:
        """Record on the device whether ``grad_out`` is non-zero outside ``mask`` (read once per step)."""
        if self._leaks is None or self._leaks.device != grad_out.device:
            self._leaks = torch.zeros(len(self.linears), dtype=torch.bool, device=grad_out.device)
        outside = grad_out.reshape(grad_out.shape[0], -1).any(dim=1) & ~mask
        self._leaks[slot.index] |= outside.any()

    # -- SampleW -------------------------------------------------------------------------------
    def weight_gradient(self, slot: LinearSlot, grad_rows: torch.Tensor, input_rows: torch.Tensor,
                        input_index: torch.Tensor | None = None) -> torch.Tensor:
        """SampleW over flattened rows: ``grad_rows (R, out)``, ``input_rows (R, in)`` -> ``(out, in)``.
        With ``input_index (R,)``, ``input_rows`` holds the paired rows at those indices."""
        k = slot.nu * grad_rows.shape[0]
        sampled = self.sample_weights and slot.nu < 1
        if sampled and slot.probe_rows is None and not self.record_weight_variance:
            return self._sample_weight(slot, grad_rows, input_rows, max(k, 1.0), input_index)
        # Every other path reads all R input rows: gather them once.
        inputs = input_rows if input_index is None else input_rows.index_select(0, input_index)
        if self.record_weight_variance:
            slot.weight_variance += float(leverage_variance(grad_rows, inputs, k))
        if slot.probe_rows is not None:  # a variance pass reads only these rows: skip the rest of the GEMM
            slot.probe_grad = grad_rows[:, slot.probe_rows].t() @ inputs
            shape = (grad_rows.shape[1], inputs.shape[1])
            return torch.zeros((), dtype=grad_rows.dtype, device=grad_rows.device).expand(shape)
        if not sampled:
            return grad_rows.t() @ inputs
        return self._sample_weight(slot, grad_rows, inputs, max(k, 1.0))

    def _sample_weight(self, slot: LinearSlot, grad_rows: torch.Tensor, inputs: torch.Tensor, k: float,
                       input_index: torch.Tensor | None = None) -> torch.Tensor:
        rows = grad_rows.shape[0]
        if self._drawn is None or self._drawn.device != grad_rows.device:
            self._drawn = torch.zeros(len(self.linears), device=grad_rows.device)
        capacity = self.weight_capacity(slot, k, rows)
        slot.offered, slot.capacity = rows, capacity
        return leverage_sample_matmul(grad_rows, inputs, k, self.generator_for(grad_rows.device), input_index,
                                      capacity=capacity, drawn=self._drawn[slot.index])

    def weight_capacity(self, slot: LinearSlot, k: float, rows: int) -> int:
        """Rows of ``slot``'s SampleW GEMM for ``rows`` offered at an expected ``k``: the last read draw's
        fraction of the offered rows (rescaled to the current ``nu``) plus a margin, at most
        :func:`fixed_capacity` of ``k``. Any capacity is unbiased (overflow is thinned); this one does
        not pay for rows with a zero score, whose share ``k`` cannot see without a host read."""
        capacity = fixed_capacity(k, rows)
        if slot.drawn_fraction is None:
            return capacity
        expected = slot.drawn_fraction * rows * slot.nu / max(slot.drawn_nu, 1e-12)
        margin = CAPACITY_MARGIN * expected + 3 * math.sqrt(expected) + 3
        return min(capacity, math.ceil(expected + margin))

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator SampleA and SampleW draw from for tensors on ``device``: the private CPU one, or
        (on a GPU) a generator on that device seeded once from it, so that draws need no pinned copy.
        Its state travels with :meth:`generator_states`."""
        if device.type == "cpu" or device.type == self.generator.device.type:
            return self.generator
        key = str(device)
        if key not in self.device_generators:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self.device_generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self.device_generators[key]

    def generator_states(self) -> dict[str, torch.Tensor]:
        """The device generators' states (the CPU one is the caller's, saved with it)."""
        return {key: gen.get_state() for key, gen in self.device_generators.items()}

    def load_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        for key, state in states.items():
            self.generator_for(torch.device(key)).set_state(state)


def nonzero_rows(grad: torch.Tensor, reference: bool = False) -> torch.Tensor | None:
    """Indices of the batch rows of ``grad`` that are not all zero; ``None`` when all of them are.
    One host read (``nonzero``)."""
    flat = grad.reshape(grad.shape[0], -1)
    # any() reads the floats directly; ne(0) first would write a full-size boolean temporary.
    rows = (flat.ne(0).any(dim=1) if reference else flat.any(dim=1)).nonzero().squeeze(1)
    return None if rows.numel() == grad.shape[0] else rows


def _input_rows(x: torch.Tensor, rows: RowSet | None, reference: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The flattened input rows that pair with the kept gradient rows: a copy of the kept batch rows
    (straightforward), or all of ``x`` with the token-row indices of the kept ones, so that SampleW
    copies out only the rows it draws instead of a ρ-sized gather first (peak memory)."""
    flat = x.reshape(-1, x.shape[-1])
    if rows is None:
        return flat, None
    if reference:
        return x.index_select(0, rows.rows).reshape(-1, x.shape[-1]), None
    tokens = flat.shape[0] // x.shape[0]  # rows of the flattened input per batch row
    index = rows.rows.unsqueeze(1) * tokens + torch.arange(tokens, device=rows.rows.device)
    return flat, index.flatten()


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size,
                  skipped: torch.Tensor | None = None) -> torch.Tensor:
    """A ``shape`` tensor with ``values`` at batch ``rows`` and zeros elsewhere, each element written once.
    ``skipped``: the other rows (a :class:`RowSet` has them; computed from ``rows`` otherwise)."""
    if skipped is None:
        skipped = fixed_row_set(rows, shape[0]).skipped
    out = values.new_empty(shape).index_fill_(0, skipped, 0)
    return out.index_copy_(0, rows, values)


class SampleActivation(torch.autograd.Function):
    """Identity forward; SampleA on the gradient in backward, which also decides the block's rows."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, engine: RowEngine, block: int, block_rows: BlockRows
                ) -> torch.Tensor:
        ctx.engine, ctx.block, ctx.block_rows = engine, block, block_rows
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = ctx.engine.sample_block_gradient(ctx.block, grad)
        ctx.block_rows.decided, ctx.block_rows.rows = ctx.engine.take_rows(ctx.block)
        return grad, None, None, None


class OtherPath(torch.autograd.Function):
    """Identity on a block's other outputs (a tuple block's second element, ...): gradient arriving
    there enters the block without passing SampleA, so its linears must read their own rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, block_rows: BlockRows) -> torch.Tensor:
        ctx.block_rows = block_rows
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.block_rows.other_paths = True
        return grad, None


class SampledLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` whose backward skips zero gradient rows (and samples W's rows)."""

    @staticmethod
    def forward(ctx, x, weight, bias, engine: RowEngine, slot: LinearSlot):
        # A custom Function is not autocast by itself: cast as autocast would for F.linear, and hand the
        # gradients back in the inputs' own dtypes (fp32 master weights). The engine's norms and
        # variances are taken in float32 either way (sampling.py).
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.engine, ctx.slot, ctx.has_bias = engine, slot, bias is not None
        ctx.block_rows = engine.current[slot.block]
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        reference = ctx.engine.reference
        rows = ctx.engine.linear_rows(ctx.slot, ctx.block_rows, grad_out)
        # Skipped rows have an exactly zero gradient: slicing them away changes no number, only work.
        g = grad_out if rows is None else grad_out.index_select(0, rows.rows)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if rows is not None and reference:
                grad_x = grad_out.new_zeros(x.shape).index_copy_(0, rows.rows, grad_x)
            elif rows is not None:
                grad_x = _scatter_rows(grad_x, rows.rows, x.shape, rows.skipped)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = ctx.engine.weight_gradient(ctx.slot, g2, *_input_rows(x, rows, reference))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
        grad_w = None if grad_w is None else _weight_grad_in(grad_w, w_dtype, ctx.slot)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


def _weight_grad_in(grad_w: torch.Tensor, dtype: torch.dtype, slot: LinearSlot) -> torch.Tensor:
    """``grad_w`` in the weight's dtype. A row-probe pass's zero view stays a view: ``.to()`` would
    materialise a full-size zero gradient under autocast (bf16 -> fp32)."""
    if slot.probe_grad is not None and grad_w.dtype != dtype:
        return torch.zeros((), dtype=dtype, device=grad_w.device).expand(grad_w.shape)
    return grad_w.to(dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes linears in on ``device_type``, or ``None`` when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
