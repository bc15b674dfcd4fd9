"""Pure tensor functions behind VCAS (docs/method.md §3–§5).

- :func:`soft_topk`: water-filling keep probabilities, ``p_i = min(1, c * x_i)`` with ``sum(p) = k``.
- :func:`bernoulli_keep`: one Poisson-sampling draw from those probabilities.
- :func:`find_top_sum`: the fraction of rows that holds a fraction ``s`` of the total norm (Eq. 4).
- :func:`monotone_envelope`: ``rho_l = max_{j <= l} p_j`` from the input side up.
- :func:`leverage_variance`: the analytic variance of leverage-score row sampling (Eq. 3).
- :func:`leverage_sample_matmul`: ``A^T B`` estimated from sampled rows (SampleW's weight gradient).

All of them work on float32 copies of their inputs whatever the training dtype, because norms,
prefix sums and squared norms overflow or lose precision in fp16/bf16.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "soft_topk",
    "bernoulli_keep",
    "systematic_sample",
    "uniforms",
    "row_norms",
    "find_top_sum",
    "monotone_envelope",
    "leverage_scores",
    "leverage_variance",
    "leverage_sample_matmul",
]


def soft_topk(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Water-filling keep probabilities proportional to ``scores``, capped at 1.

    Finds the smallest number ``c`` of capped items such that the remaining budget ``k - c``,
    spread in proportion to the uncapped scores, gives none of them a probability above 1.

    Args:
        scores: ``(n,)`` non-negative scores.
        k: expected number of kept items (need not be an integer).

    Returns:
        ``(n,)`` float32 probabilities. ``sum(p) == min(k, #nonzero)``; zero scores get ``p = 0``
        (a zero row contributes nothing, so never keeping it stays unbiased); ``k >= n`` keeps all.
    """
    x = scores.detach().float().clamp_min(0)
    n = x.numel()
    if k >= n:
        return torch.ones_like(x)
    if k <= 0:
        return torch.zeros_like(x)
    nonzero = x > 0
    x_desc, order = torch.sort(x, descending=True)
    # tail[c] = sum of the scores after the c largest ones.
    tail = x_desc.flip(0).cumsum(0).flip(0)
    capped = torch.arange(n, device=x.device, dtype=x.dtype)
    # With c items capped, the largest uncapped one gets x_(c) * (k - c) / tail[c]; it must be <= 1.
    fits = (x_desc * (k - capped) <= tail * (1 + 1e-6)) & (capped <= k)
    # Everything below stays on the device (no int(c), no branch on a count): no host sync.
    c = torch.argmax(fits.int()).view(1)
    # index_select, not tail[c]: indexing with a 0-dim tensor may read it back as a Python int.
    scale = (k - c.to(torch.float64)) / tail.index_select(0, c).to(torch.float64).clamp_min(1e-30)
    p_desc = torch.where(capped < c, 1.0, (x_desc * scale.to(x.dtype)).clamp(max=1.0))
    p = torch.empty_like(x).scatter_(0, order, p_desc)
    # Fewer non-zero scores than k: keep every one of them.
    return torch.where(nonzero.sum() <= k, nonzero.to(x.dtype), p)


