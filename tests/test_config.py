"""Every config composes and validates; bad input fails before training, one line per problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_config

from vcas_bench.cli import CONF_DIR, check_command_line, group_choices
from vcas_bench.config import validate

GROUP_MEMBERS = [(g, c) for g in ("task", "model", "sampler", "experiment") for c in group_choices(g)]


# A cheap partner of each kind, so that a task or model is composed with something it can run with.
PARTNER_MODEL = {"text": "minilm", "image": "vit-tiny", "mlm": "bert-tiny"}
PARTNER_TASK = {"text": "rt-polarity", "image": "digits"}
PAPER_TASKS = ["sst2", "mnli", "qqp", "qnli", "cifar10", "cifar100", "imagenet", "c4"]
PAPER_MODELS = ["bert-base", "bert-large", "vit-base", "vit-large", "wrn18"]


def _partner(group: str, choice: str) -> list[str]:
    from vcas_bench.models import MODEL_MODALITIES
    from vcas_bench.tasks import TASK_MODALITIES

    if group == "task":
        return [f"model={PARTNER_MODEL[TASK_MODALITIES[choice]]}"]
    if group == "model":
        return [f"task={PARTNER_TASK[MODEL_MODALITIES[choice]]}"]
    return []


@pytest.mark.parametrize(("group", "choice"), GROUP_MEMBERS, ids=[f"{g}={c}" for g, c in GROUP_MEMBERS])
def test_every_group_member_composes_and_validates(group, choice):
    cfg = compose_config([f"{group}={choice}", *_partner(group, choice)])
    assert validate(cfg) == []


def test_every_paper_task_and_model_pair_composes():
    """Every paper task x paper model composes; the pairs that can run validate cleanly (text with BERT,
    images with ViT and WRN-18, c4 with BERT's masked-LM), every other pair fails in exactly one line
    that names the models it could use."""
    runnable = {(t, m) for t in PAPER_TASKS[:4] for m in ("bert-base", "bert-large")}
    image_models = ("vit-base", "vit-large", "wrn18")
    runnable |= {(t, m) for t in ("cifar10", "cifar100", "imagenet") for m in image_models}
    runnable |= {("c4", "bert-base"), ("c4", "bert-large")}
    for task in PAPER_TASKS:
        for model in PAPER_MODELS:
            errors = validate(compose_config([f"task={task}", f"model={model}"]))
            if (task, model) in runnable:
                assert errors == [], (task, model, errors)
            else:
                assert len(errors) == 1 and "pick one of" in errors[0] and "\n" not in errors[0], errors


def test_conf_groups_mirror_the_registries():
    from vcas_bench.models import MODELS
    from vcas_bench.samplers import SAMPLERS
    from vcas_bench.tasks import TASKS

    assert set(group_choices("sampler")) == set(SAMPLERS.names())
    assert set(group_choices("task")) <= set(TASKS.names())
    assert set(group_choices("model")) <= set(MODELS.names())
    for group in ("task", "model", "sampler"):
        for choice in group_choices(group):
            assert compose_config([f"{group}={choice}"])[group].name == choice


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["task=nope"], r"unknown task 'nope'; valid tasks: c4, cifar10, .*, rt-polarity, sst2"),
        (["model=gpt9"], r"unknown model 'gpt9'; valid models: .*minilm"),
        (["sampler=magic"], r"unknown sampler 'magic'; valid samplers: exact, infobatch, sb, ub, vcas"),
        (["model.optim.lr=-1"], r"model.optim.lr=-1: must be a number > 0"),
        (["sampler.foo=1"], r"sampler 'vcas' has no setting 'foo'; valid: tau, tau_act"),
        (["sampler=sb", "sampler.beta=-2"], r"sampler.beta=-2: must be a number >= 0"),
        (["sampler.beta=1.5"], r"sampler.beta=1.5: must be a number in \(0, 1\)"),
        (["task.args.foo=1"], r"task 'rt-polarity' has no argument 'foo'; valid: data_dir"),
        (["trainer.max_steps=abc"], r"trainer.max_steps=abc"),
        (["baselines=[exact,nope]"], r"baselines: unknown sampler 'nope'"),
        (["logger=mlflow"], r"logger=mlflow: must be one of wandb, tensorboard or null"),
        (["task=cifar10", "model=vit-base", "model.args.backend=onnx"], r"backend=onnx: must be one"),
        (["task=cifar10", "model=bert-base"], r"task 'cifar10' is an image task but model 'bert-base'"),
        (["trainer.accumulate=0"], r"trainer.accumulate=0: must be an integer >= 1"),
        (["trainer.precision=fp8"], r"trainer.precision=fp8: must be one of fp32, bf16, fp16"),
        (["trainer.stop_after=3"], r"trainer.stop_after=3: needs trainer.checkpoint_every > 0"),
        (["trainer.resume=/no/such/run"], r"trainer.resume=/no/such/run: no such checkpoint file"),
        (["trainer.checkpoint_every=-1"], r"trainer.checkpoint_every=-1: must be an integer >= 0"),
    ],
)
def test_bad_input_is_reported_in_one_line(args, expected):
    errors = check_command_line(args)
    assert errors, f"{args} was accepted"
    assert any(pytest.importorskip("re").search(expected, e) for e in errors), errors
    assert all("\n" not in e for e in errors)


def test_valid_command_line_has_no_errors():
    assert check_command_line(["task=digits", "model=vit-tiny", "sampler=ub", "trainer.max_steps=3"]) == []


def test_cli_exits_before_training_with_one_line(tmp_path):
    """The installed entry point fails fast: exit 2, one stderr line, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "vcas_bench", "task=nope", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vcas-bench: error: unknown task 'nope'; valid tasks: "
        "c4, cifar10, cifar100, digits, imagenet, mnist5k, mnli, qnli, qqp, rt-polarity, sst2"]
    assert not any(tmp_path.iterdir())


def test_configs_are_found_outside_a_checkout():
    assert (CONF_DIR / "config.yaml").exists()
