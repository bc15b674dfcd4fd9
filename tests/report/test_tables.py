"""The paper tables (checked against docs/method.md §14) and the generated tables and figures."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from vcas_bench.report.plots import sweep_lines
from vcas_bench.report.runs import METHOD_ORDER, read_comparison
from vcas_bench.report.sweeps import read_sweep
from vcas_bench.report.tables import TABLES, make_tables, variant

REPO = Path(__file__).resolve().parents[2]
PAPER_DIR = REPO / "results" / "paper"
METHOD_DOC = REPO / "docs" / "method.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- paper numbers vs. the doc
def _md_table(number: int) -> list[list[str]]:
    """Rows (header first, separator dropped) of the markdown table under ``### Table <number>``."""
    text = METHOD_DOC.read_text()
    section = re.search(rf"^### Table {number} .*?$(.*?)(?=^###|^---)", text, re.M | re.S).group(1)
    block = re.search(r"(^\|.*\n)+", section, re.M).group(0).splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    return [rows[0], *rows[2:]]


def _paper(number: int) -> list[dict[str, str]]:
    with open(PAPER_DIR / f"table{number}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _blank(cell: str) -> str:
    return "" if cell == "–" else cell


def test_table1_transcribed_exactly():
    rows = {(r["paper_task"], r["dataset"], r["method"]): r for r in _paper(1)}
    _, *body = _md_table(1)
    assert len(rows) == 4 * len(body) == 60
    for task, dataset, *cells in body:
        for method, cell in zip(["exact", "SB", "UB", "VCAS"], cells):
            row, parts = rows[(task, dataset, method)], [p.strip() for p in cell.split("/")]
            assert [row["train_loss"], row["eval_acc"]] == parts[:2], (task, dataset, method)
            if method == "VCAS":
                assert row["flops_reduction_pct"] == parts[2], (task, dataset)
    assert {r["source"] for r in rows.values()} == {"paper"}


@pytest.mark.parametrize("number", [2, 3, 8])
def test_wallclock_tables_transcribed_exactly(number):
    _, *body = _md_table(number)
    keys = ["method", "train_loss", "eval_acc", "wall_clock_h", "flops_reduction_pct", "time_reduction_pct"]
    assert [[r[k] for k in keys] for r in _paper(number)] == [[_blank(c) for c in row] for row in body]


@pytest.mark.parametrize("number", [4, 5, 6, 7])
def test_ablation_tables_transcribed_exactly(number):
    header, loss, acc, flops = _md_table(number)
    values = ["0" if h.startswith("0 (exact)") else h for h in header[1:]]
    expected = [[v, a, b, _blank(c)] for v, a, b, c in zip(values, loss[1:], acc[1:], flops[1:])]
    keys = ["value", "train_loss", "eval_acc", "flops_reduction_pct"]
    assert [[r[k] for k in keys] for r in _paper(number)] == expected


def test_table9_transcribed_exactly():
    _, *body = _md_table(9)
    keys = ["method", "loss", "mnli_m", "mnli_mm", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte",
            "glue_avg"]
    assert [[r[k] for k in keys] for r in _paper(9)] == body


def test_every_paper_file_is_labelled():
    for number in range(1, 10):
        assert {r["source"] for r in _paper(number)} == {"paper"}
    assert "2402.17227" in (PAPER_DIR / "README.md").read_text()


# ------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(("sampler", "settings", "F", "expected"), [
    ("vcas", {"tau": 0.025, "tau_act": None, "tau_w": None, "alpha": 0.01, "M": 2}, 25.0, "tau=0.025, F=25"),
    ("vcas", {"tau": 0.025, "tau_act": 0.05, "tau_w": None}, None, "tau-act=0.05, tau-w=0.025, F=?"),
    ("vcas", {"tau": 0.1, "alpha": 0.02}, 50.0, "tau=0.1, F=50, alpha=0.02"),
    ("sb", {"beta": 2.0, "fixed_ratio": None}, None, "beta=2.0"),
    ("ub", {"ratio": 0.5, "tau_th": None}, None, "ratio=0.5"),
    ("exact", {}, None, "–"),
])
def test_variant_names_the_settings_that_keep_runs_apart(sampler, settings, F, expected):
    assert variant(sampler, settings, F) == expected


