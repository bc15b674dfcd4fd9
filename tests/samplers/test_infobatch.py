"""InfoBatch: the prune ratio it achieves, its rescaling keeps the expected gradient, annealing stops the
pruning, and it runs (and resumes, loss table included) through the runner and the CLI."""

from __future__ import annotations

import csv
import json
import math

import torch
from conftest import run_cli
from test_resume import DIGITS, _assert_same_run

from vcas_bench.samplers import create_sampler
from vcas_bench.samplers.infobatch import well_learned
from vcas_bench.train.run import run
from vcas_bench.train.state import latest_checkpoint, load_checkpoint


def _sampler(scores: torch.Tensor, epochs: float = 8.0, **settings):
    """An InfoBatch sampler whose loss table holds ``scores`` (every row seen)."""
    sampler = create_sampler("infobatch", seed=0, epochs=epochs, **settings)
    sampler.plan_epoch(0, list(range(len(scores))), len(scores), 1)  # epoch 0: nothing seen, nothing pruned
    sampler.scores, sampler.seen = scores.clone(), torch.ones(len(scores), dtype=torch.bool)
    return sampler


def test_prune_ratio_is_r_times_the_well_learned_fraction():
    """20,000 rows with exponential losses (seed 0), r = 0.3 and 0.5: the pruned fraction of one epoch is
    r x (fraction below the mean) within 3 binomial s.d. (sqrt(n_well r (1 - r)) / N); only well-learned
    rows are pruned."""
    n = 20_000
    scores = torch.empty(n).exponential_(generator=torch.Generator().manual_seed(0))
    well = well_learned(scores, torch.ones(n, dtype=torch.bool))
    assert 0.5 < float(well.float().mean()) < 0.75  # exponential: P(x < mean) = 1 - 1/e
    for r in (0.3, 0.5):
        sampler = _sampler(scores, ratio=r)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
        kept = sampler.plan_epoch(1, order, n, 1)
        pruned = sorted(set(order) - set(kept))
        sd = math.sqrt(int(well.sum()) * r * (1 - r)) / n
        assert abs(len(pruned) / n - r * float(well.float().mean())) < 3 * sd
        assert bool(well[pruned].all())
        kept_set = set(kept)
        assert kept == [i for i in order if i in kept_set]  # the shuffled order is kept
        assert abs(sampler.pruned_fraction - len(pruned) / n) < 1e-12


def _epoch_gradients(sampler, targets: torch.Tensor, theta: torch.Tensor, epochs: int,
                     rescale: bool = True) -> torch.Tensor:
    """The epoch-mean gradient of loss_i = 0.5 ||theta - x_i||^2 over each epoch's plan (losses fixed),
    one row per epoch: sum over kept rows of weight_i * (theta - x_i), over N."""
    n = len(targets)
    grads = []
    for epoch in range(1, epochs + 1):
        kept = torch.tensor(sampler.plan_epoch(epoch, list(range(n)), n, 1))
        weights = sampler.weights[kept] if rescale else torch.ones(len(kept))
        grads.append((weights[:, None] * (theta - targets[kept])).sum(0) / n)
    return torch.stack(grads)


