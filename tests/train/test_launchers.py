"""Sweeps: the launcher presets compose, and jobs run one after another in one process (Hydra's basic
launcher) leave nothing behind that changes the next job."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra

from vcas_bench import cli
from vcas_bench.train.run import run

TIMES = {"time_s", "wall_clock_s", "train_time_s", "time_step_s", "time_optimizer_s", "time_phases_s",
         "time_per_step_ms", "time_forward_s", "time_backward_s", "process_max_rss_mb", "timed_steps",
         "timed_phases"}
JOB = ["task=digits", "model=vit-tiny", "sampler=vcas", "baselines=[]", "sampler.F=2", "trainer.max_steps=4",
       "task.batch_size=16", "task.args.train_size=128", "task.args.eval_size=32", "trainer.num_threads=1",
       "trainer.progress=false", "trainer.device=cpu"]


@pytest.mark.parametrize(("preset", "target"), [
    ("local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_presets_compose(preset, target):
    cfg = compose_config([f"hydra/launcher={preset}"], hydra=True)
    assert cfg.hydra.launcher._target_ == target


def _result(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "train_log.csv") as handle:
        log = [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(handle)]
    return {k: v for k, v in metrics.items() if k not in TIMES}, log


def test_two_job_multirun_in_one_process_equals_the_jobs_run_alone(make_cfg, tmp_path, monkeypatch):
    """``vcas-bench -m seed=0,1 ...`` (basic launcher: both jobs in this process) writes the same metrics
    and training logs as ``run`` called afresh for each seed."""
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["vcas-bench", "-m", *JOB, "seed=0,1", f"hydra.sweep.dir={sweep}"])
    try:
        cli.main()
    finally:
        GlobalHydra.instance().clear()
    for seed in (0, 1):
        alone = tmp_path / f"alone{seed}"
        run(make_cfg(*JOB, f"seed={seed}", f"output_dir={alone}"), alone)
        swept_metrics, swept_log = _result(sweep / str(seed) / "vcas")
        alone_metrics, alone_log = _result(alone / "vcas")
        assert swept_metrics["seed"] == seed
        assert swept_metrics == alone_metrics and swept_log == alone_log
