"""Measured FLOPs (FlopCounterMode through FlopMeter) against hand counts, exact and sampled, and the
analytic model of docs/method.md §1.11."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vcas_bench.measure.flops import FlopMeter
from vcas_bench.vcas import interval_cost_ratio, keep_ratio_cost, step_cost_ratio, wrap
from vcas_bench.vcas.sampling import fixed_capacity

N, T, D_IN, D, H, C = 8, 5, 4, 8, 16, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """embed (N,T,4)->(N,T,8); two residual MLP blocks (no token mixing); head on token 0."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(D_IN, D), nn.Linear(D, C)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h[:, 0])


def matmul_flops(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def block_flops(rows: int) -> int:
    """One block's two linears on ``rows`` token rows (forward; backward input or weight grad alike)."""
    return matmul_flops(rows, D, H) + matmul_flops(rows, H, D)


def measure_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    meter = FlopMeter(every=1)
    loss_fn = meter.wrap_loss_fn(lambda batch: F.cross_entropy(model(batch[0]), batch[1]))
    with meter.unit("step", probe=True):
        loss_fn((x, y)).backward()
    return meter.totals()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    return Net(), torch.randn(N, T, D_IN), torch.randint(0, C, (N,))


def test_exact_step_matches_the_hand_count(setup):
    model, x, y = setup
    forward = matmul_flops(N * T, D_IN, D) + 2 * block_flops(N * T) + matmul_flops(N, D, C)
    # Backward: 2x forward, except the embedding, whose input needs no gradient (weight grad only).
    backward = matmul_flops(N * T, D_IN, D) + 2 * 2 * block_flops(N * T) + 2 * matmul_flops(N, D, C)
    flops = measure_step(model, x, y)
    assert (flops["flops_forward"], flops["flops_backward"]) == (forward, backward)
    wrapped = wrap(model, Block)  # wrapped at rho = nu = 1: the very same work
    assert measure_step(model, x, y) == flops
    assert wrapped.engine.rho == [1.0, 1.0]


def test_sample_a_step_counts_fewer_backward_flops_by_the_kept_rows(setup):
    """rho = 0.5 at both blocks (the bottom one passes the top's rows through), nu = 1: the blocks'
    backward runs on the k kept data rows (x T tokens), everything else as in the exact step."""
    model, x, y = setup
    wrapped = wrap(model, Block, torch.Generator().manual_seed(0))
    wrapped.engine.rho = [0.5, 0.5]
    kept = []
    for _ in range(40):
        flops = measure_step(model, x, y)
        k = round(wrapped.engine.kept_fraction[-1] * N)
        kept.append(k)
        expected = matmul_flops(N * T, D_IN, D) + 2 * 2 * block_flops(k * T) + 2 * matmul_flops(N, D, C)
        assert flops["flops_backward"] == expected
    # E[k] = N rho = 4; 40 draws of a sum of Bernoullis (var <= 2 each): 3 s.e. <= 0.7.
    assert abs(sum(kept) / len(kept) - N * 0.5) < 0.7


def test_sample_w_skips_the_token_rows_it_does_not_draw(setup):
    """The head reads token 0 only and the blocks do not mix tokens, so 1 of T token rows per example has
    a non-zero gradient. At nu = 1/T the leverage sampler's budget is exactly those rows (q = 1 on them,
    0 elsewhere): each weight gradient runs on the fixed-size GEMM that holds them (N rows plus
    SampleW's padding, ``fixed_capacity``; docs/method.md §15) instead of N T. The input gradients do
    not change."""
    model, x, y = setup
    wrapped = wrap(model, Block, torch.Generator().manual_seed(0))
    for slot in wrapped.engine.linears:
        slot.nu = 1 / T
    flops = measure_step(model, x, y)
    input_grads, weight_grads = block_flops(N * T), block_flops(fixed_capacity(N, N * T))
    assert fixed_capacity(N, N * T) < N * T
    expected = matmul_flops(N * T, D_IN, D) + 2 * (input_grads + weight_grads) + 2 * matmul_flops(N, D, C)
    assert flops["flops_backward"] == expected


def test_analytic_cost_model():
    assert step_cost_ratio([1.0, 1.0], [[1.0, 1.0], [1.0, 1.0]]) == 1.0
    assert step_cost_ratio([0.5, 0.5], [[0.5], [0.5]]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert keep_ratio_cost(1 / 3) == pytest.approx(1 - 0.4444, abs=1e-4)  # SB/UB: 44.44% saved
    # First interval (exact, rho = nu = 1): 1 + (M + M^2)/F, as the authors' code counts it.
    assert interval_cost_ratio([1.0], [[1.0]], M=2, F=100) == pytest.approx(1 + 6 / 100)


def test_meter_extrapolates_probes_and_reports_unprobed_kinds_as_unknown():
    meter = FlopMeter(every=10)
    assert [i for i in range(30) if meter.is_probe("step", i)] == [5, 15, 25]
    assert [i for i in range(6) if meter.is_probe("phase", i)] == [1, 3, 5]
    for i in range(3):
        with meter.unit("step", probe=meter.is_probe("step", i)):
            pass
    assert meter.totals()["flops_total"] is None  # 3 steps, none counted: unknown, not zero
    assert FlopMeter(every=0).is_probe("step", 5) is False
