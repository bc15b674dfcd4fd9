"""The options beyond the paper (``vcas-plus``): each keeps what it must — the same estimates, the exact
gradient on the folded step, a controller that moves the right way — and the preset still holds
V_act/V_s near tau end to end."""

from __future__ import annotations

import csv
import statistics

import pytest
import torch
from integration_helpers import tiny_bert
from test_vcas_controller import _batches, _controller, _loss_fn, _trace

from vcas_bench.samplers import create_sampler
from vcas_bench.vcas import phase_cost_ratio


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reusing_the_forward_changes_no_estimate(dropout):
    """The SampleA passes on the exact pass's graph see the same dropout masks the RNG replay gives and
    draw the same masks from the private generator: identical s, rho, nu, V_s, V_act, V_w traces."""
    traces = []
    for reuse in (False, True):
        ctrl = _controller(tiny_bert(layers=3, dropout=dropout), param_sample_ratio=1.0, reuse_forward=reuse,
                           F=1)
        ctrl.engine.rho = [0.5, 0.6, 0.7]
        with torch.random.fork_rng():
            torch.manual_seed(0)  # both variants start from the same dropout stream
            for phase in range(3):
                ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2, seed=phase), step=phase)
        traces.append(_trace(ctrl))
    assert traces[0] == traces[1]
    assert phase_cost_ratio([1.0], 2, reuse_forward=True) == pytest.approx(2 + 4 * 2 / 3)


def test_folded_step_applies_the_exact_gradient_of_the_scheduled_batch():
    model = tiny_bert(layers=3)
    batch = _batches(1, seed=9)[0]
    exact = torch.autograd.grad(_loss_fn(model)(batch), list(model.parameters()))
    sampler = create_sampler("vcas-plus", seed=0, F=3)
    sampler.attach(model, "BertLayer", total_steps=30)
    extra_calls = []

    def next_batch():
        extra_calls.append(1)
        return _batches(1, seed=100 + len(extra_calls))[0]

    def loss_fn(b):
        out = model(**b)
        return torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="none"), out.logits

    assert sampler.adapt_due(0)
    report = sampler.adapt(0, loss_fn, next_batch, batch)
    assert len(extra_calls) == 1  # M = 2: the scheduled batch + one fresh one
    stats = report.folded_step  # the phase did the step: the loop calls no sampler.step for it
    assert stats.extra["folded"] == 1.0 and stats.analytic_cost == 0.0 and report.log["folded_step"]
    assert stats.loss == pytest.approx(float(loss_fn(batch)[0].mean().detach()), rel=1e-6)
    for param, grad in zip(model.parameters(), exact):
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    assert sampler.step(batch, loss_fn).extra.get("folded") is None  # the next step samples again
    sampler.detach()


def _drive(ctrl, signs: list[int]) -> list[float]:
    """Phases whose V_act is forced above (+1: tau_act = 0) or below (-1: huge tau_act) the target."""
    s_values = []
    for phase, sign in enumerate(signs):
        ctrl.config.tau_act = 0.0 if sign > 0 else 1e9
        ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2, seed=phase), step=phase * ctrl.F_now)
        s_values.append(round(ctrl.s, 6))
    return s_values


def test_s_step_starts_large_and_halves_at_each_flip():
    ctrl = _controller(alpha=0.01, alpha_max=0.16, F=1)
    ctrl.s = 0.5
    ctrl.engine.rho = [0.5, 0.5, 0.5]  # rho < 1, so V_act > 0 and tau_act = 0 means "too much variance"
    assert _drive(ctrl, [-1, -1, +1, -1, +1, +1, -1]) == [0.34, 0.18, 0.26, 0.22, 0.24, 0.26, 0.25]
    for _ in range(4):
        _drive(ctrl, [+1, -1])
    assert ctrl.alpha_now == 0.01  # floored at alpha


def test_nu_multiplier_approaches_beta_at_each_flip():
    ctrl = _controller(beta=0.95, beta_min=0.7, F=1, tau_w=1e9)  # V_w below target: nu falls
    ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2), step=0)
    assert ctrl.nu == pytest.approx([0.7] * len(ctrl.nu))
    ctrl.config.tau_w = 0.0  # now above target wherever nu < 1 gives V_w > 0: nu rises there, a flip
    ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2, seed=1), step=1)
    # Linears whose gradient has fewer non-zero token rows than nu keeps (the top block after the
    # attention sees only the [CLS] row) have V_w = 0: they keep falling, at the unchanged multiplier.
    flipped = [v > 0 for v in ctrl.history[-1].V_w_layer]
    assert sum(flipped) >= len(flipped) // 2
    for i, up in enumerate(flipped):
        assert ctrl.beta_now[i] == pytest.approx(0.85 if up else 0.7)
        assert ctrl.nu[i] == pytest.approx(0.7 / 0.85 if up else 0.7 * 0.7)


