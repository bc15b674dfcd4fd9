"""scripts/combine_runs.py: the comparison of separate jobs, FLOPs↓ against a scaled exact run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "combine_runs", Path(__file__).resolve().parents[2] / "scripts" / "combine_runs.py")
combine_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(combine_runs)

SHAPES = {"task": "rt-polarity", "model": "minilm", "batch_size": 32, "accumulate": 1}


def _write(folder: Path, sampler: str, **metrics) -> None:
    (folder / sampler).mkdir(parents=True)
    (folder / sampler / "metrics.json").write_text(json.dumps({"sampler": sampler, **SHAPES, **metrics}))


def test_flops_reduction_against_an_exact_run_of_fewer_steps(tmp_path):
    exact = tmp_path / "exact-400"
    _write(exact, "exact", steps=400, flops_total=400 * 3.0)
    jobs = tmp_path / "jobs"
    _write(jobs, "vcas-plus", steps=2000, flops_total=2000 * 3.0 * 0.7, time_reduction=0.5, train_time_s=9.0)
    _write(jobs, "vcas", steps=2000, flops_total=2000 * 3.0 * 0.8)
    combine_runs.main([str(jobs), "--exact", str(exact / "exact" / "metrics.json")])
    rows = json.loads((jobs / "comparison.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["vcas", "vcas-plus"]
    assert rows[0]["flops_reduction_measured"] == pytest.approx(0.2)
    assert rows[1]["flops_reduction_measured"] == pytest.approx(0.3)
    assert "time_reduction" not in rows[1] and "train_time_s" not in rows[1]  # jobs shared the machine
    assert "FLOPs↓ measured" in (jobs / "comparison.md").read_text()


def test_job_folders_named_after_an_option_label_the_rows(tmp_path):
    _write(tmp_path / "jobs", "vcas-plus", steps=10, flops_total=10.0)
    (tmp_path / "jobs" / "vcas-plus").rename(tmp_path / "jobs" / "fixed-F")
    _write(tmp_path / "jobs", "exact", steps=10, flops_total=20.0)
    combine_runs.main([str(tmp_path / "jobs")])  # the folder's own exact run is the reference
    rows = json.loads((tmp_path / "jobs" / "comparison.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["exact", "vcas-plus (fixed-F)"]
    assert rows[1]["flops_reduction_measured"] == pytest.approx(0.5)


def test_an_exact_run_of_other_shapes_is_refused(tmp_path):
    _write(tmp_path / "ref", "exact", steps=10, flops_total=10.0, batch_size=16)
    _write(tmp_path / "jobs", "vcas", steps=10, flops_total=5.0)
    with pytest.raises(SystemExit, match="batch_size"):
        combine_runs.main([str(tmp_path / "jobs"), "--exact", str(tmp_path / "ref/exact/metrics.json")])


def test_rows_follow_the_method_order_and_an_unreadable_reference_is_named(tmp_path):
    for sampler in ("vcas", "ub", "sb"):
        _write(tmp_path / "jobs", sampler, steps=10, flops_total=10.0)
    (tmp_path / "ref.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read .*ref.json"):
        combine_runs.main([str(tmp_path / "jobs"), "--exact", str(tmp_path / "ref.json")])
    _write(tmp_path / "jobs", "exact", steps=10, flops_total=20.0)
    combine_runs.main([str(tmp_path / "jobs")])
    rows = json.loads((tmp_path / "jobs" / "comparison.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["exact", "sb", "ub", "vcas"]
