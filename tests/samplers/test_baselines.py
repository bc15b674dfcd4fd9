"""SB and UB: UB's gradient is unbiased (and is not without its reweighting); SB keeps about
1/(beta+1) of a loss stream and prefers the high losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from integration_helpers import tiny_bert
from test_vcas_unbiased import DRAWS, Draws, _report, _stats

from vcas_bench.samplers import create_sampler
from vcas_bench.samplers import ub as ub_module
from vcas_bench.samplers.sb import selection_probabilities

N = 16


def _tiny_bert():
    """A 3-layer, 32-wide BERT in float64, dropout 0, sharp head, with a fixed batch (some rows padded)."""
    model = tiny_bert(layers=3).double()
    # A sharper head spreads the bounds (0.16 to 1.22 here), so UB's probabilities are far from
    # uniform and a missing reweighting shows, while every example is still drawn often enough in
    # 400 steps for a z-score (checked in test_ub_setup_is_informative).
    model.classifier.weight.data.mul_(100)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 100, (N, 8), generator=g),
             "attention_mask": torch.ones(N, 8, dtype=torch.long),
             "labels": torch.randint(0, 3, (N,), generator=g)}
    batch["attention_mask"][::3, 5:] = 0

    def loss_fn(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits, b["labels"], reduction="none"), logits

    return model, batch, loss_fn


def _ub_draws(n: int) -> Draws:
    model, batch, loss_fn = _tiny_bert()
    params = [p for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    loss_fn(batch)[0].mean().backward()
    exact = [p.grad.detach().flatten().clone() for p in params]
    sampler = create_sampler("ub", seed=0)
    sampler.attach(model, "BertLayer", total_steps=n)
    rows = []
    for _ in range(n):
        model.zero_grad(set_to_none=False)
        sampler.step(batch, loss_fn)
        rows.append(torch.cat([p.grad.detach().flatten() for p in params]))
    sampler.detach()
    draws = list(torch.stack(rows).split([e.numel() for e in exact], dim=1))
    return Draws(names, exact, draws, torch.zeros(n, 1), set())


def test_ub_setup_is_informative():
    """The UB tests mean something only if p is far from uniform (variance reduction >= 1.2) and the
    least likely example is still expected in >= 20 of the 400 x b draws."""
    model, batch, loss_fn = _tiny_bert()
    p = create_sampler("ub").probabilities(loss_fn(batch)[1], batch["labels"])
    draws_per_step = round(N / 3)
    assert ub_module.variance_reduction(p) >= 1.2
    assert float(p.min()) * draws_per_step * DRAWS >= 20


def test_ub_gradient_is_unbiased():
    """n = 400 UB draws (ratio 1/3, with replacement, weights 1/(b N p)) on a tiny float64 BERT: per
    parameter tensor, mean z^2 of (mean - exact) / s.e. stays under the chi-square bound of
    test_vcas_unbiased (one-sided p ~ 1e-6 per tensor, effective dof from the draws' correlation)."""
    stats = _stats(_ub_draws(DRAWS))
    assert sum(s.entries for s in stats) > 1000
    assert not [s for s in stats if s.biased], _report([s for s in stats if s.biased])


def test_ub_without_reweighting_is_flagged(monkeypatch):
    """Negative control: weights count/b (no 1/(N p)) make UB biased toward high-bound examples."""
    def unweighted(p, draws, generator):
        idx = torch.multinomial(p, draws, replacement=True, generator=generator)
        return torch.bincount(idx, minlength=len(p)).float() / draws

    monkeypatch.setattr(ub_module, "importance_weights", unweighted)
    stats = [s for s in _stats(_ub_draws(200)) if s.entries > 0]
    flagged = [s for s in stats if s.biased]
    assert len(flagged) >= 0.5 * len(stats), _report(stats)


def test_ub_weights_are_inverse_probabilities():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    w = ub_module.importance_weights(p, 4000, torch.Generator().manual_seed(0))
    assert w[3] == 0
    # E[w_i] = 1/N for every example with p_i > 0: the weighted loss is unbiased for the mean loss.
    assert torch.allclose(w[:3], torch.full((3,), 0.25), atol=0.02)


def test_ub_tau_threshold_switches_to_uniform():
    sampler = create_sampler("ub", tau_th=2.0)
    flat = torch.zeros(8, 3)  # equal bounds: variance reduction 1 <= 2 -> uniform
    uniform = sampler.probabilities(flat, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(uniform, torch.full((8,), 1 / 8))
    peaked = torch.tensor([[20.0, -20.0, 0.0]]).repeat(8, 1)  # confidently right: bound ~ 0 ...
    peaked[0] = torch.tensor([-20.0, 20.0, 0.0])  # ... but one badly wrong: reduction ~ 8 > 2
    p = sampler.probabilities(peaked, torch.zeros(8, dtype=torch.long))
    assert p[0] > 0.3 and math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_sb_keeps_one_over_beta_plus_one(beta):
    """200 batches of 32 i.i.d. exponential losses (seed 0) after 32 warm-up batches fill the history:
    the kept fraction is within 0.025 of 1/(beta+1) (binomial s.d. <= 0.0063 over 6,400 draws, so
    ~4 s.d.), and the top loss decile is kept >= 0.6 of the time while the bottom decile <= 0.1."""
    sampler = create_sampler("sb", beta=beta, seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(32):
        sampler.select(torch.empty(32).exponential_(generator=g))
    losses, kept = [], []
    for _ in range(200):
        batch = torch.empty(32).exponential_(generator=g)
        losses.append(batch)
        kept.append(sampler.select(batch))
    losses, kept = torch.cat(losses), torch.cat(kept)
    assert abs(kept.float().mean() - 1 / (beta + 1)) < 0.025
    top, bottom = losses >= losses.quantile(0.9), losses <= losses.quantile(0.1)
    assert kept[top].float().mean() >= 0.6 and kept[bottom].float().mean() <= 0.1
    assert losses[kept].mean() > losses[~kept].mean()


def test_sb_fixed_ratio_keeps_exactly_ceil_n_r():
    sampler = create_sampler("sb", fixed_ratio=1 / 3, seed=0)
    for _ in range(5):
        assert int(sampler.select(torch.rand(32)).sum()) == math.ceil(32 / 3)


def test_sb_probabilities_follow_the_loss_percentile():
    history = torch.arange(1.0, 11.0)  # losses 1..10
    p = selection_probabilities(torch.tensor([0.0, 5.0, 10.0]), history, beta=2.0)
    assert torch.allclose(p, torch.tensor([0.0, 0.25, 1.0]))