def test_period_doubles_while_s_oscillates_and_halves_on_a_drift():
    ctrl = _controller(F=2, F_max_factor=4, alpha_max=0.08)
    ctrl.s = 0.5
    ctrl.engine.rho = [0.5, 0.5, 0.5]
    periods = []
    for sign in [-1, +1, -1, +1, +1, +1, +1, -1]:
        _drive(ctrl, [sign])
        periods.append(ctrl.F_now)
    assert periods == [2, 4, 8, 8, 4, 2, 2, 4]
    assert not ctrl.should_adapt(ctrl.next_phase - 1) and ctrl.should_adapt(ctrl.next_phase)


PLUS_F = {"vit-tiny": 4, "minilm": 10}


@pytest.fixture(scope="module", params=["vit-tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def plus_run(request, tmp_path_factory):
    """vcas-plus alone on an end-to-end setting of test_vcas_e2e (200 steps, tau = 0.025: vit-tiny on
    MNIST, or MiniLM on rt-polarity at sequence 32, ~2.5 minutes on 2 cores), with the preset's own
    alpha/beta schedules. F = 4 on vit-tiny: the adaptive period doubles while s oscillates near 1 (the
    tiny ViT's rows are alike), and 200 steps must still hold enough phases for a median (22 seen)."""
    from conftest import compose_config
    from test_vcas_e2e import SETTINGS

    from vcas_bench.train.run import run

    out = tmp_path_factory.mktemp(f"vcas-plus-{request.param}")
    cfg = compose_config([
        "trainer.progress=false", "trainer.device=cpu", f"output_dir={out}", "trainer.max_steps=200",
        *SETTINGS[request.param], "sampler=vcas-plus", "baselines=[]", f"sampler.F={PLUS_F[request.param]}",
    ])
    (metrics,) = run(cfg, out)
    with open(out / "vcas-plus" / "sampler_log.csv") as handle:
        return metrics, list(csv.DictReader(handle))


def test_vcas_plus_holds_the_variance_near_tau(plus_run):
    """As for vcas (test_vcas_e2e): after 3 warm-up phases the median V_act/V_s is within [tau/3, 3 tau]."""
    metrics, phases = plus_run
    ratios = [float(p["V_act_over_V_s"]) for p in phases[3:]]
    assert len(ratios) >= 5
    assert 0.025 / 3 <= statistics.median(ratios) <= 3 * 0.025, ratios
    assert metrics["keep_ratio_mean"] < 1.0


def test_rho_matches_the_new_s_when_the_step_is_large_or_halved():
    """With alpha_max the s step is not alpha, and after a sign flip it is halved: rho (rho_ema = 0) must
    still be Eq. 4 at the s actually reached (0.5 - 0.16 = 0.34, then 0.34 + 0.08 = 0.42)."""
    from test_vcas_controller import _expected_rho

    ctrl = _controller(tau_act=1e9, alpha=0.01, alpha_max=0.16, rho_ema=0.0, F=1)
    ctrl.s = 0.5
    ctrl.engine.rho = [0.5, 0.5, 0.5]
    for tau_act, seed, s_new in ((1e9, 3, 0.34), (0.0, 4, 0.42)):
        ctrl.config.tau_act = tau_act
        batches = _batches(2, seed=seed)
        ctrl.adapt(_loss_fn(ctrl.wrapped.model), batches, step=seed)
        assert ctrl.s == pytest.approx(s_new)
        expected = _expected_rho(tiny_bert(layers=3), batches, s_new)
        torch.testing.assert_close(torch.tensor(ctrl.rho), torch.tensor(expected, dtype=torch.float32))


# -- variance passes on a row subset of each weight gradient ---------------------------------------
def test_row_probes_compute_exactly_the_rows_of_the_full_weight_gradient():
    """With probe rows set, a linear computes only those rows of its weight gradient; they equal the
    same rows of the full gradient (a sub-GEMM: equal up to summation order), and the full gradient
    handed back to autograd is a zero view (no memory)."""
    ctrl = _controller(tiny_bert(layers=3), variance_subset="rows", param_sample_ratio=0.25)
    model, batch = ctrl.wrapped.model, _batches(1, seed=3)[0]
    weights = ctrl.wrapped.linear_weights
    full = torch.autograd.grad(_loss_fn(model)(batch), weights)
    probes = [ctrl.variance.probe_subset(w) for w in weights]
    got = ctrl.variance._pass(_loss_fn(model)(batch), weights, probes, exact=True)
    for g, rows, part in zip(full, probes, got):
        assert len(rows) == round(0.25 * g.shape[0])
        torch.testing.assert_close(part, g[rows].flatten(), rtol=1e-5, atol=1e-7)
    assert all(slot.probe_rows is None and slot.probe_grad is None for slot in ctrl.engine.linears)


def test_row_probe_gradient_stays_a_zero_view_under_autocast():
    """Under bf16 autocast the probed linear computes in bf16, but the zero gradient it hands autograd
    is created in the weight's fp32 as a view, not cast from bf16 into a full-size tensor."""
    ctrl = _controller(tiny_bert(layers=3), variance_subset="rows", param_sample_ratio=0.25)
    model, batch = ctrl.wrapped.model, _batches(1, seed=3)[0]
    slot, weight = ctrl.engine.linears[0], ctrl.wrapped.linear_weights[0]
    slot.probe_rows = ctrl.variance.probe_subset(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss_fn(model)(batch)
    (grad,) = torch.autograd.grad(loss.float(), [weight])
    assert grad.dtype == torch.float32 and grad.stride() == (0, 0) and not grad.any()
    assert slot.probe_grad.dtype == torch.bfloat16
    assert slot.probe_grad.shape == (len(slot.probe_rows), weight.shape[1])


def test_row_subset_covering_everything_gives_the_entry_estimates():
    """At ratio 1 both subsets cover every entry: the same V_s, V_act, V_w and decisions."""
    traces = []
    for subset in ("entries", "rows"):
        ctrl = _controller(tiny_bert(layers=3), param_sample_ratio=1.0, variance_subset=subset, F=1)
        ctrl.engine.rho = [0.5, 0.6, 0.7]
        for phase in range(2):
            ctrl.adapt(_loss_fn(ctrl.wrapped.model), _batches(2, seed=phase), step=phase)
        traces.append(_trace(ctrl))
    for a, b in zip(*traces):
        assert a[:3] == b[:3]  # s, rho, nu
        assert a[3:] == pytest.approx(b[3:], rel=1e-5)


def test_row_subset_estimates_are_unbiased_over_phases():
    """The row-subset V_s of one pair of batches, averaged over many random subsets, is the full V_s:
    each entry is covered with probability r, and the sum is rescaled by 1/r. 3-sigma of the mean."""
    batches = _batches(2, seed=5)
    full = _controller(tiny_bert(layers=3), param_sample_ratio=1.0, F=1, tau_act=0.0)
    target = full.adapt(_loss_fn(full.wrapped.model), batches, step=0).V_s
    ctrl = _controller(tiny_bert(layers=3), param_sample_ratio=0.2, variance_subset="rows", F=1, tau_act=0.0)
    draws = torch.tensor([ctrl.adapt(_loss_fn(ctrl.wrapped.model), batches, step=i).V_s for i in range(60)],
                         dtype=torch.float64)
    assert abs(draws.mean() - target) < 3 * draws.std() / len(draws) ** 0.5


def test_phase_cost_counts_only_the_probed_share_of_the_weight_gemms():
    # M = 2, rho = 0.5, w = 0.05: exact passes 2 x (1 + 1 + 0.05); SampleA backwards 4 x 0.5 x (1 + 0.05),
    # each with its own forward (+4) unless it reuses the exact pass's.
    assert phase_cost_ratio([0.5], 2, False, 0.05) == pytest.approx((2 * 2.05 + 4 * (1 + 0.5 * 1.05)) / 3)
    assert phase_cost_ratio([0.5], 2, True, 0.05) == pytest.approx((2 * 2.05 + 4 * 0.5 * 1.05) / 3)
    assert phase_cost_ratio([0.5], 2, True, 1.0) == phase_cost_ratio([0.5], 2, True)
    ctrl = _controller(tiny_bert(layers=3), variance_subset="rows", param_sample_ratio=0.05, fold_batch=True,
                       reuse_forward=True)
    # The folded first pass computes its weight gradients in full: + (1 - w) / 3.
    assert ctrl.phase_cost() == pytest.approx(phase_cost_ratio(ctrl.rho, 2, True, 0.05) + 0.95 / 3)
