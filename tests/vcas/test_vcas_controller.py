"""The VCAS controller: variance phase, s / rho / nu updates, state, isolation (docs/method.md §5–§7, §13).

A tiny random-init HF BERT (3 blocks, 6 linears each, batch 8 x 8 tokens) stands in for a real model.
Expected values are computed independently where possible: block-output gradient norms and linear
inputs / output gradients are captured with plain hooks on an *unwrapped* copy with the same weights.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from integration_helpers import tiny_bert
from torch import nn

from vcas_bench.vcas import VcasConfig, VcasController, find_top_sum, leverage_variance, monotone_envelope
from vcas_bench.vcas.variance import VarianceEstimator
from vcas_bench.vcas.wrap import SampledLinear

N, T = 8, 8
BLOCK = "BertLayer"


pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids, labels = torch.randint(0, 100, (N, T), generator=g), torch.randint(0, 3, (N,), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _loss_fn(model: nn.Module):
    return lambda batch: model(**batch).loss


def _controller(model: nn.Module | None = None, **config) -> VcasController:
    model = model if model is not None else tiny_bert(layers=3)
    return VcasController(model, BLOCK, VcasConfig(**config))


def _trace(ctrl: VcasController) -> list[tuple]:
    return [(h.s, tuple(h.rho), tuple(h.nu), h.V_s, h.V_act, h.V_w) for h in ctrl.history]


# -- independent measurements on an unwrapped copy ---------------------------------------------------
def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == BLOCK]


def _exact_block_norms(model: nn.Module, batch) -> list[torch.Tensor]:
    """Per-row norms of the exact gradient at each block output (bottom-up), from plain hooks."""
    grads: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(module, args, out):
            hidden = out if isinstance(out, torch.Tensor) else out[0]
            hidden.register_hook(lambda g: grads.__setitem__(index, g.detach()))

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(_blocks(model))]
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [grads[i].reshape(N, -1).norm(dim=1) for i in range(len(grads))]


def _expected_rho(reference: nn.Module, batches, s: float) -> list[float]:
    """Eq. 4 at ``s``: mean over the batches of p_l(s) per block, then the monotone envelope."""
    per_batch = [[find_top_sum(n, s) for n in _exact_block_norms(reference, b)] for b in batches]
    mean = torch.tensor(per_batch, dtype=torch.float64).mean(0).tolist()
    return monotone_envelope(mean)


def _linear_io(model: nn.Module, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For every nn.Linear inside a block: (flattened output grad, flattened input, weight grad)."""
    saved: dict[str, list] = {}
    handles = []
    block_ids = {id(m) for b in _blocks(model) for m in b.modules()}
    for name, m in model.named_modules():
        if type(m) is nn.Linear and id(m) in block_ids:

            def fn(module, args, out, name=name):
                saved[name] = [args[0].detach().reshape(-1, args[0].shape[-1]), None, module.weight]
                out.register_hook(lambda g: saved[name].__setitem__(1, g.detach().reshape(-1, g.shape[-1])))

            handles.append(m.register_forward_hook(fn))
    try:
        loss = model(**batch).loss
        names = list(saved)
        wgrads = torch.autograd.grad(loss, [saved[k][2] for k in names])
    finally:
        for h in handles:
            h.remove()
    return {k: (saved[k][1], saved[k][0], g) for k, g in zip(names, wgrads)}


# -- s and rho -----------------------------------------------------------------------------------------
def test_s_falls_when_tau_act_is_huge_and_rho_is_eq4_at_the_new_s():
    """tau_act = 1e6: V_act < tau_act * V_s, so s <- s - alpha = 0.8 (alpha = 0.2). With rho_ema = 0 the new
    rho must be the envelope of p(0.8) averaged over the phase's batches (not p(1.0), the other candidate)."""
    ctrl = _controller(tau_act=1e6, alpha=0.2, rho_ema=0.0)
    batches = _batches(2)
    stats = ctrl.adapt(_loss_fn(ctrl.wrapped.model), batches, step=0)
    assert stats.V_s > 0
    assert ctrl.s == pytest.approx(0.8)
    expected = _expected_rho(tiny_bert(layers=3), batches, 0.8)
    bites = _expected_rho(tiny_bert(layers=3), batches, 1.0)
    assert expected != bites, "candidates must differ for the test to bite"
    torch.testing.assert_close(torch.tensor(ctrl.rho), torch.tensor(expected, dtype=torch.float32))


