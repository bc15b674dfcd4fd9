"""Any architecture: ``block_type="auto"`` wraps a zoo of tiny models and the sampled backward stays
unbiased on each (the statistic and bound of ``test_vcas_unbiased``; docs/method.md §8).

Zoo (random init, dropout 0, float64, batch 16): Llama (decoder-only, GQA), GPT-2 (HF ``Conv1D``
linears: SampleW must reach them), T5 encoder-decoder (encoder then decoder blocks), Swin (stages of
windowed blocks), torchvision ResNet (its first two stages; BatchNorm in train mode; activation-only).
rho rises linearly from 0.4 to 0.8 over the blocks, nu = 0.5; n = DRAWS draws (CONTROL_DRAWS for the
negative controls). To keep memory and time small each parameter tensor is tested on a fixed random
subset of at most 256 entries (generator seed 0).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_vcas_unbiased import Draws, _leverage_without_rescaling, _report, _stats
from torch import nn

from vcas_bench.vcas import autograd as vcas_autograd
from vcas_bench.vcas.wrap import unwrap, wrap

N = 16
NU = 0.5
ENTRIES = 256  # per parameter tensor
DRAWS = {"llama": 200, "gpt2": 200, "t5": 120, "swin": 120, "resnet": 200}
CONTROL_DRAWS = 100

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Member:
    model: nn.Module
    loss_fn: Callable[[nn.Module], torch.Tensor]
    block: str  # the class "auto" must find


def _tokens(seed: int, shape=(N, 8)) -> torch.Tensor:
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def _llama() -> Member:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )
    ids = _tokens(1)
    return Member(model, lambda m: m(input_ids=ids, labels=ids).loss, "LlamaDecoderLayer")


def _gpt2() -> Member:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=100,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    ids = _tokens(2)
    return Member(model, lambda m: m(input_ids=ids, labels=ids).loss, "GPT2Block")


def _t5() -> Member:
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=100,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )
    ids, labels = _tokens(3), _tokens(4, (N, 6)).clamp_min(1)
    return Member(model, lambda m: m(input_ids=ids, labels=labels).loss, "T5Block")


def _swin() -> Member:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=2,
        mlp_ratio=2.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        num_labels=3,
    )
    model = SwinForImageClassification(config)
    g = torch.Generator().manual_seed(5)
    pixels, labels = torch.randn(N, 3, 16, 16, generator=g), torch.randint(0, 3, (N,), generator=g)
    return Member(model, lambda m: m(pixel_values=pixels.to(m.dtype), labels=labels).loss, "SwinLayer")


def _resnet() -> Member:
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
    # Two stages (64 and 128 channels) keep torchvision's stem, blocks and BatchNorm at 1/15 of the size.
    model.layer3, model.layer4, model.fc = nn.Identity(), nn.Identity(), nn.Linear(128, 3)
    g = torch.Generator().manual_seed(6)
    pixels, labels = torch.randn(N, 3, 16, 16, generator=g), torch.randint(0, 3, (N,), generator=g)
    return Member(model, lambda m: F.cross_entropy(m(pixels.to(torch.float64)), labels), "BasicBlock")


ZOO = {"llama": _llama, "gpt2": _gpt2, "t5": _t5, "swin": _swin, "resnet": _resnet}


def _build(name: str) -> Member:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        member = ZOO[name]()
    member.model.to(torch.float64).train()
    return member


def _draw(member: Member, n: int) -> tuple[Draws, list[str]]:
    """``n`` sampled gradients on ``ENTRIES`` fixed entries of every parameter; the names of what
    ``"auto"`` wrapped (block class, sampled linears)."""
    model = member.model
    wrapped = wrap(model, "auto", torch.Generator().manual_seed(0))
    engine = wrapped.engine
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    pick = torch.Generator().manual_seed(0)
    subsets = [torch.randperm(p.numel(), generator=pick)[:ENTRIES] for _, p in named]
    loss = member.loss_fn(model)

    def grads() -> torch.Tensor:
        gs = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).flatten()[e]
                for g, (_, p), e in zip(gs, named, subsets)
            ]
        )

    engine.sample_activations = engine.sample_weights = False
    exact = grads()
    engine.sample_activations = engine.sample_weights = True
    blocks = engine.num_blocks
    engine.rho = [0.4 + 0.4 * j / max(1, blocks - 1) for j in range(blocks)]
    for slot in engine.linears:
        slot.nu = NU
    draws = torch.stack([grads() for _ in range(n)])
    sizes = [len(e) for e in subsets]
    linear_weights = {id(m.weight) for m in wrapped.linear_modules}
    sampled = {k for k, p in named if id(p) in linear_weights}
    info = [wrapped.block_type, *sorted(slot.name.rsplit(".", 1)[-1] for slot in engine.linears)]
    unwrap(wrapped)
    d = Draws(
        [k for k, _ in named],
        list(exact.split(sizes)),
        list(draws.split(sizes, dim=1)),
        torch.zeros(n, blocks),
        sampled,
    )
    return d, info


def _ratios(stats) -> list[float]:
    return [s.mean_z2 / s.bound for s in stats if s.entries > 0]


@pytest.mark.parametrize("name", list(ZOO))
def test_auto_wrap_is_unbiased_on_the_zoo(name):
    """Per parameter tensor: no deterministic mismatch and mean z^2 <= chi2_r^-1(z = 4.75) / r, as in
    test_vcas_unbiased (n = DRAWS[name]). ``auto`` finds the expected block class; every model but the
    CNN has sampled linears (GPT-2's are ``Conv1D``), and their weights vary in >= 90% of live entries."""
    member = _build(name)
    if name == "resnet":  # its 1x1 downsample convolutions stay exact, and wrap says so
        with pytest.warns(UserWarning, match=r"1 linear-like layer\(s\).*layer2.0.downsample.0"):
            d, info = _draw(member, DRAWS[name])
    else:
        d, info = _draw(member, DRAWS[name])
    assert info[0] == member.block
    stats = _stats(d)
    bad = [s for s in stats if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)
    ratios, z2 = _ratios(stats), [s.mean_z2 for s in stats if s.entries > 0]
    print(
        f"\n{name}: {info[0]}, {len(info) - 1} sampled linears, {len(ratios)} groups; mean z^2 median "
        f"{statistics.median(z2):.3f} max {max(z2):.3f}; mean z^2 / bound median "
        f"{statistics.median(ratios):.3f} max {max(ratios):.3f}"
    )
    if name != "resnet":
        assert len(d.sampled_names) > 0
        by_name = {s.name: s for s in stats}
        for k in d.sampled_names:
            s = by_name[k]
            assert s.entries >= 0.9 * (s.entries + s.deterministic), f"{k} barely sampled: {s}"


@pytest.mark.filterwarnings("ignore:VCAS leaves")
@pytest.mark.parametrize(("name", "control"), [("gpt2", "weight"), ("resnet", "activation")])
def test_negative_control_on_the_zoo(monkeypatch, name, control):
    """SampleW without its 1/q rescaling on GPT-2's Conv1D linears (rho = 1 so SampleA adds no noise), and
    SampleA without 1/p on the ResNet: the same statistic flags >= 90% of the affected groups, so the
    zoo test has power where it matters most."""
    member = _build(name)
    if control == "weight":
        monkeypatch.setattr(vcas_autograd, "leverage_sample_matmul", _leverage_without_rescaling)
        monkeypatch.setattr(vcas_autograd.RowEngine, "sample_block_gradient", lambda self, block, grad: grad)
    else:
        from test_vcas_unbiased import _rows_without_rescaling

        monkeypatch.setattr(vcas_autograd.RowEngine, "_draw_rows", _rows_without_rescaling)
    d, _ = _draw(member, CONTROL_DRAWS)
    stats = _stats(d)
    in_scope = d.sampled_names.__contains__ if control == "weight" else (lambda k: k.startswith("layer"))
    affected = [s for s in stats if in_scope(s.name) and s.entries > 0]
    flagged = [s for s in affected if s.biased]
    ratios, z2 = _ratios(affected), [s.mean_z2 for s in affected]
    print(
        f"\n{name} control ({control}): {len(flagged)}/{len(affected)} flagged; mean z^2 median "
        f"{statistics.median(z2):.1f}; mean z^2 / bound median {statistics.median(ratios):.2f}, "
        f"max {max(ratios):.2f}"
    )
    assert len(affected) >= 4 and not math.isnan(statistics.median(ratios)), _report(affected)
    assert len(flagged) >= 0.9 * len(affected), _report(affected)
