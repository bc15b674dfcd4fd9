"""``logger=tensorboard`` and ``logger=wandb`` through the CLI: every section (steps, variance phases,
monitor readings, evaluations) and the final metrics as the summary, one logger run per sampler grouped
by the comparison; a missing package is refused in one line."""

from __future__ import annotations

import csv
import importlib.machinery
import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra

from vcas_bench import cli
from vcas_bench.config import LOGGER_PACKAGES, validate
from vcas_bench.train.loggers import LOGGERS, comparison_group, scalars

# bert-tiny (random init) on 64 rt-polarity rows: the default exact-then-VCAS comparison in seconds.
TWO_STEPS = ["model=bert-tiny", "trainer.max_steps=2", "trainer.progress=false", "trainer.device=cpu",
             "task.args.train_size=64", "task.args.eval_size=16", "task.args.max_length=16",
             "monitor.enabled=true", "monitor.every=1"]


def _cli(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``vcas-bench *args`` in this process; return the output folder."""
    out = tmp_path / "cmp"
    hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
    monkeypatch.setattr(sys, "argv", ["vcas-bench", *args, f"output_dir={out}", hydra_dir])
    try:
        cli.main()
    finally:
        GlobalHydra.instance().clear()
    return out


def _column(path: Path, name: str) -> list[float]:
    with open(path) as handle:
        return [float(row[name]) for row in csv.DictReader(handle)]


def test_scalars_keep_finite_numbers_and_spread_lists():
    row = {"step": 3, "loss": 0.5, "rho": [0.9, 0.8], "folded_step": True, "sampler": "vcas",
           "V_w": math.nan, "F": 8, "settings": {"tau": 0.025}}
    assert scalars(row) == {"loss": 0.5, "rho_0": 0.9, "rho_1": 0.8, "F": 8.0}


def test_tensorboard_writes_every_section_and_the_summary_per_sampler(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _cli([*TWO_STEPS, "logger=tensorboard"], tmp_path, monkeypatch)
    tags = {}
    for sampler in ("exact", "vcas"):
        events = EventAccumulator(str(out / sampler / "tb"))
        events.Reload()
        tags[sampler] = set(events.Tags()["scalars"])
        losses = events.Scalars("train/loss")
        assert [e.step for e in losses] == [1, 2]
        assert [e.value for e in losses] == pytest.approx(_column(out / sampler / "train_log.csv", "loss"),
                                                          rel=1e-6)  # float32 in the event file
        metrics = json.loads((out / sampler / "metrics.json").read_text())
        (summary,) = events.Scalars("summary/final_train_loss")
        assert summary.value == pytest.approx(metrics["final_train_loss"], rel=1e-6) and summary.step == 2
        (accuracy,) = events.Scalars("eval/eval_accuracy")
        assert accuracy.step == 2 and accuracy.value == pytest.approx(metrics["eval_accuracy"], rel=1e-6)
        assert [e.step for e in events.Scalars("monitor/extra_over_V_s")] == [1, 2]
    assert {"train/lr", "train/keep_ratio", "summary/train_time_s"} <= tags["exact"]
    phase = {"phase/s", "phase/V_act_over_V_s", "phase/V_w_over_V_s", "phase/rho_0", "phase/nu_0"}
    assert phase <= tags["vcas"] and not any(t.startswith("phase/") for t in tags["exact"])
    assert "summary/flops_reduction_analytic" in tags["vcas"]


class _FakeWandbRun:
    """What the runner calls on a wandb run, recorded."""

    def __init__(self, **settings: Any) -> None:
        self.settings, self.rows, self.summary, self.finished = settings, [], {}, False

    def log(self, row: dict[str, float], step: int) -> None:
        assert not self.finished
        self.rows.append((step, row))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch) -> list[_FakeWandbRun]:
    """A ``wandb`` module that records its runs (the package need not be installed; nothing is sent)."""
    runs: list[_FakeWandbRun] = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec sees it installed
    module.init = lambda **settings: runs.append(_FakeWandbRun(**settings)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def _keys(run: _FakeWandbRun, prefix: str) -> dict[int, set[str]]:
    """Per step, the keys logged under ``prefix``."""
    steps: dict[int, set[str]] = {}
    for step, row in run.rows:
        steps.setdefault(step, set()).update(k for k in row if k.startswith(prefix))
    return {s: k for s, k in steps.items() if k}


def test_wandb_runs_are_grouped_per_comparison_with_phases_evals_and_summary(tmp_path, monkeypatch,
                                                                              fake_wandb):
    out = _cli([*TWO_STEPS, "logger=wandb"], tmp_path, monkeypatch)
    exact, vcas = fake_wandb
    for run, sampler in ((exact, "exact"), (vcas, "vcas")):
        assert run.settings["group"] == comparison_group(out) == f"{tmp_path.name}/cmp"
        assert run.settings["name"] == run.settings["job_type"] == sampler
        assert run.settings["config"]["logger"] == "wandb" and run.finished
        steps = [step for step, _ in run.rows]
        assert steps == sorted(steps)  # wandb drops rows whose step goes back
        assert sorted(_keys(run, "train/")) == [1, 2] and sorted(_keys(run, "eval/")) == [2]
        assert "eval/eval_accuracy" in _keys(run, "eval/")[2]
        metrics = json.loads((out / sampler / "metrics.json").read_text())
        assert run.summary["final_train_loss"] == pytest.approx(metrics["final_train_loss"])
        assert run.summary["sampler"] == sampler
    phases = _keys(vcas, "phase/")
    assert sorted(phases) == [0] and {"phase/s", "phase/V_act_over_V_s", "phase/rho_0"} <= phases[0]
    assert not _keys(exact, "phase/") and sorted(_keys(vcas, "monitor/")) == [1, 2]


def test_a_stopped_run_closes_its_logger_without_a_summary(tmp_path, monkeypatch, fake_wandb):
    args = [a for a in TWO_STEPS if not a.startswith("trainer.max_steps=")]
    args += ["sampler=exact", "baselines=[]", "trainer.max_steps=4", "trainer.checkpoint_every=1",
             "trainer.stop_after=1", "logger=wandb"]
    _cli(args, tmp_path, monkeypatch)
    (run,) = fake_wandb
    assert run.finished and run.summary == {} and sorted(_keys(run, "train/")) == [1]


@pytest.mark.parametrize("logger", sorted(LOGGER_PACKAGES))
def test_a_logger_without_its_package_is_refused_in_one_line(logger, monkeypatch):
    real, package = importlib.util.find_spec, LOGGER_PACKAGES[logger]
    missing = lambda name, *args: None if name == package else real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert validate(compose_config([f"logger={logger}"])) == [
        f"logger={logger} needs the {package} package: pip install 'vcas-bench[{package}]'"]


def test_every_logger_setting_has_a_logger():
    assert set(LOGGERS) == set(LOGGER_PACKAGES) == {"wandb", "tensorboard"}
    assert validate(compose_config(["logger=null"])) == []