def test_s_rises_when_tau_act_is_zero_and_rho_is_eq4_at_the_new_s():
    """tau_act = 0 with rho < 1: V_act > 0 = tau_act * V_s, so s <- 0.5 + 0.2 = 0.7 and rho = envelope(p(0.7))
    (the authors' code would apply p(0.3), docs/method.md §13)."""
    ctrl = _controller(tau_act=0.0, alpha=0.2, rho_ema=0.0)
    ctrl.s = 0.5
    ctrl.engine.rho = [0.5, 0.5, 0.5]
    batches = _batches(2, seed=1)
    stats = ctrl.adapt(_loss_fn(ctrl.wrapped.model), batches, step=0)
    assert stats.V_act > 0
    assert ctrl.s == pytest.approx(0.7)
    expected = _expected_rho(tiny_bert(layers=3), batches, 0.7)
    assert expected != _expected_rho(tiny_bert(layers=3), batches, 0.3)
    torch.testing.assert_close(torch.tensor(ctrl.rho), torch.tensor(expected, dtype=torch.float32))


def test_s_stays_at_one_when_there_is_no_extra_variance():
    """rho = 1 means V_act = 0 exactly; with tau_act = 0, sign(0) = +1 and s is clamped at 1."""
    ctrl = _controller(tau_act=0.0, alpha=0.2, rho_ema=0.0)
    stats = ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2), step=0)
    assert stats.V_act == 0.0
    assert ctrl.s == 1.0
    assert ctrl.rho == [1.0, 1.0, 1.0]


def test_rho_is_monotone_and_in_unit_interval_over_phases():
    """Five phases with s falling (tau_act = 1e6, alpha = 0.15) and the default rho EMA (0.6): after each
    phase rho is non-decreasing bottom-up and in (0, 1]; s ends at 1 - 5 * 0.15 and rho has left 1."""
    ctrl = _controller(tau_act=1e6, alpha=0.15)
    loss_fn = _loss_fn(ctrl.wrapped.model)
    for phase in range(5):
        ctrl.adapt(loss_fn, _batches(2, seed=10 + phase), step=phase)
        rho = ctrl.rho
        assert all(0 < r <= 1 for r in rho), rho
        assert all(a <= b for a, b in zip(rho, rho[1:])), rho
    assert ctrl.s == pytest.approx(0.25)
    assert ctrl.rho[0] < 1.0


# -- nu --------------------------------------------------------------------------------------------------
def test_nu_falls_by_beta_when_tau_w_is_huge():
    ctrl = _controller(tau_w=1e6, beta=0.9)
    for slot in ctrl.engine.linears:
        slot.nu = 0.5
    ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2), step=0)
    assert ctrl.nu == pytest.approx([0.45] * 18)


def test_nu_rises_when_tau_w_is_zero_and_is_clamped_to_one():
    """tau_w = 0: nu_l <- min(1, nu_l / beta) wherever V_w,l > 0, else nu_l * beta (strict >, method §13).
    Only the [CLS] row of the top block reaches the classifier, so the top block's query and
    post-attention linears have N = 8 non-zero gradient rows <= k = nu * N * T: SampleW keeps them all and
    V_w = 0 exactly there; every other linear has V_w > 0."""
    ctrl = _controller(tau_w=0.0, beta=0.9)
    start = [0.5 if i % 2 else 0.95 for i in range(18)]
    for slot, nu in zip(ctrl.engine.linears, start):
        slot.nu = nu
    stats = ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2), step=0)
    positive = [v > 0 for v in stats.V_w_layer]
    top_cls_only = {f"bert.encoder.layer.2.{k}" for k in ("attention.self.query", "attention.output.dense")}
    top_cls_only |= {f"bert.encoder.layer.2.{k}" for k in ("intermediate.dense", "output.dense")}
    assert {slot.name for slot, pos in zip(ctrl.engine.linears, positive) if not pos} == top_cls_only
    expected = [min(1.0, nu / 0.9) if pos else nu * 0.9 for nu, pos in zip(start, positive)]
    assert ctrl.nu == pytest.approx(expected)
    assert max(ctrl.nu) == 1.0 and all(0 < nu <= 1 for nu in ctrl.nu)


