"""The variance monitor: its bias statistic flags SB and UB without reweighting and passes UB and VCAS;
its variance is VCAS's own phase estimate; its cost stays out of the sampler's FLOPs and time, and a
monitored run trains exactly as an unmonitored one."""

from __future__ import annotations

import csv

import pytest
import torch
from test_baselines import _tiny_bert
from torch.utils.data import Dataset

from vcas_bench.samplers import create_sampler
from vcas_bench.samplers import ub as ub_module
from vcas_bench.train.monitor import MonitorSettings, VarianceMonitor, statistics
from vcas_bench.train.run import run

ROWS, BATCH = 64, 16


class _Rows(Dataset):
    """64 random token rows of the tiny BERT's vocabulary (seed 2), a third of them padded."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, 100, (ROWS, 8), generator=g)
        self.mask = torch.ones(ROWS, 8, dtype=torch.long)
        self.mask[::3, 5:] = 0
        self.labels = torch.randint(0, 3, (ROWS,), generator=g)

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _measure(name: str, draws: int, batches: int = 2, step: int = 0, setup=None, **settings):
    model, _, loss_fn = _tiny_bert()
    sampler = create_sampler(name, seed=0, **settings)
    sampler.attach(model, "BertLayer", total_steps=100)
    if setup is not None:
        setup(sampler)
    monitor = VarianceMonitor(MonitorSettings(every=1, batches=batches, draws=draws, param_sample_ratio=1.0),
                              _Rows(), BATCH, "BertLayer", seed=0)
    sample = monitor.gradients(step, model, sampler, loss_fn)
    return statistics(sample), sample, (model, sampler, loss_fn, monitor)


def _vcas_at(nu: float):
    """rho = 0.5 in every block and ``nu`` in every linear (nu = 1: SampleA only)."""

    def setup(sampler):
        ctl = sampler.controller
        ctl.engine.rho = [0.5] * ctl.engine.num_blocks
        for slot in ctl.engine.linears:
            slot.nu = nu

    return setup


def _unweighted(p, draws, generator):
    """UB without its 1/(N p) reweighting: biased toward high-bound examples (the negative control)."""
    idx = torch.multinomial(p, draws, replacement=True, generator=generator)
    return torch.bincount(idx, minlength=len(p)).float() / draws


CASES = {"ub": ("ub", {}), "vcas": ("vcas", {"setup": _vcas_at(0.5)}), "sb": ("sb", {}),
         "ub-unweighted": ("ub", {})}


@pytest.mark.parametrize("case", list(CASES))
def test_bias_statistic_flags_sb_and_the_unweighted_control_and_passes_ub_and_vcas(case, monkeypatch):
    """Tiny float64 BERT (test_baselines), 2 batches of 16 x 48 draws, every block-weight entry. Without
    bias ||mean(G_ij - G_i)||^2 is what the draws' scatter explains: bias_z ~ 1 (0.5-1.3 seen) and
    |bias_sq| / V_s < 0.02 (0.002 seen). SB (unweighted, high losses) and UB without 1/(N p) read
    bias_z > 10 (30-440 seen) and bias_sq / V_s > 0.1 (0.3-1.7 seen)."""
    name, kw = CASES[case]
    if case == "ub-unweighted":
        monkeypatch.setattr(ub_module, "importance_weights", _unweighted)
    stats, _, _ = _measure(name, 48, **kw)
    assert stats["V_s"] > 0 and stats["V_extra"] > 0
    if case in ("ub", "vcas"):
        assert stats["bias_z"] < 2 and abs(stats["bias_over_V_s"]) < 0.02, stats
    else:
        assert stats["bias_z"] > 10 and stats["bias_over_V_s"] > 0.1, stats


def test_exact_reads_no_extra_variance_and_no_bias():
    stats, _, _ = _measure("exact", 2)
    assert stats["V_s"] > 0 and stats["V_extra"] == 0 and stats["bias_sq"] == 0 and stats["bias_z"] == 0


def _phase(sampler, loss_fn, monitor, step: int = 0):
    """VCAS's own variance phase (its M) on the monitor's batches of ``step``."""
    batches = monitor.fresh_batches(step)
    return sampler.controller.variance.estimate(lambda b: loss_fn(b)[0].mean(), batches, {1: 1.0, -1: 1.0})


def test_monitored_variance_is_vcas_phase_estimate_on_the_same_draws():
    """SampleA only (nu = 1), M = 4 batches x 4 draws, all entries: the monitor restores VCAS's generator,
    so the phase then draws exactly what the monitor drew. V_s and V_extra = V_act to 1e-6 relative."""
    stats, _, (_, sampler, loss_fn, monitor) = _measure("vcas", 4, batches=4, setup=_vcas_at(1.0), M=4,
                                                        param_sample_ratio=1.0)
    est = _phase(sampler, loss_fn, monitor)
    assert stats["V_s"] == pytest.approx(sum(est.V_s_layer), rel=1e-6)
    assert stats["V_extra"] == pytest.approx(est.V_act, rel=1e-6) and est.V_act > 0


def test_monitored_variance_is_v_act_plus_v_w_with_weight_sampling():
    """rho = nu = 0.5: the monitor sees SampleA and SampleW together; by the law of total variance its
    V_extra (4 batches x 32 draws) is the phase's V_act + V_w (M = 4: 16 SampleA draws, V_w in closed
    form) within 20% (2% seen: 0.2096 vs 0.2060)."""
    stats, _, (_, sampler, loss_fn, monitor) = _measure("vcas", 32, batches=4, setup=_vcas_at(0.5), M=4,
                                                        param_sample_ratio=1.0)
    est = _phase(sampler, loss_fn, monitor)
    total = est.V_act + sum(est.V_w_layer)
    assert sum(est.V_w_layer) > 0.05 * total  # SampleW's part is there to be seen
    assert stats["V_extra"] == pytest.approx(total, rel=0.2)


TIMES = {"time_s", "wall_clock_s", "train_time_s", "time_step_s", "time_optimizer_s", "time_phases_s",
         "time_per_step_ms", "time_forward_s", "time_backward_s", "process_max_rss_mb", "timed_steps",
         "timed_phases"}


def _log(path) -> list[dict[str, str]]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(handle)]


@pytest.mark.parametrize("sampler", [["sampler=vcas", "sampler.F=3", "sampler.tau=0.5"],
                                     ["sampler=infobatch"]])
def test_monitor_cost_is_its_own_and_leaves_training_unchanged(make_cfg, tmp_path, sampler):
    """digits / vit-tiny, 8 steps, monitor every 2 steps (4 measurements, 2 counted): the monitored run
    logs the same losses, phases and measured FLOPs as the unmonitored one (the monitor restores the RNG,
    the sampler and the buffers, and runs outside the timer and meter); its own FLOPs are > 0 and
    reported apart, in variance_log.csv and metrics.json."""
    base = ["task=digits", "model=vit-tiny", "baselines=[]", "task.args.train_size=128",
            "task.args.eval_size=32", "task.batch_size=16", "trainer.num_threads=1", "trainer.max_steps=8",
            "trainer.flops_every=4", *sampler]
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    (a,) = run(make_cfg(*base, f"output_dir={plain}"), plain)
    (b,) = run(make_cfg(*base, f"output_dir={watched}", "monitor.enabled=true", "monitor.every=2"), watched)
    name = a["sampler"]
    assert _log(plain / name / "train_log.csv") == _log(watched / name / "train_log.csv")
    if name == "vcas":
        assert _log(plain / name / "sampler_log.csv") == _log(watched / name / "sampler_log.csv")
    assert b["flops_total"] == a["flops_total"] and a["flops_total"] > 0
    assert b["monitor_measurements"] == 4 and b["monitor_flops"] > 0 and b["monitor_time_s"] > 0
    rows = _log(watched / name / "variance_log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8] and {r["sampler"] for r in rows} == {name}
    assert all(float(r["V_s"]) > 0 and float(r["V_extra"]) >= 0 for r in rows)
    assert "monitor_measurements" not in a and not (plain / name / "variance_log.csv").exists()


def test_fig5_plot_of_every_sampler_is_written_from_a_run_folder(tmp_path):
    """A synthetic comparison folder (five samplers' metrics.json and variance_log.csv, no other logs):
    plot_comparison writes <name>_variance_monitor.png, a non-empty PNG, with τ taken from the VCAS run."""
    import json

    from vcas_bench.report.files import write_csv
    from vcas_bench.report.plots import plot_comparison

    steps = [10, 20, 30, 40]
    levels = {"exact": 0.0, "sb": 0.8, "ub": 0.4, "infobatch": 0.05, "vcas": 0.025}
    for sampler, level in levels.items():
        run_dir = tmp_path / "runs" / sampler
        run_dir.mkdir(parents=True)
        settings = {"tau": 0.025, "tau_act": None, "tau_w": None} if sampler == "vcas" else {}
        (run_dir / "metrics.json").write_text(json.dumps(
            {"sampler": sampler, "task": "digits", "model": "vit-tiny", "steps": 40, "seed": 0,
             "device": "cpu", "sampler_settings": settings}))
        write_csv(run_dir / "variance_log.csv", [
            {"step": s, "sampler": sampler, "V_s": 1.0, "V_extra": level * (1 + 0.1 * i),
             "extra_over_V_s": level * (1 + 0.1 * i), "bias_z": 400.0 if sampler == "sb" else 1.0}
            for i, s in enumerate(steps)])
    written = plot_comparison(tmp_path / "runs", tmp_path / "figures", "toy")
    path = tmp_path / "figures" / "toy_variance_monitor.png"
    assert path in written
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_exact_passes_turn_off_the_engine_vcas_drives_on_a_cnn():
    """A CNN under VCAS has no wrapped linear pointing at the engine: the sampler names it
    (``OwnsRowEngine``), so the monitor's exact passes still sample nothing."""
    from test_vcas_cnn import _wrn

    from vcas_bench.samplers import OwnsRowEngine
    from vcas_bench.train.monitor import _engines, _exact_backward

    model = _wrn().model
    sampler = create_sampler("vcas")
    sampler.attach(model, "BasicBlock", 100)
    assert isinstance(sampler, OwnsRowEngine)
    engine = sampler.controller.engine
    assert not any(hasattr(m, "_vcas_engine") for m in model.modules())
    assert _engines(model, sampler) == [engine]
    with _exact_backward(model, sampler):
        assert not engine.sample_activations and not engine.sample_weights
    assert engine.sample_activations
    sampler.detach()
