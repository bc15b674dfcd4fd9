"""Config resolved at the edge, defined once: the samplers' YAML, their ``Settings`` and ``VcasConfig`` agree,
``sampler_specs`` resolves what ``run()`` gets, and nothing below the CLI reads YAML."""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from vcas_bench.config import SamplerSpec, sampler_specs
from vcas_bench.report.tables import VCAS_DEFAULTS
from vcas_bench.samplers import SAMPLERS, PhaseReport, create_sampler, sampler_settings
from vcas_bench.vcas import VcasConfig
from vcas_bench.vcas.config import PLUS_PRESET

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "sampler" / f"{name}.yaml"))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_each_sampler_yaml_is_its_settings_defaults(name):
    """``conf/sampler/<name>.yaml`` names the sampler and repeats its ``Settings`` defaults, nothing else."""
    node = _yaml(name)
    assert node.pop("name") == name
    defaults = asdict(sampler_settings(name)())
    assert set(node) <= set(defaults), f"{name}.yaml has settings its Settings lacks"
    assert {k: defaults[k] for k in node} == node


@pytest.mark.parametrize(("name", "config"), [("vcas", VcasConfig()), ("vcas-plus", VcasConfig.plus())])
def test_vcas_settings_and_yaml_are_vcas_config(name, config):
    """The runner's defaults are VcasConfig's (paper) and VcasConfig.plus()'s: built with the same F and
    seed, the default Settings give exactly that config; the YAML lists every field the preset sets."""
    settings = sampler_settings(name)()
    assert settings.to_config(F=config.F, seed=config.seed) == config
    node = _yaml(name)
    assert node["tau"] == config.tau_act == config.tau_w and node["F"] is None
    shown = {k: v for k, v in node.items() if k not in ("name", "tau", "tau_act", "tau_w", "F")}
    assert shown == {k: getattr(config, k) for k in shown}
    if name == "vcas-plus":
        assert set(PLUS_PRESET) <= set(node)


def test_the_report_names_variants_against_the_paper_defaults():
    assert VCAS_DEFAULTS == {k: getattr(VcasConfig(), k) for k in VCAS_DEFAULTS}
    assert VCAS_DEFAULTS == {"alpha": 0.01, "beta": 0.95, "M": 2, "rho_ema": 0.6, "param_sample_ratio": 0.01}


def test_the_method_card_shows_the_paper_defaults():
    """The hyper-parameter table of vcas_bench/vcas/README.md: every numeric default is VcasConfig's."""
    card = (ROOT / "vcas_bench" / "vcas" / "README.md").read_text()
    table = card[card.index("## Hyper-parameters"):].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, re.M))
    shown = {name: float(value) for name, value in rows.items() if re.fullmatch(r"[\d.]+", value)}
    assert set(shown) == {"tau_act", "tau_w", "alpha", "beta", "M", "rho_ema", "param_sample_ratio"}
    assert shown == {name: getattr(VcasConfig(), name) for name in shown}


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_takes_settings_seed_and_reduce_fn(name):
    sampler = SAMPLERS.get(name)(sampler_settings(name)(), seed=3, reduce_fn=None)
    for method in ("attach", "step", "adapt_due", "adapt", "run_metrics", "detach", "state_dict",
                   "load_state_dict"):
        assert callable(getattr(sampler, method)), (name, method)
    assert sampler.name == name and sampler.run_metrics() == {}  # nothing to report before a run


def test_a_sampler_without_phases_says_so():
    sampler = create_sampler("exact")
    assert not sampler.adapt_due(0) and sampler.run_metrics() == {}
    with pytest.raises(RuntimeError, match="no adaptation phase"):
        sampler.adapt(0, None, None, None)
    assert {f.name for f in fields(PhaseReport)} == {"cost", "log", "folded_step"}


def _cfg(*overrides: str):
    return compose_config(list(overrides))


def test_sampler_specs_puts_baselines_first_with_their_yaml_and_the_task_period():
    cfg = _cfg("task=rt-polarity", "sampler=vcas", "baselines=[exact,sb]", "sampler.tau=0.05")
    specs = sampler_specs(cfg, CONF)
    assert [s.name for s in specs] == ["exact", "sb", "vcas"]
    assert all(isinstance(s, SamplerSpec) for s in specs)
    assert specs[1].configured == {k: v for k, v in _yaml("sb").items() if k != "name"}
    vcas = specs[-1]
    assert vcas.configured["tau"] == 0.05 and vcas.configured["F"] is None  # as configured (metrics.json)
    assert vcas.settings.tau == 0.05 and vcas.settings.F == cfg.task.vcas_F == 25  # task.vcas_F applied
    without_yaml = sampler_specs(cfg)  # no conf_dir: a baseline takes its Settings defaults
    assert without_yaml[1].configured == {} and without_yaml[1].settings == sampler_settings("sb")()


def test_sampler_specs_keeps_an_explicit_period_and_leaves_samplers_without_one():
    cfg = _cfg("task=rt-polarity", "sampler=vcas-plus", "sampler.F=7", "baselines=[ub]")
    ub, plus = sampler_specs(cfg, CONF)
    assert plus.settings.F == 7 and plus.settings.fold_batch
    assert not hasattr(ub.settings, "F")
    cfg = _cfg("task=digits", "sampler=vcas", "baselines=[]")  # digits: task.vcas_F is null
    (vcas,) = sampler_specs(cfg, CONF)
    assert vcas.settings.F is None  # the sampler's own rule, min(500, steps / 50), at attach


@pytest.mark.parametrize("package", ["train", "samplers", "report", "models", "tasks", "vcas", "measure"])
def test_no_yaml_is_read_below_the_cli(package):
    pattern = re.compile(r"OmegaConf\.load|\bimport yaml\b|yaml\.safe_load|compose\(")
    # The one run-folder reader reads the overrides Hydra recorded in finished runs: results, not config.
    records = {ROOT / "vcas_bench" / "report" / "runs.py"}
    for path in sorted((ROOT / "vcas_bench" / package).rglob("*.py")):
        if path not in records:
            assert not pattern.search(path.read_text()), f"{path.relative_to(ROOT)} reads YAML"
