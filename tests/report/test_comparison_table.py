"""The comparison a run ends with: a table a reader scans (few columns, one precision per kind, no
misleading ratio) and the figures of its samplers."""

from __future__ import annotations

from vcas_bench.report.table import LEGEND, NO_SAVING, SHOWN, comparison_rows, markdown_table
from vcas_bench.train.run import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["task=digits", "model=vit-tiny", "trainer.max_steps=2", "task.args.train_size=320",
        "task.args.eval_size=64"]

EXACT = {"sampler": "exact", "final_train_loss": 0.44771, "eval_accuracy": 0.806, "train_time_s": 167.61,
         "time_phases_s": 0.0, "time_optimizer_s": 8.5448, "keep_ratio_mean": 1.0, "steps": 150}
LOSING_VCAS = {"sampler": "vcas", "final_train_loss": 0.40272, "eval_accuracy": 0.805, "train_time_s": 179.8,
               "flops_reduction_analytic": -0.1057, "flops_reduction_measured": -0.032,
               "time_reduction": -0.0724, "keep_ratio_mean": 0.8498, "steps": 150, "final_s": 0.94}
SAVING_VCAS = {**LOSING_VCAS, "flops_reduction_measured": 0.279, "time_reduction": 0.135,
               "time_over_flops_reduction": 0.135 / 0.279}


def _header_and_rows(table: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_the_table_shows_at_most_eight_columns_and_a_legend():
    table = markdown_table(comparison_rows([EXACT, SAVING_VCAS]))
    header, rows = _header_and_rows(table)
    assert len(header) <= 8 and len(SHOWN) <= 10
    assert header[:3] == ["sampler", "train loss", "eval acc"]
    assert table.endswith(LEGEND) and "analytic" in LEGEND and "measured" in LEGEND
    assert rows[0][header.index("train time (s)")] == "167.6"  # one decimal for seconds, never 4
    assert rows[1][header.index("FLOPs↓ measured")] == "27.9%"
    assert rows[1][header.index("Time↓/FLOPs↓")] == "0.48"
    assert rows[0][header.index("Time↓/FLOPs↓")] == "–"  # the reference has none


def test_no_conversion_is_shown_where_nothing_was_saved():
    """Time↓ −7.2% over FLOPs↓ −3.2% is +2.26: shown as a dash, never as a number."""
    ratio_of_losses = {**LOSING_VCAS, "time_over_flops_reduction": -0.0724 / -0.032}
    header, rows = _header_and_rows(markdown_table(comparison_rows([EXACT, ratio_of_losses])))
    assert rows[1][header.index("Time↓/FLOPs↓")] == NO_SAVING
    assert rows[1][header.index("FLOPs↓ analytic")] == "-10.6%"


def test_the_csv_rows_keep_every_metric():
    rows = comparison_rows([EXACT, LOSING_VCAS])
    assert rows[0]["time_optimizer_s"] == 8.5448 and rows[1]["final_s"] == 0.94


def _figures(folder) -> set[str]:
    found = {p.name for p in folder.glob("comparison_*.png")}
    assert all((folder / name).read_bytes()[:8] == PNG_MAGIC for name in found)
    return found


def test_exact_alone_in_two_steps_ends_with_its_loss_figure(make_cfg, tmp_path):
    """No variance phases, no monitor: only the figure it has data for, and no failure. A VCAS run left
    in the folder by an earlier command is not part of this comparison: no variance figure from it."""
    stale = tmp_path / "vcas"
    stale.mkdir()
    (stale / "metrics.json").write_text('{"sampler": "vcas", "sampler_settings": {"tau": 0.025}}')
    (stale / "sampler_log.csv").write_text("step,s,V_act_over_V_s,V_w_over_V_s\n0,0.9,0.01,0.02\n")
    run(make_cfg(*TINY, "sampler=exact", "baselines=[]"), tmp_path)
    assert _figures(tmp_path) == {"comparison_loss_vs_flops.png"}


def test_a_comparison_ends_with_figures_of_all_its_samplers(make_cfg, tmp_path):
    """exact, vcas and vcas-plus in 2 steps (a phase each at step 0): loss, variance and schedule."""
    run(make_cfg(*TINY, "sampler=vcas-plus", "baselines=[exact,vcas]"), tmp_path)
    assert _figures(tmp_path) == {"comparison_loss_vs_flops.png", "comparison_variance.png",
                                  "comparison_schedule.png"}
    assert (tmp_path / "vcas-plus" / "sampler_log.csv").exists()
