"""VCAS-aware activation checkpointing (vcas_bench/vcas/checkpoint.py): each block's backward re-runs
its forward on the rows SampleA kept only.

- unbiased: the 3-sigma-style criterion of ``test_vcas_unbiased`` (n = 400 draws, float64, seed 0) on
  BERT, ViT (HF and timm) and Llama, with the negative control (SampleA without 1/p) flagged;
- the same numbers as the non-checkpointed sampled backward at the same seed, dropout on included
  (both see the forward's masks);
- it follows HF ``gradient_checkpointing_enable()`` and puts it back on unwrap;
- it refuses, in one line, blocks it cannot re-run row by row (BatchNorm, an unreplayable random op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from integration_helpers import tiny_bert
from test_vcas_unbiased import (
    DRAWS,
    FAMILIES,
    RHO,
    Family,
    N,
    _build,
    _draw,
    _report,
    _rows_without_rescaling,
    _stats,
)
from torch import nn

from vcas_bench.vcas import VcasConfig, VcasController, unwrap, wrap
from vcas_bench.vcas import autograd as vcas_autograd
from vcas_bench.vcas.checkpoint import CheckpointError, _RowReplay

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(dtype: torch.dtype = torch.float64) -> Family:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 100, (N, 8), generator=torch.Generator().manual_seed(4))
    return Family(model, "LlamaDecoderLayer", lambda m: m(input_ids=ids, labels=ids).loss)


CHECKPOINTED = {**{k: FAMILIES[k] for k in ("hf_bert", "hf_vit", "timm_vit")}, "llama": _llama}


def _build_checkpointed(name: str) -> Family:
    if name in FAMILIES:
        return _build(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family = CHECKPOINTED[name]()
    family.model.double()
    return family


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_checkpointed_gradient_is_unbiased(name):
    """n = 400 draws at rho = [0.4, 0.6, 0.8], nu = 0.5, batch 16, float64: no parameter group biased
    (test_vcas_unbiased's bound), every sampled linear weight really varies, the top block keeps 0.8 of
    its rows on average (5 SE)."""
    d = _draw(_build_checkpointed(name), DRAWS, checkpoint=True)
    stats = _stats(d)
    bad = [s for s in stats if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)
    by_name = {s.name: s for s in stats}
    for k in d.sampled_names:
        assert by_name[k].entries >= 0.9 * (by_name[k].entries + by_name[k].deterministic), by_name[k]
    top, se = d.kept_fraction[:, -1].mean(), d.kept_fraction[:, -1].std() / DRAWS**0.5
    assert abs(float(top) - RHO[-1]) < 5 * float(se) + 1e-3


def test_checkpointed_negative_control_without_rescaling_is_flagged(monkeypatch):
    """SampleA without its 1/p rescaling, checkpointed BERT, n = 200: >= 90% of the encoder groups flagged."""
    monkeypatch.setattr(vcas_autograd.RowEngine, "_draw_rows", _rows_without_rescaling)
    d = _draw(_build("hf_bert"), 200, checkpoint=True)
    affected = [s for s in _stats(d) if ".encoder.layer." in s.name and s.entries > 0]
    assert len(affected) >= 10, _report(affected)
    assert sum(s.biased for s in affected) >= 0.9 * len(affected), _report(affected)


def _grads(checkpoint: bool, rho: float, nu: float, dropout: float) -> tuple[float, list[torch.Tensor]]:
    model = tiny_bert(layers=3, dropout=dropout)
    wrapped = wrap(model, "BertLayer", torch.Generator().manual_seed(5), checkpoint=checkpoint)
    wrapped.engine.rho = [rho] * 3
    for slot in wrapped.engine.linears:
        slot.nu = nu
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 100, (N, 8), generator=g), torch.randint(0, 3, (N,), generator=g)
    mask = torch.ones(N, 8, dtype=torch.long)
    mask[::3, 5:] = 0
    with torch.random.fork_rng():
        torch.manual_seed(3)
        # Without checkpointing, the forward draws its dropout masks as the checkpointed forward does.
        with _RowReplay(N, None, "model", [], replay=False) if not checkpoint else _nothing():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss.detach()), [gr.detach() for gr in grads]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(("rho", "nu", "dropout"), [(1.0, 1.0, 0.1), (0.5, 0.5, 0.0), (0.5, 0.5, 0.1)])
def test_checkpointed_backward_equals_the_sampled_one(rho, nu, dropout):
    """Same seed, same rows and draws: the re-run on the kept rows gives the gradient of the plain sampled
    backward (to float rounding), with dropout too (the re-run sees the forward's masks)."""
    loss_a, plain = _grads(False, rho, nu, dropout)
    loss_b, checkpointed = _grads(True, rho, nu, dropout)
    assert loss_a == loss_b
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    if rho < 1:
        _, exact = _grads(True, 1.0, 1.0, dropout)
        assert any(not torch.allclose(a, b) for a, b in zip(exact, checkpointed)), "nothing was sampled"


def test_follows_hf_gradient_checkpointing_and_restores_it():
    model = tiny_bert(layers=2)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    controller = VcasController(model, "BertLayer", VcasConfig(F=1))
    layers = model.bert.encoder.layer
    assert controller.wrapped.checkpointed
    assert not any(layer.gradient_checkpointing for layer in layers), "HF would re-run the re-run"
    controller.unwrap()
    assert all(layer.gradient_checkpointing for layer in layers) and "forward" not in vars(layers[0])
    plain = wrap(tiny_bert(layers=2), "BertLayer")
    assert not plain.checkpointed
    unwrap(plain)


class _BatchNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.fc(x))


class _NoisyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x) * torch.rand_like(x)  # a draw no replay can reproduce on fewer rows