# ------------------------------------------------------------------------------- a fixture results/
SETTINGS = {"exact": {}, "sb": {"beta": 2.0, "history": 1024, "fixed_ratio": 0.3333},
            "ub": {"ratio": 1 / 3, "tau_th": None}}
STEPS = 20


def _write_run(folder: Path, sampler: str, seed: int = 0, tau: float = 0.025, F: int = 5, **values) -> None:
    """A run folder like ``run_one`` leaves: metrics.json, train_log.csv, and sampler_log.csv for VCAS."""
    vcas = {"tau": tau, "tau_act": None, "tau_w": None, "alpha": 0.01, "beta": 0.95, "M": 2, "F": None}
    settings = SETTINGS.get(sampler, vcas)
    metrics = {"task": "rt-polarity", "model": "minilm", "sampler": sampler, "seed": seed, "steps": STEPS,
               "batch_size": 32, "device": "cpu", "sampler_settings": settings, "experiment": None, **values}
    if sampler.startswith("vcas"):
        metrics["vcas_F"] = F
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    cost = 1.0 if sampler == "exact" else 0.6
    log = pd.DataFrame({"step": range(1, STEPS + 1), "epoch": 0, "loss": [1 / (1 + s) for s in range(STEPS)],
                        "lr": 1e-4, "time_s": 0.1, "keep_ratio": cost, "analytic_cost": cost})
    log.to_csv(folder / "train_log.csv", index=False)
    if sampler.startswith("vcas"):
        phases = range(0, STEPS, F)
        pd.DataFrame({"step": phases, "s": [1 - 0.01 * i for i, _ in enumerate(phases)], "rho_mean": 0.9,
                      "nu_mean": 0.8, "V_act_over_V_s": 0.02, "V_w_over_V_s": 0.01, "phase_cost": 0.3,
                      "rho_0": 0.95, "rho_1": 0.85, "nu_0": 0.8, "nu_1": 0.8}).to_csv(
            folder / "sampler_log.csv", index=False)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """results/ with a full comparison, a second VCAS seed, a second τ and a second F; tables built."""
    results = tmp_path_factory.mktemp("results")
    main = results / "proxy" / "table1_sst2"
    _write_run(main / "exact", "exact", final_train_loss=0.30, eval_accuracy=0.80, train_time_s=100.0,
               flops_reduction_analytic=0.0, flops_reduction_measured=0.0)
    _write_run(main / "sb", "sb", final_train_loss=0.50, eval_accuracy=0.70, train_time_s=80.0,
               flops_reduction_analytic=0.4444, time_reduction=0.2)
    _write_run(main / "ub", "ub", final_train_loss=0.40, eval_accuracy=0.75, flops_reduction_analytic=0.4444)
    _write_run(main / "vcas", "vcas", final_train_loss=0.32, eval_accuracy=0.81, train_time_s=90.0,
               flops_reduction_analytic=0.40, flops_reduction_measured=0.30, time_reduction=0.1)
    _write_run(results / "proxy" / "seed1" / "vcas", "vcas", seed=1, final_train_loss=0.34,
               eval_accuracy=0.79, flops_reduction_analytic=0.42)
    _write_run(results / "proxy" / "tau" / "vcas", "vcas", tau=0.1, final_train_loss=0.36, eval_accuracy=0.78,
               flops_reduction_analytic=0.5)
    _write_run(results / "proxy" / "F" / "vcas", "vcas", F=10, final_train_loss=0.33, eval_accuracy=0.82,
               flops_reduction_analytic=0.45)
    _write_run(results / "bench" / "x", "vcas", final_train_loss=99.0)  # not a run: must be skipped
    out = results / "tables"
    make_tables(results, out, paper_dir=PAPER_DIR)
    return out