def test_rescaling_keeps_the_expected_gradient():
    """Fixed-loss toy: 64 rows x_i in R^3 whose loss table is ||x_i||^2 (so the well-learned ones are the
    small x_i, a biased subset). Over 4,000 epoch plans (r = 0.5) the mean gradient matches the full one
    per coordinate within 3 s.e.; without the 1/(1 - r) rescaling it is off by more than 10 s.e."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(64, 3, generator=g) * torch.linspace(0.2, 3, 64)[:, None]
    theta = torch.tensor([1.0, -0.5, 2.0])
    full = (theta - targets).mean(0)
    sampler = _sampler(targets.square().sum(1), epochs=10_000, ratio=0.5)
    draws = _epoch_gradients(sampler, targets, theta, 4000)
    se = draws.std(0) / math.sqrt(len(draws))
    assert bool(((draws.mean(0) - full).abs() < 3 * se).all()), (draws.mean(0), full, se)
    plain = _epoch_gradients(sampler, targets, theta, 4000, rescale=False)
    se_plain = plain.std(0) / math.sqrt(len(plain))
    assert float(((plain.mean(0) - full).abs() / se_plain).max()) > 10


def test_annealing_stops_pruning_in_the_last_epochs():
    """8 epochs, delta = 0.875: epochs 0-6 end within the first 7 epochs and are pruned, epoch 7 is not
    (all rows, weights 1); delta = 0.5: only epochs 0-3."""
    n = 1000
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    sampler = _sampler(scores, epochs=8, ratio=0.5)
    assert [sampler.prunes(e) for e in range(8)] == [True] * 7 + [False]
    assert len(sampler.plan_epoch(6, list(range(n)), n, 1)) < 0.9 * n
    assert float(sampler.weights.max()) == 2.0
    assert sampler.plan_epoch(7, list(range(n)), n, 1) == list(range(n))
    assert bool((sampler.weights == 1).all()) and sampler.pruned_fraction == 0
    half = _sampler(scores, epochs=8, ratio=0.5, delta=0.5)
    assert [half.prunes(e) for e in range(8)] == [True] * 4 + [False] * 4


def test_cli_runs_infobatch_on_the_offline_task(tmp_path, monkeypatch, capsys):
    """`vcas-bench sampler=infobatch` (digits, vit-tiny, 128 rows, batch 32: 4 steps an epoch) with a budget
    of 12 full-data steps (3 epochs): epoch 0 sees every row, epoch 1 is pruned, so the run takes fewer
    than 12 steps and reports the saving; the LR schedule reaches 0 at the end of the budget."""
    out = tmp_path / "run"
    args = ["sampler=infobatch", "task=digits", "model=vit-tiny", "baselines=[exact]",
            "trainer.max_steps=12", "task.args.train_size=128", "task.args.eval_size=32",
            "task.batch_size=32", "trainer.progress=false", "trainer.device=cpu", "trainer.num_threads=1",
            f"output_dir={out}", f"hydra.run.dir={out}"]
    run_cli(args, monkeypatch, capsys)
    metrics = json.loads((out / "infobatch" / "metrics.json").read_text())
    exact = json.loads((out / "exact" / "metrics.json").read_text())
    assert exact["steps"] == 12 and 8 <= metrics["steps"] < 12
    assert math.isclose(metrics["flops_reduction_analytic"], 1 - metrics["steps"] / 12)
    with open(out / "infobatch" / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    pruned = {int(r["epoch"]): float(r["pruned_fraction"]) for r in rows}
    assert pruned[0] == 0 and pruned[1] > 0 and float(rows[-1]["lr"]) == 0.0


def test_resumed_run_keeps_its_loss_table(make_cfg, tmp_path):
    """40 full-data steps of 16 rows (2.5 epochs of 256 rows; epochs 0-1 pruned-eligible): stopped after 20
    steps, inside the pruned epoch 1, and resumed in a fresh process state, the run equals the
    uninterrupted one (losses, plan, final weights), and the checkpoint holds the loss table."""
    overrides = [*DIGITS, "trainer.max_steps=40", "sampler=infobatch"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    (expected,) = run(make_cfg(*overrides, f"output_dir={whole}"), whole)
    (stopped,) = run(make_cfg(*overrides, f"output_dir={parts}", "trainer.stop_after=20"), parts)
    assert stopped == {"sampler": "infobatch", "stopped_at_step": 20}
    state = load_checkpoint(latest_checkpoint(parts / "infobatch"))["ranks"][0]["sampler"]
    assert bool(state["seen"].all()) and state["plan_epoch"] == 1 and len(state["plan"]) < 256
    (resumed,) = run(make_cfg(*overrides, f"output_dir={parts}", "trainer.resume=auto"), parts)
    assert resumed["resumed_from_step"] == 20 and expected["steps"] < 40
    _assert_same_run(whole, parts, "infobatch", expected, resumed)
