"""Truth tables and Monte Carlo checks for the pure VCAS sampling functions (docs/method.md §3–§5).

Every random test uses a fixed ``torch.Generator`` seed; statistical tests state their sample size and
bound in the docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

from vcas_bench.vcas.sampling import (
    bernoulli_keep,
    find_top_sum,
    leverage_sample_matmul,
    leverage_variance,
    monotone_envelope,
    soft_topk,
)

SCORE_SEEDS = [0, 1, 2, 3]
SIZES = [5, 16, 37, 128]


def _scores(seed: int, n: int) -> torch.Tensor:
    """Heavy-tailed positive scores (log-normal, sigma 1.5), so that the largest ones get capped."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(1.5 * torch.randn(n, generator=g))


def _budgets(n: int) -> list[float]:
    return sorted({1.0, 0.5, n / 4, n / 3 + 0.37, n / 2, n - 1.5, n - 1.0, n - 0.25})


# -- soft_topk -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scores", "k", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], 1.0, [0.4, 0.3, 0.2, 0.1]),  # proportional, nothing capped
        ([4.0, 3.0, 2.0, 1.0], 2.0, [0.8, 0.6, 0.4, 0.2]),
        ([4.0, 3.0, 2.0, 1.0], 3.0, [1.0, 1.0, 2 / 3, 1 / 3]),  # 4 capped, then 3*2/6 = 1 exactly
        ([10.0, 1.0, 1.0, 1.0], 2.0, [1.0, 1 / 3, 1 / 3, 1 / 3]),  # one capped, rest share k - 1
        ([10.0, 1.0, 1.0, 1.0], 1.5, [1.0, 1 / 6, 1 / 6, 1 / 6]),  # fractional k
        ([1.0, 2.0, 10.0, 1.0], 2.0, [0.25, 0.5, 1.0, 0.25]),  # order does not matter
        ([3.0, 0.0, 1.0, 0.0], 1.0, [0.75, 0.0, 0.25, 0.0]),  # zero scores get p = 0
        ([3.0, 0.0, 1.0, 0.0], 2.0, [1.0, 0.0, 1.0, 0.0]),  # k >= #nonzero keeps the nonzero ones
        ([3.0, 0.0, 1.0, 0.0], 3.0, [1.0, 0.0, 1.0, 0.0]),
        ([3.0, 2.0, 1.0], 3.0, [1.0, 1.0, 1.0]),  # k == n keeps all
        ([3.0, 2.0, 1.0], 7.5, [1.0, 1.0, 1.0]),  # k > n keeps all
        ([0.0, 0.0, 0.0], 3.0, [1.0, 1.0, 1.0]),  # k >= n keeps all, even zero scores
        ([3.0, 2.0, 1.0], 0.0, [0.0, 0.0, 0.0]),  # k = 0 keeps nothing
        ([2.0, 2.0, 2.0, 2.0], 1.0, [0.25, 0.25, 0.25, 0.25]),  # ties
    ],
)
def test_soft_topk_truth_table(scores, k, expected):
    p = soft_topk(torch.tensor(scores), k)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SCORE_SEEDS)
@pytest.mark.parametrize("n", SIZES)
def test_soft_topk_invariants(seed, n):
    """For integer and fractional k: sum p = k, p in [0, 1], p / x constant over the uncapped items,
    and the items at p = 1 are exactly the largest scores."""
    x = _scores(seed, n)
    capped_somewhere = False
    for k in _budgets(n):
        p = soft_topk(x, k)
        assert p.shape == x.shape
        assert bool(((p >= 0) & (p <= 1)).all()), k
        assert math.isclose(float(p.sum()), k, rel_tol=1e-5, abs_tol=1e-5), (k, float(p.sum()))
        capped, free = p >= 1.0, p < 1.0
        assert bool((p[capped] == 1.0).all())
        if free.any():
            ratio = p[free] / x[free]
            torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-5, atol=0.0)
        if capped.any() and free.any():
            capped_somewhere = True
            assert float(x[capped].min()) >= float(x[free].max())
            # the proportional rule would have given the capped items more than 1
            assert float(x[capped].min() * ratio.mean()) >= 1.0 - 1e-5
    assert capped_somewhere or n <= 5, "scores too flat: the cap was never exercised"