def _read(out: Path, number: int) -> pd.DataFrame:
    return pd.read_csv(out / f"table{number}.csv", dtype=str, keep_default_na=False)


def _row(table: pd.DataFrame, **match) -> pd.Series:
    rows = table[(table[list(match)] == pd.Series(match)).all(axis=1)]
    assert len(rows) == 1, (match, rows)
    return rows.iloc[0]


def test_table1_puts_our_means_beside_the_paper(tables):
    t1 = _read(tables, 1)
    vcas = _row(t1, paper_task="BERT-base finetuning", dataset="SST-2", method="VCAS",
                ours_variant="tau=0.025, F=5")
    assert vcas["paper_train_loss"] == "0.0600" and vcas["paper_flops_reduction_pct"] == "48.28"
    assert vcas["ours_n"] == "2" and float(vcas["ours_train_loss"]) == pytest.approx(0.33)
    assert float(vcas["ours_eval_acc_pct"]) == pytest.approx(80.0)
    assert float(vcas["ours_flops_reduction_analytic_pct"]) == pytest.approx(41.0)
    assert float(vcas["ours_flops_reduction_measured_pct"]) == pytest.approx(30.0)  # the one run that has it
    assert vcas["ours_setting"] == "rt-polarity / minilm / 20 steps, bs 32 (CPU proxy)"
    sb = _row(t1, paper_task="BERT-base finetuning", dataset="SST-2", method="SB")
    assert sb["ours_flops_reduction_measured_pct"] == "–" and sb["paper_eval_acc_pct"] == "92.63"
    assert sb["ours_variant"] == "ratio=0.3333" and float(sb["ours_flops_reduction_analytic_pct"]) == 44.44
    mnli = _row(t1, paper_task="BERT-large finetuning", dataset="MNLI-m", method="UB")
    assert mnli["ours_train_loss"] == "not run" and mnli["paper_train_loss"] == "0.2266"
    assert "99.0" not in (tables / "table1.csv").read_text()  # results/bench/ is not a run


def test_wallclock_tables_convert_time_to_flops(tables):
    t2 = _read(tables, 2)
    sb = _row(t2, method="SB")
    assert sb["paper_wall_clock_h"] == "4.320" and sb["paper_time_per_flops"] == "0.48"  # 21.14 / 44.44
    assert float(sb["ours_time_reduction_pct"]) == pytest.approx(20.0)
    assert float(sb["ours_time_per_flops_analytic"]) == pytest.approx(20.0 / 44.44)
    assert _row(t2, method="exact")["ours_time_reduction_pct"] == "–"
    assert set(_read(tables, 3)["ours_setting"]) == {"not run"}  # no ViT stand-in ran


def test_tau_and_F_ablations_group_by_the_knob(tables):
    t4 = _read(tables, 4)
    exact = _row(t4, tau="0")
    assert exact["paper_train_loss"] == "0.0559" and float(exact["ours_train_loss"]) == pytest.approx(0.30)
    assert float(_row(t4, tau="0.1")["ours_train_loss"]) == pytest.approx(0.36)
    assert _row(t4, tau="0.05")["ours_eval_acc_pct"] == "not run"
    assert len(t4[t4["tau"] == "0.025"]) == 2  # F=5 (two seeds) and F=10 stay apart
    t6 = _read(tables, 6)
    assert _row(t6, F="10")["paper_train_loss"] == "not in paper"
    f50 = _row(t6, F="50")
    assert f50["ours_train_loss"] == "not run" and f50["paper_train_loss"] == "0.0589"
    for number in (5, 7):
        assert set(_read(tables, number)["ours_setting"]) == {"not run"}


def test_markdown_and_latex_are_written(tables):
    for spec in TABLES:
        md = (tables / f"table{spec.number}.md").read_text()
        assert md.startswith(f"# {spec.title}") and "2402.17227" in md and "not run" in md
        tex = (tables / f"table{spec.number}.tex").read_text()
        spec_cols = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
        body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
        header = tex.split("\\toprule")[1].split("\\midrule")[0]
        for line in [header, *body.strip().splitlines()]:
            assert line.strip().endswith("\\\\") and line.count(" & ") == len(spec_cols) - 1, line
        assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    assert "0.0600" in (tables / "table1.md").read_text()
    readme = (tables / "README.md").read_text()
    assert "| `rt-polarity` | SST-2 |" in readme and "table1.md" in readme