def bernoulli_keep(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent Bernoulli(p_i) draws (Poisson sampling) using ``generator``; returns a bool mask.

    The uniforms are drawn on the generator's device (the CPU for the samplers' private generators)
    and then moved, so one generator and its checkpointed state serve a model on any device.
    """
    return uniforms(p.shape, generator, p.device) < p


def uniforms(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """``U[0, 1)`` float32 draws from ``generator`` on ``device``. A CPU generator's draws reach a GPU
    through pinned memory without blocking: a plain host-to-device copy would wait for the device."""
    source = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=source, dtype=torch.float32)
    return to_device(u, device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to a GPU as an asynchronous copy out of pinned memory."""
    if t.device == torch.device(device):
        return t
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def systematic_sample(p: torch.Tensor, size: int, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``size`` distinct indices, item ``i`` among them with probability ``p_i``, no host sync.

    Systematic sampling in a random order: lay the ``p_i`` end to end in a random permutation and take
    the items under the points ``u, u + 1, ..., u + size - 1`` (one uniform ``u``). An item with
    ``p_i <= 1`` covers at most one point, so items are distinct and each is taken with probability
    exactly ``p_i`` (the Horvitz–Thompson weight ``1/p_i`` is then unbiased). When ``sum(p) < size``
    (fewer non-zero scores than ``size``) the points past the end take items with ``p_i = 0``: they
    fill the fixed size and carry weight 0.

    Returns:
        ``(index (size,), taken (size,) bool)``: sorted indices, and which of them were drawn (the
        others are fillers with ``p = 0``).
    """
    n = p.numel()
    device = p.device
    perm = to_device(torch.randperm(n, generator=generator, device=generator.device if generator else "cpu"),
                     device)
    u = uniforms((1,), generator, device).double()
    ends = p.double()[perm].cumsum(0)
    # sum(p) is a whole number (soft_topk's k, or the count of non-zero scores) up to float32 rounding:
    # snap it, so that the last point cannot fall past the end by a rounding error.
    total = ends[-1:]
    snap = torch.where((total - total.round()).abs() < 1e-4, total.round() / total.clamp_min(1e-30), 1.0)
    ends = ends * snap
    points = u + torch.arange(size, device=device, dtype=torch.float64)
    # The item whose interval [end - p, end) holds each point; a point past the total takes nothing.
    slot = torch.searchsorted(ends, points, right=True)
    hit = slot < n
    hits = torch.zeros(n, dtype=torch.int32, device=device)
    hits.index_put_((perm[slot.clamp(max=n - 1)],), hit.to(torch.int32), accumulate=True)
    drawn = hits > 0
    # Fixed size: the drawn items first, then items that were not drawn, each index once.
    index = torch.argsort((~drawn).to(torch.int8), stable=True)[:size].sort().values
    return index, drawn[index]


def fixed_capacity(k: float, rows: int) -> int:
    """Rows a fixed-size SampleW GEMM holds for an expected ``k`` Bernoulli draws: ``k`` plus three
    standard deviations (``sd <= sqrt(k)``) and 3, so that thinning (below) is rare; at most ``rows``."""
    return min(rows, math.ceil(k + 3 * math.sqrt(k) + 3))


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norm over every dimension but the first, in float32. ``(N, ...) -> (N,)``."""
    return x.detach().float().reshape(x.shape[0], -1).norm(dim=1)


def find_top_sum(norms: torch.Tensor, s: float) -> float:
    """Smallest fraction ``n/N`` of rows whose largest norms sum to at least ``s`` of the total (Eq. 4).

    Follows the authors' ``find_top_sum``: ``(#(cumsum < s * total) + 1) / N``, capped at 1.
    """
    x = norms.detach().float().flatten()
    n = x.numel()
    total = x.sum()
    if n == 0 or total <= 0:
        return 1.0
    cumsum = torch.sort(x, descending=True).values.cumsum(0)
    count = int((cumsum < s * total).sum()) + 1
    return min(count / n, 1.0)


def monotone_envelope(p_bottom_up: list[float]) -> list[float]:
    """``rho_l = max_{j <= l} p_j`` with index 0 the block nearest the input (Eq. 4)."""
    out, running = [], 0.0
    for p in p_bottom_up:
        running = max(running, p)
        out.append(running)
    return out


def leverage_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i|| * ||b_i||`` for the rows of ``a (R, m)`` and ``b (R, n)``, in float32."""
    return a.detach().float().norm(dim=1) * b.detach().float().norm(dim=1)


def leverage_variance(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Variance of the row-sampled estimate of ``a^T b`` at an expected ``k`` rows (Eq. 3).

    ``sum_i (1/q_i - 1) * ||a_i||^2 * ||b_i||^2`` with ``q = soft_topk(||a_i|| ||b_i||, k)``.
    Rows with ``q_i = 0`` have a zero score, so they contribute nothing.
    """
    scores = leverage_scores(a, b)
    q = soft_topk(scores, k)
    terms = (1.0 / q.clamp_min(1e-30) - 1.0) * scores.square()
    return torch.where(q > 0, terms, 0.0).sum()


def leverage_sample_matmul(
    a: torch.Tensor, b: torch.Tensor, k: float, generator: torch.Generator | None = None,
    b_rows: torch.Tensor | None = None, capacity: int | None = None, drawn: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased estimate of ``a^T b`` from about ``k`` rows drawn by leverage score, with no host sync.

    Rows are kept by independent Bernoulli(``q_i``) draws (``q = soft_topk(||a_i|| ||b_i||, k)``) and
    the GEMM runs on a fixed number ``C = fixed_capacity(k, R)`` of rows, so no count is read back:
    the kept rows padded with rows of weight 0. If more than ``C`` rows are kept (past three standard
    deviations, rare), a uniformly random ``C`` of them are used with their weights times
    ``kept / C``: given the kept set, that is an unbiased estimate of its sum, so the whole stays
    unbiased.

    Args:
        a: ``(R, m)``, the output gradient rows.
        b: ``(R, n)``, the input rows; with ``b_rows``, ``(R', n)`` holding them at those indices.
        k: expected number of rows kept; ``k >= R`` computes the exact product.
        generator: the sampler's private generator.
        b_rows: ``(R,)`` indices of ``b``'s rows that pair with ``a``'s, so that only the drawn rows
            are ever copied out of ``b`` (not all ``R`` of them first).
        capacity: rows of the GEMM (default :func:`fixed_capacity` of ``k``). Any value keeps the
            estimate unbiased (thinning above); a capacity sized from the previous step's draw does not
            pay for rows whose score is zero (padding tokens), which ``k`` counts.
        drawn: a 0-dim tensor that receives the number of rows drawn (on the device: no host read).

    Returns:
        ``(m, n)`` estimate, ``sum over kept rows of a_i^T b_i / q_i``.
    """
    if k >= a.shape[0]:
        if drawn is not None:
            drawn.fill_(a.shape[0])
        return a.t() @ (b if b_rows is None else b.index_select(0, b_rows))
    b_norms = row_norms(b) if b_rows is None else row_norms(b)[b_rows]
    q = soft_topk(row_norms(a) * b_norms, k)
    u = uniforms(q.shape, generator, q.device)  # the draws of bernoulli_keep(q, generator)
    cap = fixed_capacity(k, a.shape[0]) if capacity is None else max(1, min(capacity, a.shape[0]))
    idx, scale = _kept_rows_fixed(u, q, cap, drawn)
    # One copy of each side, scaled in place.
    scaled = a.index_select(0, idx).mul_(scale.to(a.dtype).unsqueeze(1))
    return scaled.t() @ b.index_select(0, idx if b_rows is None else b_rows[idx])


def _kept_rows_fixed(u: torch.Tensor, q: torch.Tensor, capacity: int, drawn: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows kept where ``u < q``: ``capacity`` sorted row indices holding them (a uniform random subset
    of them if there are more), and each one's weight: ``1/q`` times ``max(1, kept / capacity)``, 0
    for fillers. Given that row ``i`` is kept, ``u_i / q_i`` is uniform on [0, 1) and independent of
    the rest: the smallest ``capacity`` of them pick the subset without drawing anything more."""
    keep = u < q
    priority = torch.where(keep, u / q.clamp_min(1e-30), 2.0)
    idx = torch.topk(priority, capacity, largest=False, sorted=False).indices.sort().values
    count = keep.sum()
    if drawn is not None:
        drawn.copy_(count)
    thinning = (count / capacity).clamp_min(1.0)
    weight = torch.where(keep[idx], thinning / q[idx].clamp_min(1e-30), 0.0)
    return idx, weight
