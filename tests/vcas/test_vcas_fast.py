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


def test_sampled_weight_gemms_are_sized_from_the_last_draw_not_from_padding():
    """Padded text (3/4 of the tokens are padding, whose gradient rows are exactly zero): sized from
    ``nu`` alone, SampleW's GEMM would hold ``nu`` of all token rows, padding included. After the step's
    read, the next GEMM holds the last draw plus its margin (10% + 3 sd + 3), never fewer than it needs
    on average, and a checkpoint carries those sizes (resume is bit-exact)."""
    from vcas_bench.vcas import VcasConfig, VcasController
    from vcas_bench.vcas.autograd import CAPACITY_MARGIN
    from vcas_bench.vcas.sampling import fixed_capacity

    model = tiny_bert(layers=2)
    controller = VcasController(model, "BertLayer", VcasConfig(F=10))
    for slot in controller.engine.linears:
        slot.nu = 0.5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (16, 32), generator=g)
    mask = torch.zeros(16, 32, dtype=torch.long)
    mask[:, :8] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (16,), generator=g)}
    sizes = []
    for _ in range(3):
        model(**batch).loss.backward()
        controller.count_step()
        sizes.append([(slot.capacity, slot.drawn, slot.offered) for slot in controller.engine.linears])
    for (cap0, _, _), (_, drawn1, _), (cap, drawn, _) in zip(*sizes):
        assert cap0 == fixed_capacity(0.5 * 16 * 32, 16 * 32)  # nothing read yet: sized from nu
        assert drawn <= 8 * 16  # only the real tokens carry gradient
        assert cap < 0.6 * cap0
        assert cap >= drawn1 * (1 + CAPACITY_MARGIN)  # the margin over the previous draw
    state = controller.state_dict()
    twin = VcasController(tiny_bert(layers=2), "BertLayer", VcasConfig(F=10))
    twin.load_state_dict(state)
    assert [s.drawn_fraction for s in twin.engine.linears] == [
        s.drawn_fraction for s in controller.engine.linears]
