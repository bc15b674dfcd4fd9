"""Golden loss curves: one seeded 20-step run of exact and one of VCAS on the tiny offline task (digits,
vit-tiny, batch 16, CPU, one thread), compared step by step with the curves in ``tests/golden/``.

Any change to the numbers a run produces shows here as a changed curve: the model's init, the data
order, the loss, the optimizer and schedule, and for VCAS its draws (the sampler's own generator) and
the controller's decisions (F = 4, tau = 0.5 and alpha = 0.1, so s falls from the first phase on and the
keep ratio leaves 1). Tolerance rel 1e-5 per step: one machine repeats these runs bit for bit; the
margin is for another CPU's kernels (vector width changes the order of float32 sums, ~1e-7 per op).

If a change of the numbers is intended, regenerate the curves and commit them with that change:
``pytest tests/train/test_golden.py --update-golden``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from vcas_bench.train.run import run

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RUN = ["task=digits", "model=vit-tiny", "seed=0", "baselines=[exact]", "sampler=vcas", "sampler.F=4",
       "sampler.tau=0.5", "sampler.alpha=0.1", "trainer.max_steps=20", "task.args.train_size=256",
       "task.args.eval_size=64", "task.batch_size=16", "trainer.num_threads=1", "trainer.flops_every=0"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, dict[str, list[float]]]:
    """Both runs' per-step loss and keep ratio (one ``run``: exact first, same init and batches)."""
    from conftest import FAST, compose_config

    out = tmp_path_factory.mktemp("golden")
    run(compose_config([*FAST, f"output_dir={out}", *RUN]), out)
    result = {}
    for name in ("exact", "vcas"):
        with open(out / name / "train_log.csv") as handle:
            rows = list(csv.DictReader(handle))
        result[name] = {key: [float(r[key]) for r in rows] for key in ("loss", "keep_ratio")}
    return result


@pytest.mark.parametrize("name", ["exact", "vcas"])
def test_loss_curve_matches_the_golden_one(curves, name, update_golden) -> None:
    path = GOLDEN / f"{name}.json"
    got = curves[name]
    if update_golden:
        path.write_text(json.dumps({"overrides": RUN, **got}, indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    golden = json.loads(path.read_text())
    assert golden["overrides"] == RUN, "the run's settings changed: regenerate with --update-golden"
    assert len(got["loss"]) == 20
    expected = torch.tensor(golden["loss"], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(got["loss"], dtype=torch.float64), expected, rtol=RTOL, atol=0)
    assert got["keep_ratio"] == golden["keep_ratio"]  # each step's kept rows: the draws themselves


def test_the_golden_curves_are_worth_comparing() -> None:
    """The stored curves are not degenerate: both learn, VCAS samples, and it follows exact only until its
    first sampled step (the same init and first batch), then its own draws."""
    exact, vcas = (json.loads((GOLDEN / f"{n}.json").read_text()) for n in ("exact", "vcas"))
    for curve in (exact, vcas):
        assert sum(curve["loss"][-5:]) < sum(curve["loss"][:5])
    assert set(exact["keep_ratio"]) == {1.0} and min(vcas["keep_ratio"]) < 1.0
    assert exact["loss"][0] == vcas["loss"][0] and exact["loss"][-1] != vcas["loss"][-1]
