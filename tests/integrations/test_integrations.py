"""The three integrations, run through the recipes the docs show (docs/recipes/): a plain loop, HF
``transformers.Trainer`` and the Lightning ``Trainer``, each with gradient accumulation 2 on a tiny BERT.

Each asserts that phases ran once per due optimizer step, that s moved, that the analytic FLOPs ratio
is the runner's accounting for the same schedule, and (HF, Lightning, loop) that a run resumed from a
checkpoint continues the same schedule as the uninterrupted one (dropout 0, fixed data order: the same
phases at the same steps with the same s, rho, nu and V_s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from integration_helpers import RECIPES, TokenRows, recipe, runner_flops_ratio, schedule, tiny_bert

from vcas_bench.integrations.loop import VcasLoop
from vcas_bench.vcas import VcasConfig

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, ACCUMULATE = 6, 2


def _assert_schedule_ran(ctl, steps: int = STEPS, accumulate: int = ACCUMULATE) -> None:
    phase_steps = [h.step for h in ctl.history]
    assert phase_steps[0] == 0 and len(phase_steps) >= 2, phase_steps
    assert phase_steps == sorted(set(phase_steps)), "a phase ran twice in one optimizer step"
    assert ctl.s < 1.0, "s never moved"
    assert ctl.steps == steps * accumulate  # costs counted per micro-batch
    assert ctl.analytic_flops_ratio() == pytest.approx(runner_flops_ratio(ctl, steps, accumulate), rel=1e-12)


def _loader(rows: int = 96) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(TokenRows(rows), batch_size=8)


def test_plain_loop_recipe():
    """VcasConfig.plus(F=2): fold, reuse_forward, row probes, adaptive period; the folded micro-batch
    costs 0 (its gradient is the phase's)."""
    vcas = recipe("plain_loop").train(tiny_bert(), _loader(), STEPS)
    _assert_schedule_ran(vcas.controller)
    assert vcas.controller.config.fold_batch


def test_plain_loop_resume_continues_the_schedule():
    """VcasLoop.state_dict after 4 of 8 steps (phases at 0, 2, 6 with the adaptive period), loaded into
    a new VcasLoop: the same schedule as the uninterrupted run."""

    def run(model, state=None, steps=8):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loop = VcasLoop(
            model,
            recipe("plain_loop").loss_fn,
            extra=_loader(),
            config=VcasConfig.plus(F=2),
            accumulate=ACCUMULATE,
        )
        batches = list(_loader(160))
        if state is not None:
            loop.load_state_dict(state["vcas"])
            optimizer.load_state_dict(state["optimizer"])
        while loop.micro < steps * ACCUMULATE:
            loop.backward(batches[loop.micro])
            if loop.micro % ACCUMULATE == 0:
                optimizer.step()
                optimizer.zero_grad()
        state = {"vcas": loop.state_dict(), "optimizer": optimizer.state_dict(), "model": model.state_dict()}
        return loop, state

    full, _ = run(tiny_bert())
    _, half = run(tiny_bert(), steps=4)
    model = tiny_bert()
    model.load_state_dict(half["model"])
    resumed, _ = run(model, state=half)
    assert len(full.controller.history) > len(half["vcas"]["controller"]["history"])
    torch.testing.assert_close(schedule(resumed.controller), schedule(full.controller))


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """VcasTrainer with VcasConfig.plus(F=2), 6 optimizer steps, checkpoints every 3: uninterrupted, and
    resumed from checkpoint-3 in a fresh folder with a freshly built model."""
    hf = recipe("hf_trainer")
    data = TokenRows(96)
    full_dir, resume_dir = tmp_path_factory.mktemp("hf-full"), tmp_path_factory.mktemp("hf-resume")
    full = hf.train(tiny_bert(), data, str(full_dir), STEPS, save_steps=3)
    shutil.copytree(full_dir / "checkpoint-3", resume_dir / "checkpoint-3")
    resumed = hf.train(tiny_bert(seed=1), data, str(resume_dir), STEPS, save_steps=3, resume=True)
    return full, resumed


def test_hf_trainer_runs_vcas_with_accumulation(hf_runs):
    full, _ = hf_runs
    _assert_schedule_ran(full.vcas)
    assert full.state.global_step == STEPS


def test_hf_trainer_resume_restores_the_controller(hf_runs):
    full, resumed = hf_runs
    assert (Path(resumed.args.output_dir) / "checkpoint-6" / "vcas_state_rank0.pt").is_file()
    torch.testing.assert_close(schedule(resumed.vcas), schedule(full.vcas))
    assert resumed.vcas.steps == full.vcas.steps
    assert resumed.vcas.analytic_flops_ratio() == pytest.approx(full.vcas.analytic_flops_ratio())


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """VcasCallback with the paper's VcasConfig(F=2): 6 optimizer steps over 2 epochs of 3 (48 rows,
    batch 8, accumulate 2); uninterrupted, and resumed from the first epoch's checkpoint."""
    pl = recipe("lightning_module")
    full_dir, resume_dir = tmp_path_factory.mktemp("pl-full"), tmp_path_factory.mktemp("pl-resume")
    full = pl.train(tiny_bert(), _loader(48), str(full_dir), STEPS)
    (first,) = sorted(full_dir.glob("epoch=0-*.ckpt"))
    resumed = pl.train(tiny_bert(seed=1), _loader(48), str(resume_dir), STEPS, ckpt_path=str(first))
    return full, resumed


def test_lightning_runs_vcas_with_accumulation(lightning_runs):
    full, _ = lightning_runs
    _assert_schedule_ran(full.controller)
    assert [h.step for h in full.controller.history] == [0, 2, 4]  # F = 2 optimizer steps, not micro-batches


def test_lightning_resume_restores_the_controller(lightning_runs):
    """The phases up to the checkpoint come back exactly and the schedule goes on at the same steps with
    the same s. (Lightning itself does not replay an epoch-end checkpoint like the uninterrupted run: it
    takes one more micro-batch in the restored epoch, so the weights, and V_s, differ slightly after it.)"""
    full, resumed = lightning_runs
    torch.testing.assert_close(schedule(resumed.controller)[:2], schedule(full.controller)[:2])
    steps_and_s = [[(h.step, h.s) for h in vcas.controller.history] for vcas in (resumed, full)]
    assert steps_and_s[0] == steps_and_s[1]
    assert resumed.controller.steps > full.controller.steps // 2 + 2  # counting went on from the checkpoint


def test_the_docs_show_the_recipes_as_tested():
    """docs/integrations.md embeds every recipe file verbatim (the files these tests run)."""
    docs = (RECIPES.parent / "integrations.md").read_text()
    for path in sorted(RECIPES.glob("*.py")):
        assert f"```python\n{path.read_text()}```" in docs, f"{path.name} differs from docs/integrations.md"


def test_lightning_folds_the_scheduled_batch(tmp_path):
    """VcasConfig.plus(F=2) in Lightning: each phase's scheduled micro-batch returns the folded loss from
    training_step (no forward; cost 0, as in the runner's accounting) and the method is restored after."""
    import lightning as L

    from vcas_bench.integrations.lightning import VcasCallback

    vcas = VcasCallback(VcasConfig.plus(F=2))
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=ACCUMULATE,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=[vcas],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = recipe("lightning_module").Classifier(tiny_bert())
    trainer.fit(module, _loader(64))
    _assert_schedule_ran(vcas.controller, steps=4)
    assert "training_step" not in vars(module)


def test_hf_trainer_activation_checkpointing_is_row_compact(tmp_path):
    """``TrainingArguments(activation_checkpointing=True)``: Trainer switches HF's checkpointing on in
    ``train()``, after VcasTrainer wrapped the model; VCAS's row-compact checkpointing is used from the
    start, and two optimizer steps (a phase, a sampled step) run."""
    from transformers import TrainingArguments

    from vcas_bench.integrations.hf import VcasTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             activation_checkpointing=True, save_strategy="no")
    trainer = VcasTrainer(model=tiny_bert(), args=args, train_dataset=TokenRows(32),
                          vcas_config=VcasConfig.plus(F=1))
    assert trainer.vcas.wrapped.checkpointed
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.vcas.phases >= 1
