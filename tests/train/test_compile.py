"""``torch.compile`` (inductor, CPU) over a VCAS-wrapped model: the forward compiles, the sampled
backward runs, and the gradients are the eager ones at the same generator state; graph breaks are
counted. And the runner's ``trainer.compile=true`` trains end to end from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from integration_helpers import tiny_bert
from test_syncs import _batch, _per_example_loss

from vcas_bench.measure.syncs import SyncCounter
from vcas_bench.vcas import wrap

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model, loss_model, generator_state, engine) -> list[torch.Tensor]:
    engine.generator.set_state(generator_state)
    model.zero_grad(set_to_none=True)
    loss = _per_example_loss(loss_model)(_batch())[0].mean()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("static", [False, True], ids=["bernoulli", "static"])
def test_compiled_wrapped_model_gives_the_eager_gradients(static):
    """2-layer tiny BERT, rho = nu = 0.5: compiled (inductor) and eager runs from the same generator
    state draw the same rows, so every gradient agrees within float32 tolerance (rtol 1e-4,
    atol 1e-5: inductor fuses the forward's elementwise ops in another order). Sampling really ran
    (some rows dropped), and the compiled backward keeps the sync budget of the eager one."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_bert(layers=2)
    wrapped = wrap(model, "BertLayer", torch.Generator().manual_seed(0))
    engine = wrapped.engine
    engine.static_shapes = static
    engine.rho = [0.5, 0.5]
    for slot in engine.linears:
        slot.nu = 0.5
    state = engine.generator.get_state()
    eager = _grads(model, model, state, engine)
    compiled = torch.compile(model, backend="inductor")
    _grads(model, compiled, state, engine)  # compiles
    with SyncCounter() as syncs:
        got = _grads(model, compiled, state, engine)
    assert engine.kept_fraction[-1] < 1
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    breaks = sum(counters["graph_break"].values())
    print(f"graph breaks ({'static' if static else 'bernoulli'}): {breaks}; syncs: {dict(syncs.counts)}")


def test_cli_trains_two_steps_with_compile(tmp_path, monkeypatch, capsys):
    """`vcas-bench trainer.compile=true` (rt-polarity, bert-tiny, 64 rows of 16 tokens, batch 32,
    2 steps, vcas only: a variance phase and a sampled step through the compiled model)."""
    torch._dynamo.reset()
    out = tmp_path / "run"
    args = ["sampler=vcas", "task=rt-polarity", "model=bert-tiny", "baselines=[]", "trainer.max_steps=2",
            "trainer.compile=true", "task.args.train_size=64", "task.args.eval_size=32",
            "task.args.max_length=16", "task.batch_size=32",
            "trainer.progress=false", "trainer.device=cpu", "trainer.num_threads=1",
            f"output_dir={out}", f"hydra.run.dir={out}"]
    run_cli(args, monkeypatch, capsys)
    metrics = json.loads((out / "vcas" / "metrics.json").read_text())
    assert metrics["steps"] == 2
