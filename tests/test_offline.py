"""Offline, a missing hub asset ends the command in one line naming it and its override, before any build;
builder arguments never collide with the factories' own parameters."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from vcas_bench.assets import HubAsset
from vcas_bench.models import MODELS, ModelBundle, create_model
from vcas_bench.preflight import hub_assets, offline_errors
from vcas_bench.registry import Registry
from vcas_bench.tasks import TASKS

PAPER_PAIRS = [
    ("sst2", "bert-base"), ("mnli", "bert-large"), ("qqp", "bert-base"), ("qnli", "bert-large"),
    ("cifar10", "vit-base"), ("cifar100", "vit-large"), ("imagenet", "vit-base"), ("c4", "bert-base"),
    ("imagenet", "wrn18"),
]


def _override_key(asset: HubAsset) -> str:
    return asset.override.partition("=")[0]


@pytest.mark.parametrize(("task", "model"), PAPER_PAIRS)
def test_every_hub_asset_names_an_override_that_exists(task: str, model: str) -> None:
    cfg = compose_config([f"task={task}", f"model={model}", "task.glue_eval.task=sst2"] if task == "c4"
                         else [f"task={task}", f"model={model}"])
    assets = hub_assets(cfg)
    assert assets, "a paper pair downloads something"
    for asset in assets:
        assert OmegaConf.select(cfg, _override_key(asset), default="absent") is None, asset.override
    [line] = offline_errors(cfg)
    assert all(_override_key(a) in line for a in assets) and "\n" not in line


def test_local_copies_need_nothing_from_the_hub(standins) -> None:
    cfg = compose_config(["task=mnli", "model=bert-large", f"model.args.path={standins.model('bert-large')}",
                          f"task.args.data_dir={standins.data('mnli')}"])
    assert hub_assets(cfg) == [] and offline_errors(cfg) == []
    timm = compose_config(["task=cifar10", "model=vit-base", "model.args.backend=timm"])
    assert [a.repo for a in hub_assets(timm)] == ["timm/vit_base_patch16_224.augreg_in21k", "uoft-cs/cifar10"]


def test_the_first_usage_line_offline_is_one_line_naming_both_overrides(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vcas_bench", "task=mnli", "model=bert-large",
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    expected = "vcas-bench: error: offline and not in the HF cache: checkpoint 'bert-large-uncased'"
    assert line.startswith(expected)
    assert "model.args.path=" in line and "task.args.data_dir=" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_builder_argument_named_like_the_factory_is_refused_at_registration() -> None:
    registry = Registry("model", reserved=("name",))
    with pytest.raises(TypeError, match="builder 'x' takes name, which the factory reserves"):
        registry.register("x")(lambda num_labels, name="hub/x": None)
    for reg in (MODELS, TASKS):
        assert reg.reserved, "the project's registries guard their factories"


def test_create_model_refuses_a_name_argument_in_one_clear_error() -> None:
    with pytest.raises(TypeError, match="may not be named name.*model.args.checkpoint"):
        create_model("bert-tiny", num_labels=2, name="bert-base-uncased")


@pytest.mark.parametrize("name", ["bert-base", "bert-large"])
def test_paper_bert_builds_from_a_local_checkpoint(name: str, standins) -> None:
    bundle = create_model(name, num_labels=3, path=str(standins.model(name)))
    assert isinstance(bundle, ModelBundle) and bundle.model.config.num_labels == 3
    mlm = create_model(name, num_labels=3, mlm=True, path=str(standins.model(name)))
    assert mlm.model.config.hidden_size == 32 and mlm.modality == "mlm"  # the checkpoint's layout
