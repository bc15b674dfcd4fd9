"""Checkpoint and resume: a run stopped (or killed) and resumed ends exactly where an uninterrupted one does.

Everything is compared on CPU with one thread, where every kernel is deterministic: the logged losses,
keep ratios and VCAS phases (s, rho, nu, variances) must be *equal*, and so must the final parameters
and the evaluation. Only timings differ. The NaN guard must stop before the update and keep the last
good checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vcas_bench.train import build
from vcas_bench.train.run import run
from vcas_bench.train.state import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint

DIGITS = ["task=digits", "model=vit-tiny", "baselines=[]", "task.args.train_size=256",
          "task.args.eval_size=64", "task.batch_size=16", "trainer.num_threads=1",
          "trainer.checkpoint_every=4"]
TIMES = {"time_s", "wall_clock_s", "train_time_s", "time_step_s", "time_optimizer_s", "time_phases_s",
         "time_per_step_ms", "time_forward_s", "time_backward_s", "process_max_rss_mb", "resumed_from_step",
         "timed_steps", "timed_phases", "time_reduction", "time_over_flops_reduction"}
REPO = Path(__file__).resolve().parents[2]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(handle)]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))["model"]


def _assert_same_run(a: Path, b: Path, name: str, metrics_a: dict, metrics_b: dict) -> None:
    assert _rows(a / name / "train_log.csv") == _rows(b / name / "train_log.csv")
    if (a / name / "sampler_log.csv").exists():
        assert _rows(a / name / "sampler_log.csv") == _rows(b / name / "sampler_log.csv")
    model_a, model_b = _final_model(a / name), _final_model(b / name)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    assert {k: v for k, v in metrics_a.items() if k not in TIMES} == {
        k: v for k, v in metrics_b.items() if k not in TIMES}


SETTINGS = {
    "exact": ["sampler=exact"],
    "vcas": ["sampler=vcas", "sampler.F=3", "sampler.tau=0.5"],  # phases every 3 steps, s and rho move
    "vcas-plus-accumulate": ["sampler=vcas-plus", "sampler.F=2", "trainer.accumulate=2"],
    "sb": ["sampler=sb"],
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_stopped_and_resumed_run_equals_uninterrupted(make_cfg, tmp_path, setting):
    """22 steps (an epoch boundary at 16, phases throughout); the interrupted run stops after 10, between
    two checkpoints, and resumes from its step-10 checkpoint in a fresh model, sampler and loader."""
    overrides = [*DIGITS, "trainer.max_steps=22", *SETTINGS[setting]]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    (expected,) = run(make_cfg(*overrides, f"output_dir={whole}"), whole)
    (stopped,) = run(make_cfg(*overrides, f"output_dir={parts}", "trainer.stop_after=10"), parts)
    name = expected["sampler"]
    assert stopped == {"sampler": name, "stopped_at_step": 10}
    assert not (parts / name / "metrics.json").exists()
    (resumed,) = run(make_cfg(*overrides, f"output_dir={parts}", "trainer.resume=auto"), parts)
    assert resumed["resumed_from_step"] == 10 and expected["resumed_from_step"] is None
    if name.startswith("vcas"):
        assert expected["adapt_phases"] >= 6
    _assert_same_run(whole, parts, name, expected, resumed)


def test_resume_from_another_output_dir_or_checkpoint_file(make_cfg, tmp_path):
    """``trainer.resume=<dir>`` (an earlier command's output dir) and ``=<file.pt>`` start a new output dir
    from that checkpoint and end equal to the uninterrupted run; a finished run is not redone."""
    overrides = [*DIGITS, "trainer.max_steps=12", "sampler=exact"]
    whole, first = tmp_path / "whole", tmp_path / "first"
    (expected,) = run(make_cfg(*overrides, f"output_dir={whole}"), whole)
    run(make_cfg(*overrides, f"output_dir={first}", "trainer.stop_after=8"), first)
    checkpoint = first / "exact" / "checkpoints" / f"step_{8:09d}.pt"
    for source in (first, checkpoint):
        out = tmp_path / f"from_{source.name}"
        (resumed,) = run(make_cfg(*overrides, f"output_dir={out}", f"trainer.resume={source}"), out)
        assert resumed["resumed_from_step"] == 8
        _assert_same_run(whole, out, "exact", expected, resumed)
    (again,) = run(make_cfg(*overrides, f"output_dir={whole}", "trainer.resume=auto"), whole)
    assert again == json.loads((whole / "exact" / "metrics.json").read_text())


def test_killed_process_resumes_from_its_last_complete_checkpoint(make_cfg, tmp_path):
    """A real ``SIGKILL``: the CLI runs VCAS in a subprocess and is killed once its step-10 checkpoint is on
    disk (wherever it then is, possibly mid-write); ``trainer.resume=auto`` continues from the newest
    complete checkpoint and ends equal to an uninterrupted run."""
    overrides = [*DIGITS, "trainer.max_steps=80", "sampler=vcas", "sampler.F=3", "sampler.tau=0.5",
                 "trainer.checkpoint_every=5", "trainer.flops_every=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "vcas_bench", *overrides, "trainer.progress=false", "trainer.device=cpu",
               f"output_dir={killed}"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = killed / "vcas" / "checkpoints" / f"step_{10:09d}.pt"
    deadline = time.monotonic() + 240
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (killed / "vcas" / "metrics.json").exists()
    (expected,) = run(make_cfg(*overrides, f"output_dir={whole}"), whole)
    (resumed,) = run(make_cfg(*overrides, f"output_dir={killed}", "trainer.resume=auto"), killed)
    assert 10 <= resumed["resumed_from_step"] < 80
    _assert_same_run(whole, killed, "vcas", expected, resumed)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    """A half-written temporary file is never taken for a checkpoint; only the newest ``keep`` stay."""
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, step, {"sampler": "exact", "ranks": []}, keep=2)
    (tmp_path / "checkpoints" / ".step_000000012.pt.partial").write_bytes(b"\x80torn")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_000000006.pt", "step_000000009.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 9


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss); an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _poison(monkeypatch, call: int, poison) -> None:
    """Let the ``call``-th forward's per-example losses go through ``poison``."""
    make_loss_fn, calls = build.build_loss_fn, []

    def poisoned(*args):
        loss_fn = make_loss_fn(*args)

        def fn(batch):
            losses, logits = loss_fn(batch)
            calls.append(1)
            return (poison(losses) if len(calls) == call else losses), logits

        return fn

    monkeypatch.setattr(build, "build_loss_fn", poisoned)


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    """The loss turns NaN in step 7 (checkpoints every 2 steps): the run stops naming step 7 and the loss,
    and the step-6 checkpoint is the newest, intact and finite."""
    _poison(monkeypatch, 7, lambda losses: losses * math.nan)
    cfg = make_cfg(*DIGITS, "sampler=exact", "trainer.max_steps=10", "trainer.checkpoint_every=2")
    with pytest.raises(FloatingPointError, match=r"exact: loss is nan at step 7; stopped before the update; "
                                                 r"last good checkpoint: .*step_000000006\.pt"):
        run(cfg, tmp_path)
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "exact"))
    assert checkpoint["step"] == 6
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint["model"].values())


def test_update_that_breaks_the_weights_is_not_checkpointed(make_cfg, tmp_path, monkeypatch):
    """Step 3 has a finite loss but an infinite gradient: Adam turns the weights to NaN; the checkpoint after
    step 3 is refused, the run stops naming the step, and the step-2 checkpoint stays the newest."""
    _poison(monkeypatch, 3, _InfiniteGradient.apply)
    cfg = make_cfg(*DIGITS, "sampler=exact", "trainer.max_steps=6", "trainer.checkpoint_every=1")
    with pytest.raises(FloatingPointError, match=r"exact: parameters became non-finite at step 3 .*not "
                                                 r"checkpointed; last good checkpoint: .*step_000000002\.pt"):
        run(cfg, tmp_path)
    assert load_checkpoint(latest_checkpoint(tmp_path / "exact"))["step"] == 2


def test_a_checkpoint_resumes_only_with_the_world_size_that_wrote_it():
    """Shards and per-rank generators continue only with the same split: a two-rank checkpoint refuses one."""
    checkpoint = {"step": 8, "ranks": [{}, {}]}
    with pytest.raises(ValueError, match="step 8 was written by 2 rank.s.; resume it with 2, not 1"):
        TrainState.load(None, checkpoint, rank=0, world=1)