def test_figures_are_nonempty_pngs_named_after_the_comparison(tables):
    names = {p.name for p in tables.glob("*.png")}
    for comparison in ("table1_sst2", "seed1", "tau", "F"):
        for kind in ("loss_vs_flops", "variance", "schedule"):
            assert f"{comparison}_{kind}.png" in names
    for path in tables.glob("*.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert "table1_sst2_schedule.png" in (tables / "README.md").read_text()


# ------------------------------------------------------------------------- the reader and the sweeps
def _overrides(folder: Path, overrides: list[str]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_the_reader_lists_a_comparison_in_method_order_with_its_logs_and_overrides(tmp_path):
    jobs = {"zeta": "zeta", "vcas-plus": "vcas-plus", "fixed-F": "vcas-plus", "vcas": "vcas",
            "infobatch": "infobatch", "ub": "ub", "sb": "sb", "exact": "exact"}
    for job, sampler in jobs.items():
        _write_run(tmp_path / job, sampler)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{")  # skipped with a warning
    _overrides(tmp_path, ["sampler.tau=0.1", "trainer.progress=false"])
    runs = read_comparison(tmp_path)
    assert [r.label for r in runs] == [*METHOD_ORDER, "vcas-plus (fixed-F)", "zeta"]
    vcas = runs[METHOD_ORDER.index("vcas")]
    assert vcas.overrides == ("sampler.tau=0.1", "trainer.progress=false")  # the comparison's record
    assert list(vcas.sampler_log["step"]) == [0, 5, 10, 15] and vcas.variance_log is None
    assert runs[0].sampler_log is None and list(runs[0].train_log["step"]) == list(range(1, STEPS + 1))


def _write_sweep(results: Path) -> Path:
    """A τ sweep as Hydra leaves it (jobs 0-2 out of τ order) and its exact reference run apart."""
    sweep = results / "proxy" / "tau-sweep"
    for job, tau in (("0", 0.1), ("1", 0.025), ("2", 0.5)):
        _write_run(sweep / job / "vcas", "vcas", tau=tau)
        _overrides(sweep / job, ["experiment=x", f"sampler.tau={tau}", "trainer.progress=False"])
    _write_run(sweep / "exact" / "exact", "exact")
    _overrides(sweep / "exact", ["experiment=x", "sampler=exact", "baselines=[]", "trainer.progress=false"])
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    return sweep


def test_a_sweep_labels_its_jobs_by_the_swept_value_in_its_order(tmp_path):
    sweep = read_sweep(_write_sweep(tmp_path))
    assert sweep.knobs == ("sampler.tau",)  # trainer.progress=False vs false swept nothing
    assert [job.label for job in sweep.jobs] == ["exact", "tau=0.025", "tau=0.1", "tau=0.5"]
    lines = sweep_lines(sweep)
    assert [line.label for line in lines] == ["exact", "tau=0.025", "tau=0.1", "tau=0.5"]
    assert lines[0].color == "k" and len({line.color for line in lines}) == 4


def test_make_tables_draws_one_overlaid_figure_set_per_sweep_and_every_comparison(tmp_path):
    results = tmp_path / "results"
    _write_sweep(results)
    _write_run(results / "proxy" / "plus" / "vcas-plus", "vcas-plus")  # a comparison without `vcas`
    written = make_tables(results, results / "tables", paper_dir=PAPER_DIR)
    kinds = ("loss_vs_flops", "variance", "schedule")
    assert {p.name for p in written if p.suffix == ".png"} == {f"{name}_{kind}.png" for name in
                                                              ("tau-sweep", "plus") for kind in kinds}
    for path in (results / "tables").glob("*.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert "tau-sweep_loss_vs_flops.png" in (results / "tables" / "README.md").read_text()