@pytest.mark.parametrize("seed", SCORE_SEEDS)
def test_soft_topk_zero_scores_and_extremes(seed):
    x = _scores(seed, 40)
    x[::3] = 0.0  # 14 zero scores, 26 positive
    for k in (0.7, 5.0, 12.5, 25.0):
        p = soft_topk(x, k)
        assert bool((p[x == 0] == 0).all())
        assert math.isclose(float(p.sum()), k, rel_tol=1e-5)
    # fewer positive scores than k: every positive one is kept, zeros are not
    torch.testing.assert_close(soft_topk(x, 30.0), (x > 0).float())
    torch.testing.assert_close(soft_topk(x, 40.0), torch.ones(40))
    torch.testing.assert_close(soft_topk(x, 41.3), torch.ones(40))
    torch.testing.assert_close(soft_topk(x, 0.0), torch.zeros(40))
    # half-precision scores give the same float32 probabilities
    torch.testing.assert_close(soft_topk(x.half(), 12.5), soft_topk(x.half().float(), 12.5))


def test_bernoulli_keep_frequencies():
    """20,000 draws of 8 probabilities: each keep frequency is within 5 standard errors of p
    (sd = sqrt(p(1-p)/20000) <= 0.0036), and the generator makes the draws reproducible."""
    p = torch.tensor([0.0, 0.01, 0.1, 0.3, 0.5, 0.77, 0.99, 1.0])
    n = 20_000
    g = torch.Generator().manual_seed(7)
    freq = torch.stack([bernoulli_keep(p, g) for _ in range(n)]).float().mean(0)
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * se + 1e-12).all()), (freq, p)
    a = bernoulli_keep(p.expand(100, 8), torch.Generator().manual_seed(3))
    b = bernoulli_keep(p.expand(100, 8), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# -- find_top_sum / monotone_envelope ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("norms", "s", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], 0.5, 0.5),  # 4 < 5, 4 + 3 >= 5 -> 2 rows
        ([4.0, 3.0, 2.0, 1.0], 1.0, 1.0),
        ([4.0, 3.0, 2.0, 1.0], 0.0, 0.25),  # at least one row
        ([4.0, 3.0, 2.0, 1.0], 0.35, 0.25),
        ([4.0, 3.0, 2.0, 1.0], 0.65, 0.5),
        ([4.0, 3.0, 2.0, 1.0], 0.85, 0.75),
        ([4.0, 3.0, 2.0, 1.0], 0.95, 1.0),
        ([1.0, 4.0, 2.0, 3.0], 0.65, 0.5),  # input order does not matter
        ([10.0, 0.0, 0.0, 0.0, 0.0], 0.99, 0.2),  # all norm in one row
        ([1.0] * 10, 0.55, 0.6),
        ([1.0] * 10, 0.45, 0.5),
        ([0.0, 0.0, 0.0], 0.5, 1.0),  # no gradient at all: keep everything
        ([], 0.5, 1.0),
    ],
)
def test_find_top_sum_truth_table(norms, s, expected):
    assert find_top_sum(torch.tensor(norms), s) == pytest.approx(expected)


def test_find_top_sum_is_monotone_in_s():
    x = _scores(11, 64)
    values = [find_top_sum(x, s) for s in torch.linspace(0, 1, 101).tolist()]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] == 1 / 64 and values[-1] == 1.0


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        ([0.2, 0.5, 0.3, 0.9, 0.1], [0.2, 0.5, 0.5, 0.9, 0.9]),
        ([0.9, 0.5, 0.1], [0.9, 0.9, 0.9]),
        ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]),
        ([0.4, 0.4], [0.4, 0.4]),
        ([0.7], [0.7]),
        ([], []),
    ],
)
def test_monotone_envelope_truth_table(p, expected):
    assert monotone_envelope(p) == pytest.approx(expected)


