"""Masked-LM pretraining on C4-style files (Table 1's BERT pretraining row) and the GLUE evaluation hook.

Fixtures: C4 JSON lines and an SST-2 TSV folder, written to a temporary folder; bert-tiny's masked-LM
variant (random init, MiniLM's offline tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from vcas_bench.cli import check_command_line
from vcas_bench.config import validate
from vcas_bench.models import create_model
from vcas_bench.models.bert import classifier_from_mlm
from vcas_bench.samplers.ub import gradient_norm_bound
from vcas_bench.train.build import per_example_loss
from vcas_bench.train.run import run

MLM_RUN = ["task=c4", "model=bert-tiny", "task.args.max_length=24", "task.args.eval_size=4",
           "task.batch_size=4", "task.eval_batch_size=4", "trainer.max_steps=4", "sampler.F=2",
           "trainer.flops_every=0"]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlm")
    (root / "c4").mkdir()
    docs = [json.dumps({"text": f"Document {i} says the quick brown fox jumps over the lazy dog. " * 3})
            for i in range(30)]
    (root / "c4" / "c4-train.00000-of-01024.json").write_text("\n".join(docs) + "\n")
    (root / "sst2").mkdir()
    rows = [f"a {'good' if i % 2 else 'bad'} film number {i} .\t{i % 2}" for i in range(16)]
    for name in ("train.tsv", "dev.tsv"):
        (root / "sst2" / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return {"c4": root / "c4", "sst2": root / "sst2"}


def test_per_example_loss_is_the_mean_over_masked_tokens():
    """Truth table: -100 tokens are ignored; an example with no masked token has loss 0; 2-D logits are
    plain per-example cross-entropy."""
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, -100, 2, -100], [-100, -100, -100, -100], [0, 4, 3, 2]])
    ce = torch.nn.functional.cross_entropy
    expected = torch.stack([(ce(logits[0, 0], labels[0, 0]) + ce(logits[0, 2], labels[0, 2])) / 2,
                            torch.tensor(0.0), ce(logits[2], labels[2])])
    torch.testing.assert_close(per_example_loss(logits, labels), expected)
    flat, classes = logits[:, 0], labels[2, :3]
    torch.testing.assert_close(per_example_loss(flat, classes), ce(flat, classes, reduction="none"))


def test_ub_bound_for_mlm_is_the_logit_gradient_norm():
    """UB's score for masked-LM equals the norm of d(per-example loss)/d(token logits), by autograd."""
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.tensor([[1, -100, 2, 5], [-100, -100, -100, -100], [0, 4, -100, 2]])
    losses = per_example_loss(logits, labels)
    norms = [torch.autograd.grad(loss, logits, retain_graph=True)[0].norm() for loss in losses]
    torch.testing.assert_close(gradient_norm_bound(logits, labels), torch.stack(norms))


def test_classifier_from_mlm_shares_the_encoder():
    mlm = create_model("bert-tiny", num_labels=30522, mlm=True)
    assert mlm.modality == "mlm" and type(mlm.model).__name__ == "BertForMaskedLM"
    classifier = classifier_from_mlm(mlm, num_labels=3)
    theirs, ours = mlm.model.bert.state_dict(), classifier.model.bert.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs) and len(theirs) > 30
    assert classifier.model.config.num_labels == 3 and classifier.modality == "text"


@pytest.mark.parametrize(("args", "expected"), [
    (["task=c4", "model=minilm"], "task 'c4' is masked-LM pretraining; model 'minilm' has no masked-LM"),
    (["task=c4", "model=vit-tiny"], "pick one of: bert-base, bert-large, bert-tiny"),
    (["task=c4", "model=bert-tiny", "task.glue_eval.task=cola"], "task.glue_eval.task='cola'; valid: mnli"),
    (["task=sst2", "model=bert-tiny", "task.glue_eval.task=sst2"], "applies to masked-LM pretraining tasks"),
])
def test_mlm_config_errors_are_one_line(args, expected):
    errors = check_command_line(args)
    assert any(expected in e for e in errors) and all("\n" not in e for e in errors), errors


def test_c4_pretraining_runs_end_to_end_with_glue_eval(make_cfg, tmp_path, data_dirs):
    """bert-tiny masked-LM on the C4 fixture, 4 steps of batch 4: exact, SB and UB as baselines, then VCAS
    (F = 2, so two variance phases); each pretrained encoder is then fine-tuned 3 exact steps on the
    SST-2 fixture. Every run reports a finite MLM loss near ln(30522) ~ 10.3 (random init), a masked-token
    accuracy, and a GLUE accuracy."""
    glue = ["task.glue_eval.task=sst2", "task.glue_eval.steps=3", "task.glue_eval.batch_size=4",
            "task.glue_eval.max_length=16", f"task.glue_eval.data_dir={data_dirs['sst2']}"]
    cfg = make_cfg(*MLM_RUN, f"task.args.data_dir={data_dirs['c4']}", "baselines=[exact,sb,ub]", *glue)
    assert validate(cfg) == []
    results = run(cfg, tmp_path)
    assert [m["sampler"] for m in results] == ["exact", "sb", "ub", "vcas"]
    for metrics in results:
        assert 8.0 < metrics["final_train_loss"] < 12.0, metrics["final_train_loss"]
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 8.0 < metrics["eval_loss"] < 12.0
        assert 0.0 <= metrics["glue_sst2_accuracy"] <= 1.0 and metrics["glue_sst2_steps"] == 3
    assert results[-1]["adapt_phases"] == 2
    assert "GLUE acc" in (tmp_path / "comparison.md").read_text()


def test_variance_phases_read_their_own_masks(data_dirs):
    """Reading c4's phase copy draws no masks from the training stream: the first training batch is the
    same whether or not phase batches were read before it (so exact and VCAS train on the same masks)."""
    from vcas_bench.tasks import TASKS

    tokenizer = create_model("bert-tiny", num_labels=2).tokenizer
    first, second = (TASKS.create("c4", tokenizer=tokenizer, data_dir=str(data_dirs["c4"]), max_length=24,
                                  eval_size=4) for _ in range(2))
    second.phase_train[:8]
    assert torch.equal(first.train[:8]["labels"], second.train[:8]["labels"])
    assert not torch.equal(first.train[:8]["labels"], first.phase_train[:8]["labels"])


def test_glue_eval_composes_from_the_command_line():
    cfg = compose_config(["task=c4", "model=bert-tiny", "task.glue_eval.task=mnli", "task.glue_eval.steps=5"])
    assert cfg.task.glue_eval.task == "mnli" and cfg.task.glue_eval.lr == 2e-5 and validate(cfg) == []
