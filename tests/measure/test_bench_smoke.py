"""`make bench`, `scripts/sync_check.py` and `scripts/gpu_check.sh` on one tiny case, in seconds: the
entry points the GPU check runs (``--device``, ``--dtype bf16``) work on the CPU and write what they
claim. Not a benchmark: one repeat, no numbers checked beyond their meaning."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_runs_one_tiny_case(tmp_path, dtype):
    compile_flag = "--compile" if dtype == "fp32" else "--no-compile"
    record = _script("bench_backward").main([
        "--cases", "tiny-bert-16", "--grid", "0.5:0.5", "--repeats", "1", "--warmup", "0",
        "--flop-draws", "1", "--no-profile", "--no-phases", compile_flag, "--runs", "", "--device", "cpu",
        "--dtype", dtype,        "--out", str(tmp_path), "--tag", "smoke"])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(record["rows"]))
    row = record["rows"][0]
    for variant in ("reference", "sampled", "static"):
        assert row[variant]["flops_down"] > 0 and row[variant]["peak_memory_ratio"] > 0
    syncs = record["syncs"][0]
    assert syncs["exact"]["backward"] == 0 and syncs["static"]["backward"] == 0
    assert 0 < syncs["sampled"]["backward"] <= syncs["blocks"]
    if dtype == "fp32":
        breaks = record["graph_breaks"][0]
        assert all(isinstance(breaks[v]["graph_breaks"], int) for v in ("exact", "sampled", "static")), breaks
    table = (tmp_path / "smoke.md").read_text()
    assert "tiny-bert-16" in table and "Host syncs" in table
    ckpt = row["checkpointed"]["vs_exact_ckpt"]
    assert ckpt["flops_down"] > 0 and row["exact-ckpt"]["flops_down"] < 0  # a re-run costs a forward
    assert 0 <= row["sampled"]["samplew_padding_share"] < 1
    assert "Checkpointed" in table and "Targets" in table
    rendered = _script("bench_backward").main(["--render-only", "--out", str(tmp_path), "--tag", "smoke",
                                               "--runs", ""])
    assert rendered["rows"] == saved["rows"] and (tmp_path / "smoke.md").read_text() == table


def test_docs_quote_the_committed_bench_targets():
    """docs/benchmarks.md's targets table is the one the committed CPU record gives (not retyped)."""
    from vcas_bench.report.bench import targets_markdown

    record = json.loads((ROOT / "results/bench/backward-cpu.json").read_text())
    assert targets_markdown(record) in (ROOT / "docs/benchmarks.md").read_text()


def test_sync_check_counts_every_sampler(tmp_path):
    counts = _script("sync_check").main(["--device", "cpu", "--layers", "1,2", "--out", str(tmp_path)])
    by = {(c["sampler"], c["layers"]): c for c in counts}
    assert by[("exact", 2)]["backward"] == 0 and by[("vcas-static", 2)]["backward"] == 0
    assert by[("vcas", 2)]["backward"] <= 2
    assert by[("sb", 2)]["backward"] == 0 and by[("ub", 2)]["backward"] == 0
    assert all(c["cuda_warnings"] is None for c in counts)  # the CPU has no sync debug mode
    assert (tmp_path / "syncs-cpu.md").read_text().startswith("Host syncs per step")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
