"""VCAS on networks with BatchNorm: activation-only sampling on a WideResNet, and linears next to BN.

BatchNorm in train mode mixes a batch's rows, so a row dropped by SampleA still shaped the batch
statistics of the kept rows, and in backward every row's input gradient becomes non-zero again. The
sampled gradient must stay unbiased all the same (vcas_bench/vcas/README.md, "CNNs and BatchNorm"). The
statistic, its bound and the negative control are those of ``test_vcas_unbiased.py`` (its module
docstring), reused from there.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_vcas_unbiased import Family, N, _draw, _report, _rows_without_rescaling, _stats
from torch import nn

from vcas_bench.models import create_model
from vcas_bench.vcas import VcasConfig, VcasController
from vcas_bench.vcas import autograd as vcas_autograd
from vcas_bench.vcas.wrap import wrap

DRAWS = 300
RHO_CNN = [0.3 + 0.07 * i for i in range(8)]  # 8 BasicBlocks, bottom-up, each below the one above


pytestmark = pytest.mark.usefixtures("one_thread")


def _wrn(image_size: int = 8) -> Family:
    """wrn18-tiny (2-2-2-2 BasicBlocks, 8/16/32/64 channels) on 8x8 images, float64, init under seed 0."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("wrn18-tiny", num_labels=3, image_size=image_size).model.double().train()
    g = torch.Generator().manual_seed(6)
    pixels = torch.randn(N, 3, image_size, image_size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (N,), generator=g)
    return Family(model, "BasicBlock", lambda m: F.cross_entropy(m(pixels), labels))


class BnMlpBlock(nn.Module):
    """Residual ``fc2(relu(bn(fc1(h))))``: fc2 sees SampleA's zero rows, fc1 sits below a BatchNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.relu(self.bn(self.fc1(h))))


def _bn_mlp() -> Family:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), *[BnMlpBlock(16) for _ in range(3)], nn.Linear(16, 3))
    model.double().train()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (N,), generator=g)
    return Family(model, BnMlpBlock, lambda m: F.cross_entropy(m(x), labels))


def test_wrn_activation_only_gradient_is_unbiased():
    """wrn18-tiny, batch 16 of 8x8 images, float64, n = 300 draws (generator seed 0) at rho rising from
    0.30 (bottom block) to 0.79 (top). Per parameter tensor: no deterministic mismatch and
    mean z^2 <= chi2_r^-1(z = 4.75) / r (p ~ 1e-6 per group). Wrapping switches no layer (no SampleW),
    every block resamples, and BatchNorm makes the gradient below each block non-zero in every row,
    so all conv kernels and BN parameters vary."""
    assert wrap(_wrn().model, "BasicBlock").engine.linears == []
    d = _draw(_wrn(), DRAWS, rho=RHO_CNN)
    assert d.sampled_names == set()
    stats = _stats(d)
    bad = [s for s in stats if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)
    in_blocks = [s for s in stats if s.name.startswith("stages.")]
    assert len(in_blocks) > 40 and all(s.entries > 0 for s in in_blocks), _report(in_blocks)
    top = d.kept_fraction[:, -1]
    assert abs(float(top.mean()) - RHO_CNN[-1]) < 5 * float(top.std()) / math.sqrt(DRAWS) + 1e-3


def test_wrn_negative_control_without_rescaling_is_flagged(monkeypatch):
    """The same setting with n = 200 and SampleA's 1/p rescaling removed: >= 90% of the block parameter
    tensors must be flagged as biased."""
    monkeypatch.setattr(vcas_autograd.RowEngine, "_draw_rows", _rows_without_rescaling)
    d = _draw(_wrn(), 200, rho=RHO_CNN)
    affected = [s for s in _stats(d) if s.name.startswith("stages.") and s.entries > 0]
    flagged = [s for s in affected if s.biased]
    assert len(affected) > 40 and len(flagged) >= 0.9 * len(affected), _report(affected)


def test_linear_below_batchnorm_stays_unbiased():
    """Blocks ``fc2(relu(bn(fc1(h))))`` with SampleA (rho 0.4/0.6/0.8) and SampleW (nu 0.5), n = 300, same
    bound. fc2 may skip the rows SampleA zeroed; fc1 must not (BN backward makes them non-zero again):
    a skip decided by the block's mask instead of the linear's own gradient would bias fc1 and bn."""
    d = _draw(_bn_mlp(), DRAWS)
    bad = [s for s in _stats(d) if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)
    assert {f"{i}.fc1.weight" for i in (1, 2, 3)} <= d.sampled_names


def test_wrn_exact_mode_matches_the_plain_model():
    """rho = 1 after wrapping: the gradient equals the unwrapped model's (float32, same init and batch)."""
    reference, wrapped_family = _wrn(), _wrn()
    params = lambda m: [p for p in m.parameters()]  # noqa: E731
    expected = torch.autograd.grad(reference.loss_fn(reference.model), params(reference.model))
    wrap(wrapped_family.model, "BasicBlock")
    got = torch.autograd.grad(wrapped_family.loss_fn(wrapped_family.model), params(wrapped_family.model))
    torch.testing.assert_close(got, expected)


def test_controller_on_a_cnn_adapts_s_and_has_no_nu():
    """VcasController on wrn18-tiny (float32, batch 16, M = 2): V_s is measured on the conv kernels
    (> 0), there is no V_w and no nu (mean nu reported as nan), starting from rho = 1 (V_act = 0) s moves
    down by alpha, and the phase leaves the BatchNorm running statistics as they were."""
    model = create_model("wrn18-tiny", num_labels=3, image_size=8).model.train()
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(N, 3, 8, 8, generator=g), torch.randint(0, 3, (N,), generator=g))
               for _ in range(2)]
    ctl = VcasController(model, "BasicBlock", VcasConfig(F=10, param_sample_ratio=1.0))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    stats = ctl.adapt(lambda b: F.cross_entropy(model(b[0]), b[1]), batches, step=0)
    assert ctl.nu == [] and stats.V_w == 0.0 and stats.V_w_layer == []
    assert stats.V_s > 0 and len(stats.V_s_layer) == len(ctl.wrapped.variance_weights) > 16
    assert stats.V_act <= 1e-12 * stats.V_s and ctl.s == pytest.approx(0.99)
    assert math.isnan(stats.summary()["nu_mean"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_skipping_rows_by_the_block_mask_below_batchnorm_is_flagged(monkeypatch):
    """Negative control for the rule above: if the linears skipped the rows SampleA dropped at the block
    output (instead of reading zero rows off their own gradient), fc1 under the BatchNorm would lose the
    non-zero gradient BN gives those rows. n = 200, same bound: fc1's weight must then be flagged in
    at least 2 of the 3 blocks."""
    last_keep: dict[str, torch.Tensor] = {}
    draw_rows = vcas_autograd.RowEngine._draw_rows

    def remembering_draw(self, grad, rho):
        grad, keep = draw_rows(self, grad, rho)
        last_keep["rows"] = keep.nonzero().squeeze(1)
        return grad, keep

    monkeypatch.setattr(vcas_autograd.RowEngine, "_draw_rows", remembering_draw)
    monkeypatch.setattr(vcas_autograd, "nonzero_rows", lambda grad, reference=False: last_keep.get("rows"))
    d = _draw(_bn_mlp(), 200)
    by_name = {s.name: s for s in _stats(d)}
    flagged = [i for i in (1, 2, 3) if by_name[f"{i}.fc1.weight"].biased]
    assert len(flagged) >= 2, _report(list(by_name.values()))
