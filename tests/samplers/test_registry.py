"""What every registered sampler must do, parametrized over the registry (``vcas_bench.samplers.SAMPLERS``):
a sampler is covered the moment it registers, with its tiny canonical setting (``tests/sampler_settings.py``;
a sampler without one shows as xfail).

It attaches and detaches leaving the model as it was; it runs and reports its keep ratio, cost and
phases through ``run(cfg)`` on a text and an image task; a run stopped at a corrupt checkpoint resumes
from the one before and ends equal to an uninterrupted run; ``vcas-bench sampler=<name>`` runs 2 steps
beside exact. What is particular to a sampler (unbiasedness, SB's kept fraction, InfoBatch's pruning,
VCAS's controller) is tested beside it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from integration_helpers import T, tiny_bert
from sampler_settings import CANONICAL, TINY_RUN, Canonical

from vcas_bench.samplers import SAMPLERS, create_sampler
from vcas_bench.train.run import run
from vcas_bench.train.state import checkpoint_path, latest_checkpoint, load_checkpoint

REQUIRED = {"task", "model", "sampler", "seed", "steps", "final_train_loss", "eval_accuracy", "wall_clock_s",
            "train_time_s", "keep_ratio_mean", "flops_reduction_analytic", "adapt_phases"}


@pytest.fixture(params=SAMPLERS.names())
def sampler(request: pytest.FixtureRequest) -> tuple[str, Canonical]:
    name = request.param
    if name not in CANONICAL:
        pytest.xfail(f"sampler {name!r} has no tiny canonical setting in tests/sampler_settings.py")
    return name, CANONICAL[name]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _model_view(model: torch.nn.Module) -> list[tuple[str, type, int]]:
    """Every module's name and class, and every parameter object: what a wrapper could leave behind."""
    modules = [(name, type(module), 0) for name, module in model.named_modules()]
    return modules + [(name, type(p), id(p)) for name, p in model.named_parameters()]


def test_attach_and_detach_leave_the_model_as_it_was(sampler, one_thread) -> None:
    """Twice attached and detached, the model has the same modules, classes, parameter objects and
    state_dict keys, and the same outputs, as before the first attach."""
    name, _ = sampler
    model = tiny_bert().eval()
    ids = torch.randint(0, 100, (4, T), generator=torch.Generator().manual_seed(0))
    view, keys = _model_view(model), list(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for _ in range(2):
        instance = create_sampler(name, seed=0)
        instance.attach(model, "BertLayer", total_steps=10)
        instance.detach()
    assert _model_view(model) == view and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize(("task", "model"), [("rt-polarity", "bert-tiny"), ("mnist5k", "vit-tiny")])
def test_runs_and_reports_its_keep_ratio_cost_and_phases(sampler, task, model, make_cfg, tmp_path) -> None:
    """4 steps of 32 rows: metrics.json holds the common keys; a sampler that backpropagates fewer rows
    reports a keep ratio below 1 and, without phases to pay for, an analytic saving; one that adapts
    logs each phase."""
    name, canonical = sampler
    cfg = make_cfg(f"task={task}", f"model={model}", f"sampler={name}", "baselines=[]", *canonical.overrides,
                   "trainer.max_steps=4", "task.args.train_size=320", "task.args.eval_size=64")
    (metrics,) = run(cfg, tmp_path)
    assert REQUIRED <= metrics.keys() and metrics["sampler"] == name and metrics["steps"] == 4
    assert json.loads((tmp_path / name / "metrics.json").read_text())["steps"] == 4
    losses = [float(r["loss"]) for r in _rows(tmp_path / name / "train_log.csv")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    if canonical.subsamples:
        assert 0 < metrics["keep_ratio_mean"] < 1
        # The analytic cost counts adaptation phases too: 4 steps cannot pay for them.
        assert metrics["flops_reduction_analytic"] > 0 or canonical.adapts
    else:
        assert metrics["keep_ratio_mean"] == 1
    sampler_log = tmp_path / name / "sampler_log.csv"
    if canonical.adapts:
        phases = _rows(sampler_log)
        assert metrics["adapt_phases"] == len(phases) >= 1
        assert all(0 <= float(p["s"]) <= 1 and math.isfinite(float(p["V_s"])) for p in phases)
    else:
        assert metrics["adapt_phases"] == 0 and not sampler_log.exists()


CORRUPTIONS = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: os.urandom(len(data)),
}


def _log(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in _rows(run_dir / "train_log.csv")]


def test_resume_skips_a_corrupt_newest_checkpoint_and_ends_as_if_never_stopped(
    sampler, make_cfg, tmp_path, capsys
) -> None:
    """Checkpoints at steps 4 and 5 (stopped there, as a kill would); step 5's file is then broken (empty,
    truncated or garbage, by sampler) and a killed write's temporary file is left beside it.
    ``trainer.resume=auto`` names the bad file in one line, sets it aside, removes the temporary file,
    resumes from step 4 (sampler state included) and ends equal to an uninterrupted run."""
    name, canonical = sampler
    corruption = list(CORRUPTIONS)[SAMPLERS.names().index(name) % len(CORRUPTIONS)]
    overrides = [*TINY_RUN, "baselines=[]", f"sampler={name}", *canonical.overrides, "trainer.max_steps=6",
                 "trainer.checkpoint_every=2", "trainer.flops_every=0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    (expected,) = run(make_cfg(*overrides, f"output_dir={whole}"), whole)
    run(make_cfg(*overrides, f"output_dir={parts}", "trainer.stop_after=5"), parts)
    newest = checkpoint_path(parts / name, 5)
    newest.write_bytes(CORRUPTIONS[corruption](newest.read_bytes()))
    leftover = newest.with_name(".step_000000006.pt.tmp123")
    leftover.write_bytes(b"\x80half")
    capsys.readouterr()
    (resumed,) = run(make_cfg(*overrides, f"output_dir={parts}", "trainer.resume=auto"), parts)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"checkpoint {newest} is unreadable" in line and "using step_000000004.pt" in line
    assert not leftover.exists() and newest.with_name(newest.name + ".corrupt").exists()
    assert resumed["resumed_from_step"] == 4
    assert _log(parts / name) == _log(whole / name)
    final = [load_checkpoint(latest_checkpoint(d / name))["model"] for d in (whole, parts)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert resumed["eval_accuracy"] == expected["eval_accuracy"]


def test_cli_runs_two_steps_beside_exact(sampler, tmp_path, monkeypatch, capsys) -> None:
    """``vcas-bench sampler=<name> baselines=[exact] trainer.max_steps=2`` on the tiny task: exit 0, both
    runs finished, the comparison lists exact then the sampler."""
    name, canonical = sampler
    out = tmp_path / "out"
    args = [*TINY_RUN, f"sampler={name}", *canonical.overrides, "baselines=[exact]", "trainer.max_steps=2",
            "trainer.progress=false", "trainer.device=cpu", f"output_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    run_cli(args, monkeypatch, capsys)
    expected = list(dict.fromkeys(["exact", name]))
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["sampler"] for row in rows] == expected
    for run_name in expected:
        assert json.loads((out / run_name / "metrics.json").read_text())["steps"] == 2
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
