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

import torch

__all__ = [
    "soft_topk",
    "bernoulli_keep",
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
    if int(nonzero.sum()) <= k:
        return nonzero.float()
    x_desc, order = torch.sort(x, descending=True)
    # tail[c] = sum of the scores after the c largest ones.
    tail = x_desc.flip(0).cumsum(0).flip(0)
    capped = torch.arange(n, device=x.device, dtype=x.dtype)
    # With c items capped, the largest uncapped one gets x_(c) * (k - c) / tail[c]; it must be <= 1.
    fits = (x_desc * (k - capped) <= tail * (1 + 1e-6)) & (capped <= k)
    c = int(torch.argmax(fits.int()))
    p_desc = torch.empty_like(x_desc)
    p_desc[:c] = 1.0
    p_desc[c:] = (x_desc[c:] * ((k - c) / tail[c])).clamp(max=1.0)
    return torch.empty_like(x).scatter_(0, order, p_desc)


def bernoulli_keep(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent Bernoulli(p_i) draws (Poisson sampling) using ``generator``; returns a bool mask.

    The uniforms are drawn on the generator's device (the CPU for the samplers' private generators)
    and then moved, so one generator and its checkpointed state serve a model on any device.
    """
    device = generator.device if generator is not None else p.device
    u = torch.rand(p.shape, generator=generator, device=device, dtype=torch.float32)
    return u.to(p.device) < p


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
    kept = q > 0
    return ((1.0 / q[kept] - 1.0) * scores[kept].square()).sum()


def leverage_sample_matmul(
    a: torch.Tensor, b: torch.Tensor, k: float, generator: torch.Generator | None = None,
    b_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased estimate of ``a^T b`` from about ``k`` rows drawn by leverage score.

    Args:
        a: ``(R, m)``, the output gradient rows.
        b: ``(R, n)``, the input rows; with ``b_rows``, ``(R', n)`` holding them at those indices.
        k: expected number of rows kept; ``k >= R`` computes the exact product.
        generator: the sampler's private generator.
        b_rows: ``(R,)`` indices of ``b``'s rows that pair with ``a``'s, so that only the drawn rows
            are ever copied out of ``b`` (not all ``R`` of them first).

    Returns:
        ``(m, n)`` estimate, ``sum over kept rows of a_i^T b_i / q_i``.
    """
    if k >= a.shape[0]:
        return a.t() @ (b if b_rows is None else b.index_select(0, b_rows))
    b_norms = row_norms(b) if b_rows is None else row_norms(b)[b_rows]
    q = soft_topk(row_norms(a) * b_norms, k)
    idx = bernoulli_keep(q, generator).nonzero().squeeze(1)
    scale = (1.0 / q[idx]).to(a.dtype).unsqueeze(1)
    # One copy of each side, scaled in place.
    return a.index_select(0, idx).mul_(scale).t() @ b.index_select(0, idx if b_rows is None else b_rows[idx])
