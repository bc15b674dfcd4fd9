"""VCAS end to end: 200 steps against exact on the same seed and data, through ``run(cfg)``.

Two settings run the same assertions. ``vit-tiny`` (the default suite, ~40 s): the 2-layer ViT from
random init on 5,000 real MNIST digits (4,000 training rows, 500 eval, one thread), 1.6 epochs.
``minilm`` (``slow``, ``make test-full``): the demo's pretrained MiniLM on rt-polarity, sequence 32, 500
eval rows, ~5 minutes on 2 cores.

Both: batch 32, F = 10 (20 phases), tau = 0.025. Two deviations from the paper's defaults make the
controller reach its operating point within such a short run: alpha = 0.05 (s moves 5x faster) and
rho_ema = 0 (the rho schedule follows s at once).
"""

from __future__ import annotations

import csv
import statistics

import pytest

from vcas_bench.train.run import run

TAU = 0.025
WARMUP_PHASES = 5  # s needs a few phases of alpha = 0.05 to come down from 1 to its operating range
SETTINGS = {
    "vit-tiny": ["task=mnist5k", "model=vit-tiny", "task.args.eval_size=500", "trainer.num_threads=1"],
    "minilm": ["task.args.max_length=32", "task.args.train_size=6400", "task.args.eval_size=500"],
}


@pytest.fixture(scope="module", params=["vit-tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def comparison(request, tmp_path_factory):
    from conftest import compose_config

    out = tmp_path_factory.mktemp(f"vcas-e2e-{request.param}")
    cfg = compose_config([
        "trainer.progress=false", "trainer.device=cpu", f"output_dir={out}", "trainer.max_steps=200",
        *SETTINGS[request.param], "sampler.F=10", "sampler.alpha=0.05", "sampler.rho_ema=0",
        f"sampler.tau={TAU}",
    ])
    exact, vcas = run(cfg, out)
    with open(out / "vcas" / "sampler_log.csv") as handle:
        phases = list(csv.DictReader(handle))
    return exact, vcas, phases


def test_final_train_loss_matches_exact(comparison):
    """Final train loss (mean of the last 10 steps) within 10% of exact's. The paper's own Table 1 gaps
    between VCAS and exact reach 12.5% (BERT-large MNLI), so 10% is a tolerance the method must meet."""
    exact, vcas, _ = comparison
    assert abs(vcas["final_train_loss"] - exact["final_train_loss"]) <= 0.10 * exact["final_train_loss"]
    assert vcas["eval_accuracy"] >= exact["eval_accuracy"] - 0.03  # 0.03 = 2 binomial s.e. at n = 500


def test_activation_variance_is_held_near_tau(comparison):
    """After warm-up the median V_act/V_s over the phases lies within [tau/3, 3 tau]: the controller
    holds the extra variance at the target (each phase's ratio rests on M = 2 batches, so single phases
    scatter by an order of magnitude; the median over 15 phases does not)."""
    _, _, phases = comparison
    assert len(phases) == 20
    ratios = [float(p["V_act_over_V_s"]) for p in phases[WARMUP_PHASES:]]
    assert TAU / 3 <= statistics.median(ratios) <= 3 * TAU, ratios
    s_values = [float(p["s"]) for p in phases]
    assert min(s_values) < 1.0  # the controller did sample (it did not sit at exact)


def test_vcas_sampled_and_was_measured(comparison):
    _, vcas, _ = comparison
    assert vcas["keep_ratio_mean"] < 1.0 and vcas["final_nu_mean"] < 1.0
    assert vcas["flops_backward"] < comparison[0]["flops_backward"]  # the reduced backward is real
    assert vcas["flops_overhead"] > 0 and vcas["adapt_phases"] == 20
