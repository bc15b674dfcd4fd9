"""Gradient accumulation (``trainer.accumulate``): F and the step count are optimizer steps, the update is
the mean gradient of the micro-batches, and a variance phase never touches an accumulated gradient."""

from __future__ import annotations

import csv

import pytest
import torch
from integration_helpers import tiny_bert
from test_vcas_controller import _batches, _loss_fn

from vcas_bench.samplers import create_sampler
from vcas_bench.train.run import run
from vcas_bench.train.state import latest_checkpoint, load_checkpoint

DIGITS = ["task=digits", "model=vit-tiny", "baselines=[]", "task.args.train_size=256",
          "task.args.eval_size=64", "trainer.num_threads=1"]


def _log(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_two_micro_batches_of_16_equal_one_batch_of_32(make_cfg, tmp_path):
    """exact, 6 optimizer steps over the same 192 rows: the logged losses, the final evaluation and the final
    parameters agree to float32 round-off, and the epoch boundary (8 steps of 32) is the
    same; a mismatch in data order, loss scaling or step counting would show at the first step."""
    runs = {}
    for name, batch, accumulate in (("big", 32, 1), ("acc", 16, 2)):
        cfg = make_cfg(*DIGITS, "sampler=exact", "trainer.max_steps=6", f"task.batch_size={batch}",
                       "trainer.checkpoint_every=6",
                       f"trainer.accumulate={accumulate}", f"output_dir={tmp_path / name}")
        (metrics,) = run(cfg, tmp_path / name)
        runs[name] = (metrics, [float(r["loss"]) for r in _log(tmp_path / name / "exact" / "train_log.csv")])
    (big, big_losses), (acc, acc_losses) = runs["big"], runs["acc"]
    assert acc["steps"] == big["steps"] == 6 and acc["steps_per_epoch"] == big["steps_per_epoch"] == 8
    torch.testing.assert_close(acc_losses, big_losses, rtol=1e-5, atol=1e-6)
    assert acc["eval_loss"] == pytest.approx(big["eval_loss"], rel=1e-5)
    assert acc_losses[-1] != acc_losses[0]  # the parameters did move
    final = {name: load_checkpoint(latest_checkpoint(tmp_path / name / "exact"))["model"] for name in runs}
    for key, value in final["big"].items():
        # atol = 1% of one Adam step (lr 1e-3): Adam normalises, so round-off in near-zero gradient
        # entries moves a weight by a visible fraction of a step.
        torch.testing.assert_close(final["acc"][key], value, rtol=1e-5, atol=1e-5)


def test_vcas_phases_count_optimizer_steps(make_cfg, tmp_path):
    """F=2 with accumulate=3: phases run before optimizer steps 0, 2, 4, not every 2 micro-batches."""
    cfg = make_cfg(*DIGITS, "sampler=vcas", "sampler.F=2", "trainer.max_steps=6", "task.batch_size=16",
                   "trainer.accumulate=3")
    (metrics,) = run(cfg, tmp_path)
    assert metrics["adapt_phases"] == 3
    assert [int(r["step"]) for r in _log(tmp_path / "vcas" / "sampler_log.csv")] == [0, 2, 4]


@pytest.mark.parametrize("name", ["vcas", "vcas-plus"])
def test_a_phase_between_micro_batches_keeps_the_accumulated_gradient(name):
    """Micro-batch 1's gradient sits in .grad; a variance phase (M exact + M^2 SampleA passes) runs; .grad
    is bit-for-bit what it was; for vcas-plus the phase adds the scheduled batch's exact gradient to it
    (its folded step), so .grad then holds both micro-batches' gradients."""
    model = tiny_bert(layers=3)
    loss_fn = _loss_fn(model)
    scheduled = _batches(1, seed=7)[0]
    params = dict(model.named_parameters())
    exact = dict(zip(params, torch.autograd.grad(loss_fn(scheduled), list(params.values()))))  # unwrapped
    sampler = create_sampler(name, seed=0, F=1, tau=0.5)
    sampler.attach(model, "BertLayer", total_steps=10)
    batches = iter(_batches(8, seed=1))
    adapt = lambda batch: sampler.adapt(0, lambda b: (loss_fn(b), None), lambda: next(batches), batch)
    adapt(next(batches))  # a first phase so that rho < 1: the accumulated gradient below is a sampled one
    model.zero_grad(set_to_none=True)  # vcas-plus: the first phase's folded gradient
    sampler.step(next(batches), lambda b: (loss_fn(b).expand(8), None))
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert before
    report = adapt(scheduled)
    assert (report.folded_step is not None) == (name == "vcas-plus")
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert after.keys() == before.keys()
    for key, grad in before.items():
        if report.folded_step is None:
            assert torch.equal(after[key], grad), key
        else:
            torch.testing.assert_close(after[key], grad + exact[key], rtol=1e-5, atol=1e-7, msg=key)
    sampler.detach()
