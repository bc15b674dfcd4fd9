"""Host syncs of the sampled backward (issue #17): the counter itself, the budget per block for each
sampler and mode, and the sync-free pieces (fixed-size SampleW, systematic SampleA) kept unbiased.

Budget, counted with ``SyncCounter`` over one backward of a tiny HF BERT at rho = nu = 0.5 with 1, 2
and 4 layers (so that the per-layer slope is pinned, not only a total):

- vcas, default (Bernoulli) mode: at most one host read per block;
- vcas, ``static_shapes``: none at all;
- sb and ub: none in the backward (their kept rows come from the CPU), and a whole ``step()`` costs
  the same number of reads whatever the depth (the per-step reads: the loss, the selection).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from integration_helpers import tiny_bert
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vcas_bench.measure.syncs import SyncCounter
from vcas_bench.samplers import create_sampler
from vcas_bench.vcas import leverage_sample_matmul, soft_topk, wrap
from vcas_bench.vcas import sampling as sampling_module
from vcas_bench.vcas.sampling import leverage_scores, systematic_sample

N, T = 16, 8
LAYERS = (1, 2, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (N, T), generator=g),
            "labels": torch.randint(0, 3, (N,), generator=g)}


def _per_example_loss(model: nn.Module):
    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"]).logits
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none"), logits

    return loss_fn


# -- the counter ----------------------------------------------------------------------------------
def test_counter_sees_reads_and_not_compute():
    x = torch.randn(8, 4)
    with SyncCounter() as syncs:
        _ = x @ x.t()
        _ = (x * 2).sum(0)
    assert syncs.total == 0
    with SyncCounter() as syncs:
        x.sum().item()
        float(x.max())
        bool(x.sum() > 0)
    assert syncs.counts["item"] == 3
    with SyncCounter() as syncs:
        _ = x[x > 0]
        _ = (x > 0).nonzero()
    assert syncs.counts["nonzero"] == 2 and syncs.total == 2


def test_sampling_functions_read_nothing_back():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(64, generator=g)
    a, b = torch.randn(64, 6, generator=g), torch.randn(64, 5, generator=g)
    with SyncCounter() as syncs:
        soft_topk(scores, 10.0)
        soft_topk(scores, 70.0)
        soft_topk(torch.zeros(64), 10.0)
        leverage_sample_matmul(a, b, 10.0, g)
        systematic_sample(soft_topk(scores, 12), 12, g)
    assert syncs.total == 0, syncs.counts


# -- the budget -----------------------------------------------------------------------------------
def _vcas_backward_syncs(layers: int, static: bool) -> int:
    model = tiny_bert(layers=layers)
    wrapped = wrap(model, "BertLayer", torch.Generator().manual_seed(0))
    wrapped.engine.static_shapes = static
    wrapped.engine.rho = [0.5] * layers
    for slot in wrapped.engine.linears:
        slot.nu = 0.5
    loss = _per_example_loss(model)(_batch())[0].mean()
    with SyncCounter() as syncs:
        loss.backward()
    assert all(p.grad is not None for p in wrapped.linear_weights)
    kept = wrapped.engine.kept_fraction
    assert 0 < kept[-1] < 1, kept  # SampleA really dropped rows
    return syncs.total


@pytest.mark.parametrize("static", [False, True], ids=["bernoulli", "static"])
def test_vcas_backward_reads_at_most_once_per_block(static):
    counts = {layers: _vcas_backward_syncs(layers, static) for layers in LAYERS}
    budget = 0 if static else 1
    for layers, count in counts.items():
        assert count <= budget * layers, counts
    # The slope: each added block costs at most the budget.
    assert counts[4] - counts[2] <= 2 * budget and counts[2] - counts[1] <= budget, counts


def _row_sampler_syncs(name: str, layers: int) -> tuple[int, int]:
    """(syncs in the backward alone, syncs in a whole ``step()``) for SB or UB."""
    model = tiny_bert(layers=layers)
    sampler = create_sampler(name, seed=0)
    sampler.attach(model, "BertLayer", total_steps=10)
    loss_fn = _per_example_loss(model)
    inner = sampler.rows.backward
    counted = {}

    def counted_backward(losses, weights):
        with SyncCounter() as syncs:
            ratio = inner(losses, weights)
        counted["backward"] = syncs.total
        return ratio

    sampler.step(_batch(1), loss_fn)  # SB keeps everything until it has a loss history
    sampler.rows.backward = counted_backward
    with SyncCounter() as step_syncs:
        stats = sampler.step(_batch(), loss_fn)
    assert 0 < stats.keep_ratio < 1
    sampler.detach()
    return counted["backward"], step_syncs.total


@pytest.mark.parametrize("name", ["sb", "ub"])
def test_sb_and_ub_backward_reads_nothing_and_step_cost_is_flat(name):
    counts = {layers: _row_sampler_syncs(name, layers) for layers in LAYERS}
    assert all(backward == 0 for backward, _ in counts.values()), counts
    steps = [step for _, step in counts.values()]
    assert len(set(steps)) == 1 and steps[0] <= 4, counts  # per-step reads only, whatever the depth


# -- unbiasedness of the sync-free pieces ---------------------------------------------------------
def test_systematic_sample_has_fixed_size_and_inclusion_probabilities_p():
    """20,000 draws (seed 0) of 6 out of 20 items: exactly 6 distinct indices each time, and every
    item's frequency within 4.5 binomial standard errors of its p (Bonferroni over 20 items)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20, generator=g) ** 2
    scores[3] = 0.0
    p = soft_topk(scores, 6)
    n = 20_000
    hits = torch.zeros(20)
    for _ in range(n):
        index, drawn = systematic_sample(p, 6, g)
        assert index.numel() == 6 and index.unique().numel() == 6 and bool(drawn.all())
        hits[index] += 1
    freq = hits / n
    se = (p * (1 - p) / n).sqrt().clamp_min(1e-9)
    assert float(((freq - p).abs() / se).max()) < 4.5, (freq, p)
    assert hits[3] == 0


