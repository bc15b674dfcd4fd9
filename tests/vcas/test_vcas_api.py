"""The library API cannot be misused silently: one preset shared with the runner, one name for the
adaptive period, a checked loss_fn, an idempotent should_adapt, a fold that cannot be forgotten,
block_type="auto", SampleW for HF Conv1D and a word about linear-like layers left exact."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from integration_helpers import TokenRows, tiny_bert
from omegaconf import OmegaConf
from torch import nn

from vcas_bench.samplers import sampler_settings
from vcas_bench.vcas import VcasConfig, VcasController
from vcas_bench.vcas.wrap import auto_block_type, unwrap, wrap

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    data = TokenRows(8 * count, seed)
    return [
        dict(zip(("input_ids", "labels"), (data.ids[i::count], data.labels[i::count]))) for i in range(count)
    ]


def _loss_fn(model: nn.Module):
    return lambda batch: model(**batch).loss


def test_the_runner_preset_is_the_library_preset():
    """conf/sampler/vcas-plus.yaml, the runner's vcas-plus settings and VcasConfig.plus() agree field by
    field (tau sets tau_act and tau_w; F is the run's)."""
    from conftest import CONF_DIR

    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "sampler" / "vcas-plus.yaml"))
    plus = VcasConfig.plus(F=10)
    for key, value in yaml.items():
        if key == "tau":
            assert plus.tau_act == plus.tau_w == value
        elif key not in ("name", "F", "tau_act", "tau_w"):
            assert getattr(plus, key) == value, key
    assert sampler_settings("vcas-plus")().to_config(F=10) == plus
    assert "F_max" not in {f.name for f in dataclasses.fields(VcasConfig)}  # one name: F_max_factor


def test_loss_fn_must_return_a_scalar_tensor():
    ctrl = VcasController(tiny_bert(), config=VcasConfig(F=1))
    model = ctrl.wrapped.model
    with pytest.raises(
        TypeError,
        match=r"must return the batch's mean loss as a scalar tensor; got a tensor "
        r"of shape \(8, 3\)",
    ):
        ctrl.adapt(lambda b: model(**b).logits, _batches(2))
    with pytest.raises(TypeError, match="scalar tensor; got float"):
        ctrl.adapt(lambda b: model(**b).loss.item(), _batches(2))


def test_should_adapt_is_true_once_per_step():
    """Every micro-batch of a due step asks; only the first gets the phase."""
    ctrl = VcasController(tiny_bert(), config=VcasConfig(F=2))
    calls = 0
    for step in range(4):
        for micro, batch in enumerate(_batches(2, seed=step)):
            phase = ctrl.adapt_if_due(step, _loss_fn(ctrl.wrapped.model), batch, lambda: _batches(1)[0])
            calls += phase is not None
            assert (phase is not None) == (micro == 0 and step % 2 == 0)
    assert calls == ctrl.phases == 2


def test_a_fold_cannot_be_forgotten_and_its_loss_carries_the_exact_gradient():
    """With fold_batch a sampled backward counted over an unapplied fold, or a next phase, fails in one
    line; folded_loss() backpropagates the scheduled batch's exact gradient times any loss scale."""
    model = tiny_bert()
    batch = _batches(1, seed=5)[0]
    exact = torch.autograd.grad(model(**batch).loss, list(model.parameters()))
    ctrl = VcasController(model, config=VcasConfig.plus(F=1))
    ctrl.adapt_if_due(0, _loss_fn(model), batch, lambda: _batches(1, seed=6)[0])
    with pytest.raises(RuntimeError, match="folded_loss"):
        ctrl.count_step()
    with pytest.raises(RuntimeError, match="never applied"):
        ctrl.adapt(_loss_fn(model), _batches(2), step=1)
    loss = ctrl.folded_loss()
    assert float(loss) == pytest.approx(float(model(**batch).loss), rel=1e-6)
    (loss / 2).backward()
    for param, grad in zip(model.parameters(), exact):
        torch.testing.assert_close(param.grad, grad / 2, rtol=1e-5, atol=1e-8)
    ctrl.count_step(0.0)
    assert ctrl.folded_loss() is None


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _OtherBlock(_Block):
    pass


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(4, 4, 1)
        self.spatial = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.spatial(self.mix(x))


def test_auto_block_type_finds_the_repeated_block_or_says_why_not():
    assert auto_block_type(tiny_bert()).__name__ == "BertLayer"
    tied = nn.Module()
    tied.a, tied.b = nn.ModuleList([_Block(), _Block()]), nn.ModuleList([_OtherBlock(), _OtherBlock()])
    with pytest.raises(ValueError, match="ambiguous.*_Block, _OtherBlock repeat 2 times each"):
        auto_block_type(tied)
    with pytest.raises(ValueError, match="found no list of repeated blocks in Linear"):
        auto_block_type(nn.Linear(2, 2))


def test_linear_like_layers_left_exact_are_named():
    """A 1x1 convolution inside a block could be sampled like a linear but is not: wrap warns and the
    controller's summary lists it; the 3x3 one is not linear-like."""
    model = nn.Sequential(_Conv(), _Conv())
    with pytest.warns(UserWarning, match=r"2 linear-like layer\(s\) inside the blocks exact.*0\.mix, 1\.mix"):
        ctrl = VcasController(model)
    summary = ctrl.summary()
    assert summary.block_type == "_Conv" and summary.blocks == 2 and summary.sampled_linears == 0
    assert summary.exact_linear_like == ["0.mix", "1.mix"]


def test_gpt2_conv1d_is_sampled_and_unwraps():
    """GPT-2's Conv1D linears get SampleW (no warning); at rho = nu = 1 the gradient is the plain one;
    state_dict keys survive; a vcas-plus phase (row probes on the (in, out) weights) runs; unwrap
    restores the original forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    model.eval()  # dropout off
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    expected = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctrl = VcasController(model, config=VcasConfig.plus(F=1))
    assert ctrl.summary().sampled_linears == 8 and ctrl.summary().exact_linear_like == []
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params), expected)
    ctrl.adapt(lambda b: model(input_ids=b, labels=b).loss, [ids, ids.flip(0)], step=0)
    assert ctrl.folded_loss() is not None and len(ctrl.history) == 1
    unwrap(ctrl.wrapped)
    assert "forward" not in vars(model.transformer.h[0].attn.c_attn)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(wrap(model).model)