# -- leverage sampling ---------------------------------------------------------------------------------
def _leverage_problem(seed: int = 0, rows: int = 40, m: int = 6, n: int = 5):
    """A (R, m), B (R, n) with row scales spread over two orders of magnitude and two zero rows in A."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, m, generator=g, dtype=torch.float64) * torch.exp(torch.randn(rows, 1, generator=g))
    b = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.exp(torch.randn(rows, 1, generator=g))
    a[[3, 17]] = 0.0
    return a, b


def _wilson_hilferty_upper(dof: float, z: float) -> float:
    """Upper quantile of chi-square(dof) at standard-normal quantile z (Wilson–Hilferty)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def test_leverage_sample_matmul_unbiased_and_variance_matches_eq3():
    """4,000 draws (seed 0) of the SampleW estimate of A^T B, A (40x6), B (40x5), k = 10.

    - Total variance: the mean of d_t = ||X_t - mean X||_F^2 * n/(n-1) must match the analytic Eq. 3
      value within 5 standard errors of that mean (SE from the spread of d_t; about 0.6% here).
      Dropping the ``-1`` of ``1/q - 1`` would move it by > 10 SE, so the check has power.
    - Mean, entrywise: every |z| = |mean - A^T B| / (sd/sqrt(n)) < 4.5 (30 entries, Bonferroni
      false-alarm < 3e-4), and Hotelling's T^2 = n (mean - A^T B)^T S^-1 (mean - A^T B) over the 30
      entries is below the chi-square(30) quantile at z = 4.75 (p ~ 1e-6).
    """
    a, b = _leverage_problem()
    k, n = 10.0, 4000
    exact = a.t() @ b
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([leverage_sample_matmul(a, b, k, g) for _ in range(n)]).reshape(n, -1)
    assert draws.dtype == torch.float64
    mean = draws.mean(0)

    v_analytic = float(leverage_variance(a, b, k))
    d = (draws - mean).square().sum(1) * n / (n - 1)
    v_emp, v_se = float(d.mean()), float(d.std() / math.sqrt(n))
    assert abs(v_emp - v_analytic) < 5 * v_se, (v_emp, v_analytic, v_se)
    no_minus_one = float((a.norm(dim=1) * b.norm(dim=1)).square().sum())  # the "-1" term
    assert no_minus_one > 10 * v_se, "the variance check would not notice a missing -1 term"

    sd = draws.std(0)
    z = (mean - exact.flatten()) / (sd / math.sqrt(n))
    assert float(z.abs().max()) < 4.5, z
    cov = torch.cov(draws.t())
    diff = mean - exact.flatten()
    t2 = float(n * diff @ torch.linalg.solve(cov, diff))
    assert t2 < _wilson_hilferty_upper(30, 4.75), t2


def test_leverage_sample_matmul_zero_rows_are_never_drawn():
    """Rows with a zero leverage score get q = 0: the estimate never divides by zero."""
    a, b = _leverage_problem(seed=1)
    b[5] = 0.0
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        assert bool(torch.isfinite(leverage_sample_matmul(a, b, 3.0, g)).all())


@pytest.mark.parametrize("k", [40.0, 40.5, 1000.0])
def test_leverage_sample_matmul_exact_when_k_covers_all_rows(k):
    a, b = _leverage_problem()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(leverage_sample_matmul(a, b, k, g), a.t() @ b)
    assert torch.equal(g.get_state(), state), "the exact path must not consume random numbers"
    assert float(leverage_variance(a, b, k)) == 0.0


def test_leverage_variance_hand_computed():
    """Two rows: scores |a_i||b_i| = 3*1 and 1*1; k = 1 -> q = (0.75, 0.25).
    V = (1/0.75 - 1) * 9 + (1/0.25 - 1) * 1 = 3 + 3 = 6."""
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0], [1.0]])
    assert float(leverage_variance(a, b, 1.0)) == pytest.approx(6.0)
    assert float(leverage_variance(a, b, 2.0)) == 0.0


def test_scatter_rows_writes_values_and_zeros():
    from vcas_bench.vcas.autograd import _scatter_rows

    values = torch.randn(3, 4, 5)
    rows = torch.tensor([0, 2, 5])
    expected = torch.zeros(6, 4, 5).index_copy_(0, rows, values)
    out = torch.full((6, 4, 5), float("nan")).new_empty(6, 4, 5)
    assert torch.equal(_scatter_rows(values, rows, out.shape), expected)
