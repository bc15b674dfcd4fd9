"""End-to-end runs through ``run(cfg)``, the function the CLI calls, on the offline tasks."""

from __future__ import annotations

import csv
import json

import pytest

from vcas_bench.train.run import final_train_loss, run

REQUIRED = {"task", "model", "sampler", "seed", "steps", "final_train_loss", "eval_accuracy", "wall_clock_s",
            "train_time_s", "keep_ratio_mean", "flops_reduction_analytic"}
SMALL_TEXT = ["task.args.train_size=320", "task.args.eval_size=64", "task.args.max_length=32"]


def read_metrics(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("task", "model"),
    [("rt-polarity", "minilm"), ("mnist5k", "vit-tiny"), ("digits", "vit-tiny"), ("digits", "timm-vit-tiny")],
)
def test_five_step_exact_run_writes_metrics(make_cfg, tmp_path, task, model):
    extra = SMALL_TEXT if task == "rt-polarity" else ["task.args.train_size=320", "task.args.eval_size=64"]
    cfg = make_cfg(f"task={task}", f"model={model}", "sampler=exact", "baselines=[]", "trainer.max_steps=5",
                   *extra)
    (metrics,) = run(cfg, tmp_path)
    on_disk = read_metrics(tmp_path / "exact" / "metrics.json")
    assert on_disk == json.loads(json.dumps(metrics))
    assert REQUIRED <= on_disk.keys()
    assert on_disk["steps"] == 5 and on_disk["task"] == task and on_disk["model"] == model
    assert 0.0 <= on_disk["eval_accuracy"] <= 1.0
    assert on_disk["final_train_loss"] > 0 and on_disk["train_time_s"] > 0
    with open(tmp_path / "exact" / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert {"step", "loss", "lr", "time_s"} <= rows[0].keys()
    assert (tmp_path / "comparison.md").read_text().startswith("| sampler")


def test_comparison_uses_the_same_init_and_data_order(make_cfg, tmp_path):
    """Exact and VCAS share the model init and the batches: their first-step losses are identical."""
    cfg = make_cfg("task=digits", "model=vit-tiny", "trainer.max_steps=3", "sampler.F=100")
    exact, vcas = run(cfg, tmp_path)
    logs = {}
    for name in ("exact", "vcas"):
        with open(tmp_path / name / "train_log.csv") as handle:
            logs[name] = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert logs["exact"][0] == logs["vcas"][0]
    assert "time_reduction" in vcas and "time_reduction" not in exact
    table = (tmp_path / "comparison.md").read_text()
    assert "| exact" in table and "| vcas" in table


def test_loss_goes_down_on_rt_polarity(make_cfg, tmp_path):
    """MiniLM on rt-polarity, 40 steps: the last 10 losses average well below the first 10."""
    cfg = make_cfg("sampler=exact", "baselines=[]", "trainer.max_steps=40", "task.args.train_size=1280",
                   "task.args.eval_size=256", "task.args.max_length=32")
    (metrics,) = run(cfg, tmp_path)
    with open(tmp_path / "exact" / "train_log.csv") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert metrics["eval_accuracy"] > 0.65


def test_final_train_loss_is_the_mean_of_the_tail():
    assert final_train_loss([5.0] * 5 + [1.0] * 10) == 1.0
    assert final_train_loss(list(range(2000))) == sum(range(1980, 2000)) / 20


@pytest.mark.parametrize("accumulate", [1, 2])
def test_evaluates_once_per_epoch_and_at_the_end(make_cfg, tmp_path, accumulate):
    """160 rows at batch 32: 5 micro-batches an epoch. 7 steps of 1 (or 2) micro-batches cross one (or
    two) epoch ends; each is evaluated once, right after it, and the end once more."""
    cfg = make_cfg("task=digits", "model=vit-tiny", "sampler=exact", "baselines=[]", "trainer.max_steps=7",
                   "task.args.train_size=160", "task.args.eval_size=64", f"trainer.accumulate={accumulate}")
    (metrics,) = run(cfg, tmp_path)
    steps = [e["step"] for e in metrics["evals"]]
    assert steps == ([5, 7] if accumulate == 1 else [3, 5, 7])
