"""The loop's side of the sampler contract, with a recording sampler: what it does with a PhaseReport."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vcas_bench.measure.flops import FlopMeter
from vcas_bench.measure.timers import UnitTimer
from vcas_bench.samplers import PhaseReport, StepStats, WithoutPhases, mean_loss_backward
from vcas_bench.train import build
from vcas_bench.train.data import build_extra_stream, build_train_stream
from vcas_bench.train.loop import LoopOptions, train
from vcas_bench.train.state import LoopResult, TrainState

PHASE_COST, STEP_COST = 3.0, 0.5


class Folding(WithoutPhases):
    """A phase before every other optimizer step that does the first micro-batch's backward itself."""

    name = "folding"

    def __init__(self) -> None:
        self.stepped: list[int] = []  # the batch sizes sampler.step saw
        self.adapted: list[int] = []

    def attach(self, model: nn.Module, block_type: str, total_steps: int) -> None:
        pass

    def step(self, batch, loss_fn) -> StepStats:
        losses, _ = loss_fn(batch)
        self.stepped.append(len(losses))
        return StepStats(loss=mean_loss_backward(losses), keep_ratio=0.5, analytic_cost=STEP_COST,
                         extra={"column": 1.0})

    def adapt_due(self, step: int) -> bool:
        return step % 2 == 0

    def adapt(self, step, loss_fn, next_batch, batch) -> PhaseReport:
        self.adapted.append(step)
        next_batch()  # a fresh batch, as a variance phase draws
        losses, _ = loss_fn(batch)
        folded = StepStats(loss=mean_loss_backward(losses), keep_ratio=1.0, analytic_cost=0.0,
                           extra={"column": 2.0})
        return PhaseReport(cost=PHASE_COST, log={"step": step, "per_block": [0.1, 0.2]}, folded_step=folded)

    def detach(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _state(sampler) -> TrainState:
    generator = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(4, generator=generator), "labels": torch.tensor(i % 2)} for i in range(64)]
    model = nn.Linear(4, 2)
    optimizer = build.build_optimizer(model, "sgd", 0.1, 0.0, momentum=0.0)
    return TrainState(model=model, sampler=sampler, optimizer=optimizer,
                      scheduler=build.build_scheduler(optimizer, "constant", 4, 0.0),
                      batches=build_train_stream(rows, 8, seed=0), extra=build_extra_stream(rows, 8, seed=0),
                      result=LoopResult(timer=UnitTimer(torch.device("cpu")), flops=FlopMeter(0)))


def test_a_folded_step_replaces_sampler_step_and_its_cost_is_the_phases():
    """4 optimizer steps x 2 micro-batches, phases before steps 0 and 2 that fold their first micro-batch:
    step() runs for the 6 others; the phase rows are logged as given; the analytic cost is the steps' mean
    micro-batch cost plus each phase's cost over ``accumulate``."""
    sampler = Folding()
    state = _state(sampler)
    model = state.model
    loss_fn = lambda b: (nn.functional.cross_entropy(model(b["x"]), b["labels"], reduction="none"), None)
    result = train(state, loss_fn, evaluate=dict, options=LoopOptions(total_steps=4, accumulate=2,
                                                                        flops_every=0, progress=False))
    assert sampler.adapted == [0, 2] and len(sampler.stepped) == 6
    assert result.phase_log == [{"step": 0, "per_block": [0.1, 0.2]}, {"step": 2, "per_block": [0.1, 0.2]}]
    folded_mean, sampled_mean = (0.0 + STEP_COST) / 2, STEP_COST
    expected = 2 * folded_mean + 2 * sampled_mean + 2 * PHASE_COST / 2
    assert result.analytic_cost == pytest.approx(expected)
    assert [row["keep_ratio"] for row in result.train_log] == [0.75, 0.5, 0.75, 0.5]
    assert all(row["column"] == 1.0 for row in result.train_log)  # the last micro-batch's columns
    timer = result.timer
    assert timer.units["phase"] == 2 and timer.units["step"] == 6  # a folded micro-batch is no step unit