def test_nu_decision_is_per_linear():
    """tau_w between the smallest and largest positive V_w,l / V_s,l ratio of a first phase: in the next
    phase each nu_l moves by the rule applied to that phase's own recorded V_w,l and V_s,l."""
    ctrl = _controller(tau_w=0.0)
    loss_fn = _loss_fn(ctrl.wrapped.model)
    for slot in ctrl.engine.linears:
        slot.nu = 0.5
    first = ctrl.adapt(loss_fn, _batches(2), step=0)
    ratios = sorted(w / s for w, s in zip(first.V_w_layer, first.V_s_layer) if w > 0)
    ctrl.config.tau_w = ratios[len(ratios) // 2]
    before = ctrl.nu
    stats = ctrl.adapt(loss_fn, _batches(2, seed=3), step=1)
    rises = [w > ctrl.config.tau_w * s for w, s in zip(stats.V_w_layer, stats.V_s_layer)]
    assert 0 < sum(rises) < len(rises), "tau_w should split the linears"
    expected = [min(1.0, nu / 0.95) if up else nu * 0.95 for nu, up in zip(before, rises)]
    assert ctrl.nu == pytest.approx(expected)


# -- the estimators against a direct computation ---------------------------------------------------
def test_variance_estimates_match_direct_computation():
    """rho = 1, nu = 0.5, every weight entry (param_sample_ratio = 1), M = 2, on an unwrapped copy:
    V_s,l = ||g_1 - g_2||^2 / 2 (unbiased sample variance of two exact weight gradients),
    V_act = 0 (no SampleA), V_w,l = mean over the batches of Eq. 3 on the linear's rows at k = nu * rows."""
    ctrl = _controller(param_sample_ratio=1.0)
    for slot in ctrl.engine.linears:
        slot.nu = 0.5
    batches = _batches(2, seed=4)
    stats = ctrl.adapt(_loss_fn(ctrl.wrapped.model), batches, step=0)

    reference = tiny_bert(layers=3)
    io1, io2 = (_linear_io(reference, b) for b in batches)
    names = [slot.name for slot in ctrl.engine.linears]
    assert names == list(io1)
    v_s = [float((io1[k][2] - io2[k][2]).square().sum() / 2) for k in names]
    v_w = [
        float(sum(leverage_variance(io[k][0], io[k][1], 0.5 * io[k][0].shape[0]) for io in (io1, io2)) / 2)
        for k in names
    ]
    assert stats.V_act == 0.0
    torch.testing.assert_close(torch.tensor(stats.V_s_layer), torch.tensor(v_s), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(torch.tensor(stats.V_w_layer), torch.tensor(v_w), rtol=1e-4, atol=1e-12)
    assert stats.V_s == pytest.approx(sum(v_s), rel=1e-4)


def test_sampled_repeats_are_independent_and_share_dropout_masks(monkeypatch):
    """With dropout 0.1: at rho = 1 the SampleA-only passes must reproduce the exact pass bit for bit
    (same dropout masks, so V_act = 0); at rho < 1 the M = 2 repeats of one batch must differ
    (independent draws, not the authors' re-seeded identical ones, docs/method.md §13)."""
    ctrl = _controller(tiny_bert(layers=3, dropout=0.1), param_sample_ratio=1.0)
    loss_fn = _loss_fn(ctrl.wrapped.model)
    stats = ctrl.adapt(loss_fn, _batches(2), step=0)
    assert stats.V_s > 0
    assert stats.V_act == 0.0

    passes: list[tuple[bool, list[torch.Tensor]]] = []
    original = VarianceEstimator._pass

    def spy(self, loss, weights, entries, exact, **kwargs):
        out = original(self, loss, weights, entries, exact, **kwargs)
        passes.append((exact, out))
        return out

    monkeypatch.setattr(VarianceEstimator, "_pass", spy)
    ctrl.engine.rho = [0.5, 0.5, 0.5]
    ctrl.adapt(loss_fn, _batches(2, seed=5), step=1)
    assert [e for e, _ in passes] == [True, False, False] * 2
    for b in range(2):
        first, second = passes[3 * b + 1][1], passes[3 * b + 2][1]
        assert any(not torch.equal(x, y) for x, y in zip(first, second))


# -- determinism, isolation, state ------------------------------------------------------------------
def _run(ctrl: VcasController, phases: int, first_phase: int = 0) -> list[torch.Tensor]:
    """``phases`` intervals of: variance phase, then two sampled SGD steps; returns the last step's grads."""
    model = ctrl.wrapped.model
    loss_fn = _loss_fn(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads: list[torch.Tensor] = []
    for phase in range(first_phase, first_phase + phases):
        ctrl.adapt(loss_fn, _batches(2, seed=100 + phase), step=phase)
        for batch in _batches(2, seed=200 + phase):
            opt.zero_grad()
            loss_fn(batch).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            ctrl.count_step()
    return grads


CONFIG = {"tau_act": 0.05, "tau_w": 0.05, "alpha": 0.1, "beta": 0.9, "param_sample_ratio": 0.1}


def test_two_fresh_runs_give_identical_traces():
    """Same init, seed and batches: three phases with sampled training steps in between give identical
    s / rho / nu / variance traces, gradients and weights; another controller seed does not."""
    a, b = _controller(**CONFIG), _controller(**CONFIG)
    ga, gb = _run(a, 3), _run(b, 3)
    assert _trace(a) == _trace(b)
    assert len({h.s for h in a.history}) > 1 or a.rho != [1.0] * 3, "the controller never moved"
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)
    for x, y in zip(a.wrapped.model.parameters(), b.wrapped.model.parameters()):
        assert torch.equal(x, y)
    c = _controller(**CONFIG, seed=1)
    _run(c, 3)
    assert _trace(c) != _trace(a)


def test_two_wrapped_models_are_independent():
    """Two BERTs and a timm ViT wrapped in one process: each sampler lists its own linears (18, 18, 12)
    with the right names and blocks; adapting one changes nothing in the others."""
    from test_vcas_unbiased import _timm_vit

    a, b = _controller(tau_act=1e6, tau_w=1e6, alpha=0.2), _controller()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit = _timm_vit().model  # the same tiny timm ViT as the unbiasedness tests
    c = VcasController(vit, "Block", VcasConfig())
    suffixes = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    bert_names = [f"bert.encoder.layer.{i}.{s}" for i in range(3) for s in suffixes]
    for ctrl in (a, b):
        assert [slot.name for slot in ctrl.engine.linears] == bert_names
        assert [slot.block for slot in ctrl.engine.linears] == [i for i in range(3) for _ in suffixes]
        assert sum(isinstance(m, SampledLinear) for m in ctrl.wrapped.model.modules()) == 18
    assert [slot.name for slot in c.engine.linears] == [
        f"blocks.{i}.{s}" for i in range(3) for s in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    ]
    assert a.engine is not b.engine and a.generator is not b.generator
    assert not set(map(id, a.engine.linears)) & set(map(id, b.engine.linears))

    for ctrl in (a, b, c):  # one RowEngine per wrapped model, shared by its hooks and its linears
        assert all(m._vcas_engine is ctrl.engine for m in ctrl.wrapped.linear_modules)

    b_state, c_state = copy.deepcopy(b.state_dict()), copy.deepcopy(c.state_dict())
    loss_a = _loss_fn(a.wrapped.model)
    a.adapt(loss_a, _batches(2), step=0)
    assert a.s < 1 and a.nu != [1.0] * 18 and a.rho != [1.0] * 3
    a_state = a.generator.get_state()
    loss_a(_batches(1, seed=7)[0]).backward()  # a sampled training step of model A (SampleA + SampleW)
    assert not torch.equal(a.generator.get_state(), a_state), "A's sampled backward drew nothing"
    for before, ctrl in ((b_state, b), (c_state, c)):
        after = ctrl.state_dict()
        assert after["s"] == before["s"] and after["rho"] == before["rho"] and after["nu"] == before["nu"]
        assert torch.equal(after["generator"], before["generator"])
        assert all(slot.weight_variance == 0.0 for slot in ctrl.engine.linears)
        assert all(x is None for x in ctrl.engine.norms)
        assert ctrl.engine.kept_fraction == [1.0] * 3


def test_state_dict_round_trip_continues_identically():
    """Run two intervals, checkpoint model + controller (through torch.save / torch.load), then run two
    more; a fresh wrapped copy restored from the checkpoint must continue with identical traces,
    gradients and weights."""
    a = _controller(**CONFIG)
    _run(a, 2)
    buffer = io.BytesIO()
    torch.save({"model": a.wrapped.model.state_dict(), "vcas": a.state_dict()}, buffer)
    grads_a = _run(a, 2, first_phase=2)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = tiny_bert(layers=3)
    model.load_state_dict(checkpoint["model"])
    b = _controller(model, **CONFIG)
    b.load_state_dict(checkpoint["vcas"])
    assert (b.s, b.rho, b.nu, b.steps, b.phases) == (
        checkpoint["vcas"]["s"],
        checkpoint["vcas"]["rho"],
        checkpoint["vcas"]["nu"],
        4,
        2,
    )
    grads_b = _run(b, 2, first_phase=2)
    assert _trace(b) == _trace(a)
    assert b.analytic_flops_ratio() == pytest.approx(a.analytic_flops_ratio())
    for x, y in zip(grads_a, grads_b):
        assert torch.equal(x, y)
    for x, y in zip(a.wrapped.model.parameters(), b.wrapped.model.parameters()):
        assert torch.equal(x, y)


def test_variance_phase_leaves_grads_and_global_rng_alone():
    """Accumulated .grad (and .grad = None) survive a phase untouched; the global RNG is neither reseeded nor
    consumed (a dropout-free model: every draw of the phase comes from the controller's generator)."""
    ctrl = _controller(**CONFIG)
    model = ctrl.wrapped.model
    loss_fn = _loss_fn(model)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(9)
    for p in params[1:]:
        p.grad = torch.randn(p.shape, generator=g)
    params[0].grad = None
    saved = [None if p.grad is None else p.grad.clone() for p in params]

    draws = []
    for phase, seed in enumerate((123, 456)):
        torch.manual_seed(seed)
        expected = torch.rand(4, generator=torch.Generator().manual_seed(seed))
        ctrl.adapt(loss_fn, _batches(2, seed=phase), step=phase)
        draws.append(torch.rand(4))
        torch.testing.assert_close(draws[-1], expected, rtol=0, atol=0)
    assert not torch.equal(draws[0], draws[1])
    assert params[0].grad is None
    for p, s in zip(params[1:], saved[1:]):
        assert torch.equal(p.grad, s)


def test_unwrap_restores_plain_linears():
    ctrl = _controller()
    keys = list(ctrl.wrapped.model.state_dict())
    model = ctrl.unwrap()
    assert not any(isinstance(m, SampledLinear) for m in model.modules())
    assert list(model.state_dict()) == keys


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"beta": 1.5}, ["beta"]),
        ({"beta": 0.0}, ["beta"]),
        ({"alpha": 0.0}, ["alpha"]),
        ({"M": 1}, ["M"]),
        ({"F": 0}, ["F"]),
        ({"tau_act": -0.1}, ["tau_act"]),
        ({"tau_w": -1.0}, ["tau_w"]),
        ({"rho_ema": 1.0}, ["rho_ema"]),
        ({"param_sample_ratio": 0.0}, ["param_sample_ratio"]),
        ({"beta": 1.5, "M": 1, "alpha": 2.0}, ["beta", "M", "alpha"]),  # every problem at once
    ],
)
def test_invalid_config_raises_naming_each_field(kwargs, names):
    with pytest.raises(ValueError, match=names[0]) as err:
        VcasConfig(**kwargs)
    for name in names:
        assert f"{name}=" in str(err.value)


def test_adapt_requires_exactly_m_batches():
    ctrl = _controller()
    with pytest.raises(ValueError, match="M=2"):
        ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(3), step=0)
