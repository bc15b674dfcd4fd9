"""The fast sampled backward (issue #9) against the straightforward one it replaced: same seed, same
masks, the same numbers bit for bit; and SampleW's in-place scaling against the plain formula."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import tiny_bert
from test_vcas_controller import BLOCK, _batches, _loss_fn

from vcas_bench.vcas import leverage_sample_matmul, soft_topk, wrap
from vcas_bench.vcas.sampling import bernoulli_keep, leverage_scores


def _sampled_grads(reference: bool, rho: float, nu: float) -> list[torch.Tensor]:
    model = tiny_bert(layers=3, dropout=0.1)
    wrapped = wrap(model, BLOCK, torch.Generator().manual_seed(11))
    wrapped.engine.reference = reference
    wrapped.engine.rho = [rho] * wrapped.engine.num_blocks
    for slot in wrapped.engine.linears:
        slot.nu = nu
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same dropout masks for both versions
        grads = [torch.autograd.grad(_loss_fn(model)(b), list(model.parameters())) for b in _batches(3)]
    return [g for step in grads for g in step]


@pytest.mark.parametrize(("rho", "nu"), [(0.5, 0.5), (0.3, 1.0), (1.0, 0.4)])
def test_fast_backward_is_bitwise_the_reference(rho, nu):
    fast, reference = _sampled_grads(False, rho, nu), _sampled_grads(True, rho, nu)
    assert len(fast) == len(reference)
    for a, b in zip(fast, reference):
        assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in fast)


def test_sampled_matmul_scales_in_place_like_the_formula():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 6, generator=gen), torch.randn(50, 4, generator=gen)
    got = leverage_sample_matmul(a, b, 20.0, torch.Generator().manual_seed(5))
    q = soft_topk(leverage_scores(a, b), 20.0)
    idx = bernoulli_keep(q, torch.Generator().manual_seed(5)).nonzero().squeeze(1)
    expected = (a[idx] / q[idx].unsqueeze(1)).t() @ b[idx]
    torch.testing.assert_close(got, expected)