def test_refuses_blocks_that_mix_rows_in_one_line():
    model = nn.Sequential(_BatchNormBlock(), _BatchNormBlock())
    with pytest.raises(CheckpointError, match="BatchNorm") as error:
        wrap(model, _BatchNormBlock, checkpoint=True)
    assert "\n" not in str(error.value)


def test_refuses_random_ops_it_cannot_replay():
    model = nn.Sequential(_NoisyBlock(), _NoisyBlock())
    wrapped = wrap(model, _NoisyBlock, torch.Generator().manual_seed(0), checkpoint=True)
    wrapped.engine.rho = [0.5, 0.5]
    loss = F.mse_loss(model(torch.randn(16, 8)), torch.zeros(16, 8))
    with pytest.raises(CheckpointError, match="cannot replay"):
        loss.backward()


def test_cli_gradient_checkpointing_trains_exact_and_vcas(tmp_path, monkeypatch, capsys):
    """`vcas-bench trainer.gradient_checkpointing=true` on rt-polarity / bert-tiny (64 rows of 16 tokens,
    4 steps, F = 2: variance phases and sampled steps): exact runs with HF's checkpointing, vcas-plus
    with the row-compact one; both finish with finite losses, and VCAS really sampled."""
    import json
    import math

    from conftest import run_cli

    out = tmp_path / "run"
    args = ["sampler=vcas-plus", "task=rt-polarity", "model=bert-tiny", "baselines=[exact]",
            "trainer.max_steps=4", "trainer.gradient_checkpointing=true", "sampler.F=2", "sampler.tau=0.5",
            "task.args.train_size=64", "task.args.eval_size=32", "task.args.max_length=16",
            "task.batch_size=16",
            "trainer.progress=false", "trainer.device=cpu", "trainer.num_threads=1",
            f"output_dir={out}", f"hydra.run.dir={out}"]
    run_cli(args, monkeypatch, capsys)
    for sampler in ("exact", "vcas-plus"):
        metrics = json.loads((out / sampler / "metrics.json").read_text())
        assert metrics["steps"] == 4 and math.isfinite(metrics["final_train_loss"])
    log = (out / "vcas-plus" / "train_log.csv").read_text().splitlines()
    assert any(float(row.split(",")[log[0].split(",").index("keep_ratio")]) < 1 for row in log[1:])


def _zoo_grads(name: str, checkpoint: bool, rho: float, nu: float) -> list[torch.Tensor]:
    from test_vcas_zoo import ZOO

    with torch.random.fork_rng():
        torch.manual_seed(0)
        member = ZOO[name]()
    model = member.model.double().train()
    wrapped = wrap(model, member.block, torch.Generator().manual_seed(7), checkpoint=checkpoint)
    wrapped.engine.rho = [rho] * wrapped.engine.num_blocks
    for slot in wrapped.engine.linears:
        slot.nu = nu
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(member.loss_fn(model), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@pytest.mark.parametrize("name", ["llama", "gpt2", "swin", "t5"])
def test_zoo_checkpointed_matches_the_plain_sampled_backward(name, recwarn):
    """Llama, GPT-2 (HF Conv1D) and Swin (windows: batch x windows inside the block) re-run on their kept
    rows; T5's blocks pass a position bias that needs a gradient, so they fall back to plain
    checkpointing with a warning. Either way: the plain sampled backward's gradient at the same seed."""
    plain = _zoo_grads(name, False, 0.5, 0.5)
    checkpointed = _zoo_grads(name, True, 0.5, 0.5)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)
    fell_back = [w for w in recwarn if "checkpointed plainly" in str(w.message)]
    assert bool(fell_back) == (name == "t5"), [str(w.message) for w in recwarn]


def test_hf_checkpointing_switched_on_after_wrapping_is_not_run_twice():
    """``Trainer.train`` switches HF's checkpointing on after the model was wrapped: the re-run calls the
    block's own forward, not HF's checkpointing wrapper, so each block still re-runs once."""
    model = tiny_bert(layers=2)
    controller = VcasController(model, "BertLayer", VcasConfig(F=1, checkpoint=True))
    model.activation_checkpointing_enable()
    calls = []
    layer = model.bert.encoder.layer[0]
    layer.attention.register_forward_hook(lambda *a: calls.append(1))
    controller.engine.rho = [0.5, 0.5]
    ids = torch.randint(0, 100, (N, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.zeros(N, dtype=torch.long)).loss.backward()
    assert len(calls) == 2  # the forward without a graph, and one re-run on the kept rows