def test_systematic_sample_pads_with_weightless_items_when_few_are_nonzero():
    p = soft_topk(torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0]), 4)  # two non-zero scores: p = 1 on both
    index, drawn = systematic_sample(p, 4, torch.Generator().manual_seed(1))
    assert index.unique().numel() == 4
    assert set(index[drawn].tolist()) == {1, 3} and int(drawn.sum()) == 2


def test_thinned_sampled_matmul_stays_unbiased(monkeypatch):
    """SampleW's fixed-size GEMM with a capacity of k rows (instead of k + 3 sd + 3), so that about
    half of the draws keep more rows than it holds and are thinned: 4,000 draws (seed 0) of A^T B,
    A (40x6), B (40x5), k = 10; every entry's |z| < 4.5 (30 entries)."""
    monkeypatch.setattr(sampling_module, "fixed_capacity", lambda k, rows: math.ceil(k))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g,
                                                                             dtype=torch.float64)
    q = soft_topk(leverage_scores(a, b), 10.0)
    assert float((q * (1 - q)).sum()) > 2  # a count sd of over 1.4 rows: the capacity overflows often
    n = 4000
    draws = torch.stack([leverage_sample_matmul(a, b, 10.0, g) for _ in range(n)]).reshape(n, -1)
    z = (draws.mean(0) - (a.t() @ b).flatten()) / (draws.std(0) / math.sqrt(n))
    assert float(z.abs().max()) < 4.5, z


# -- gradient the engine cannot see is reported, not dropped silently ------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts calls per operator name (``aten.any.dim`` -> ``any``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def test_gradient_entering_a_block_through_an_inner_hook_is_reported():
    """A loss term on an intermediate activation inside a block (captured by a hook on the block's
    MLP linear) reaches the rows SampleA dropped: the step's read raises and names the block's linears."""
    model = tiny_bert(layers=2)
    captured = []
    inner = model.bert.encoder.layer[0].intermediate.dense
    inner.register_forward_hook(lambda module, args, out: captured.append(out))
    wrapped = wrap(model, "BertLayer", torch.Generator().manual_seed(0))
    wrapped.engine.rho = [0.3, 0.3]
    wrapped.engine.check_leaks = True  # the debug switch (the variance phase turns it on by itself)
    loss = _per_example_loss(model)(_batch())[0].mean() + captured[0].square().mean()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.0\."):
        wrapped.engine.read_step()


def test_the_variance_phase_checks_for_leaks_and_training_steps_do_not():
    """Off the hot path: a training step's backward runs no per-linear leak check (no ``any``), and the
    variance phase's sampled passes do, so the next step's read reports the inner hook's gradient."""
    from vcas_bench.vcas import VcasConfig, VcasController

    model = tiny_bert(layers=2)
    captured = []
    inner = model.bert.encoder.layer[0].intermediate.dense
    inner.register_forward_hook(lambda module, args, out: captured.append(out))
    controller = VcasController(model, "BertLayer", VcasConfig(F=1, M=2))
    controller.engine.rho = [0.3, 0.3]
    batch = _batch()

    def loss_fn(b):
        captured.clear()
        return _per_example_loss(model)(b)[0].mean() + captured[0].square().mean()

    with _OpCounter() as hot:
        loss_fn(batch).backward()
    controller.count_step()  # the hot path never looked: nothing to report
    controller.engine.check_leaks = True
    with _OpCounter() as checked:
        loss_fn(batch).backward()
    controller.engine.check_leaks = False
    # Two reductions per linear of the sampled blocks (12 linears) when checking; none otherwise.
    assert checked.counts["any"] - hot.counts["any"] == 2 * 12
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.0\."):
        controller.count_step()  # the debug switch reports it (and clears the flags)
    controller.adapt(loss_fn, [batch, batch], 0)
    loss_fn(batch).backward()
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.0\."):
        controller.count_step()
