"""The sampled backward is unbiased: E[ASG] = exact gradient, for every parameter (docs/method.md §8).

Models are tiny, randomly initialised, dropout 0 (so train/eval mode does not matter), built in the
test. The forward pass is run once; each draw is one more ``autograd.grad`` over the retained graph,
so only the engine's private generator changes between draws.

The statistic (per parameter tensor, "group")
---------------------------------------------
For the ``n`` draws ``X (n, E)`` of a group and its exact gradient ``g``:

- entries whose exact and sampled gradients are all exactly 0 are dropped (trivially unbiased);
- the models run in float64. With ``G`` the largest exact gradient entry of the whole model, entries
  whose draws do not vary beyond rounding (sd <= 1e-12 G) are *deterministic*: they must equal the
  exact gradient to 1e-10 G, otherwise the group fails outright (a deterministic bias cannot hide
  behind sd = 0). This also covers gradients that are zero in exact arithmetic but not in floating
  point, e.g. the key bias of softmax attention, whose rounding residue is not a random variable;
- for the other ``E`` entries ``z_e = (mean_e - g_e) / (sd_e / sqrt(n))`` and the statistic is
  ``mean(z^2)``, expected 1 (399/397 for a t with n - 1 = 399 dof) if the estimator is unbiased.
  The entries of one gradient tensor are strongly correlated (all draws come from a few dozen row
  coin flips), so ``sum z^2`` is not chi-square(E). With ``C`` the entries' sample correlation
  matrix, ``Var(sum z^2) ~ 2 ||C||_F^2``; Satterthwaite's approximation ``sum z^2 ~ c chi2(r)`` with
  ``r = E^2 / ||C||_F^2`` (the effective number of independent entries, <= n - 1) gives the bound
  ``mean z^2 <= chi2_r^-1(z = 4.75) / r`` (one-sided p ~ 1e-6 per group; Wilson–Hilferty quantile).
  For uncorrelated entries this is the usual ``1 + ~4.75 sqrt(2/E)``.

The negative controls remove the ``1/p`` rescaling of SampleA or SampleW and assert that the same
statistic then rejects most of the affected groups, so the test has power.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from integration_helpers import tiny_bert
from torch import nn

from vcas_bench.vcas import autograd as vcas_autograd
from vcas_bench.vcas.sampling import bernoulli_keep, leverage_scores, row_norms, soft_topk
from vcas_bench.vcas.wrap import SampledLinear, unwrap, wrap

N = 16  # batch rows
RHO = [0.4, 0.6, 0.8]  # bottom-up
NU = 0.5
DRAWS = 400
Z_BOUND = 4.75  # standard-normal quantile of the per-group chi-square bound (p ~ 1e-6)
DET_SD = 1e-12  # "does not vary": sd below this times the model's largest exact gradient entry (float64)
DET_TOL = 1e-10  # tolerance for deterministic entries, same unit


pytestmark = pytest.mark.usefixtures("one_thread")


# -- model families -------------------------------------------------------------------------------
@dataclass
class Family:
    model: nn.Module
    block_type: type | str
    loss_fn: Callable[[nn.Module], torch.Tensor]


def _hf_bert(dtype: torch.dtype = torch.float32) -> Family:
    model = tiny_bert(layers=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (N, 8), generator=g)
    mask = torch.ones(N, 8, dtype=torch.long)
    mask[::3, 5:] = 0  # some padded rows, so the attention mask is exercised
    labels = torch.randint(0, 3, (N,), generator=g)
    return Family(model, "BertLayer", lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)


def _hf_vit(dtype: torch.dtype = torch.float32) -> Family:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    model = ViTForImageClassification(config)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(N, 3, 16, 16, generator=g, dtype=dtype)
    labels = torch.randint(0, 3, (N,), generator=g)
    return Family(model, "ViTLayer", lambda m: m(pixel_values=pixels, labels=labels).loss)


def _timm_vit(dtype: torch.dtype = torch.float32) -> Family:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=3,
    )
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(N, 3, 16, 16, generator=g, dtype=dtype)
    labels = torch.randint(0, 3, (N,), generator=g)
    return Family(model, "Block", lambda m: F.cross_entropy(m(pixels), labels))


class TupleBlock(nn.Module):
    """Pre-norm MLP residual block returning ``(hidden, per-token norms)`` like older HF layers."""

    def __init__(self, dim: int, aux_grad: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.aux_grad = aux_grad

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.fc1(self.norm(h))
        out = h + self.fc2(F.gelu(u))
        aux = u.square().mean(-1) if self.aux_grad else out.detach().norm(dim=-1)
        return out, aux


class TupleNet(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, aux_grad: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(TupleBlock(dim, aux_grad) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, aux_total = self.embed(x), x.new_zeros(())
        for block in self.blocks:
            h, aux = block(h)
            aux_total = aux_total + aux.mean()
        return self.head(h.mean(1)), aux_total


def _tuple_net(dtype: torch.dtype = torch.float32, aux_grad: bool = False) -> Family:
    model = TupleNet(aux_grad=aux_grad)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 6, 5, generator=g, dtype=dtype)
    labels = torch.randint(0, 3, (N,), generator=g)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        logits, aux = m(x)
        return F.cross_entropy(logits, labels) + (0.1 * aux if aux_grad else 0.0)

    return Family(model, TupleBlock, loss_fn)


FAMILIES = {"hf_bert": _hf_bert, "hf_vit": _hf_vit, "timm_vit": _timm_vit, "tuple_block": _tuple_net}


def _build(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> Family:
    """Family ``name`` with parameters initialised under seed 0, in ``dtype`` (statistical tests use
    float64 so that float rounding sits ~1e-16 below the gradients, far from any sampling effect)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family = {**FAMILIES, **OTHER_PATHS}[name](dtype=dtype, **kwargs)
    family.model.to(dtype)
    return family


# -- drawing gradients ----------------------------------------------------------------------------
@dataclass
class Draws:
    names: list[str]
    exact: list[torch.Tensor]  # per parameter, flattened, float64
    draws: list[torch.Tensor]  # per parameter, (n, numel) float64
    kept_fraction: torch.Tensor  # (n, num_blocks)
    sampled_names: set[str]  # weights of the sampled linears


def _draw(family: Family, n: int, rho=RHO, nu=NU, seed: int = 0, static_shapes: bool = False,
          checkpoint: bool = False) -> Draws:
    model = family.model
    wrapped = wrap(model, family.block_type, torch.Generator().manual_seed(seed), checkpoint=checkpoint)
    engine = wrapped.engine
    engine.static_shapes = static_shapes
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    names, params = [k for k, _ in named], [p for _, p in named]
    loss = family.loss_fn(model)

    def grads() -> list[torch.Tensor]:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]

    engine.sample_activations = engine.sample_weights = False
    exact = [g.detach().double().flatten() for g in grads()]
    engine.sample_activations = engine.sample_weights = True
    engine.rho = list(rho)
    for slot in engine.linears:
        slot.nu = nu
    rows, kept = [], []
    for _ in range(n):
        rows.append(torch.cat([g.detach().flatten() for g in grads()]))
        kept.append(list(engine.kept_fraction))
    flat = torch.stack(rows).double()
    draws = list(flat.split([e.numel() for e in exact], dim=1))
    linear_weights = {id(m.weight) for m in wrapped.linear_modules}
    sampled = {k for k, p in named if id(p) in linear_weights}
    unwrap(wrapped)
    return Draws(names, exact, draws, torch.tensor(kept), sampled)


# -- the statistic --------------------------------------------------------------------------------
def _chi2_upper(dof: float, z: float) -> float:
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


@dataclass
class GroupStat:
    name: str
    entries: int  # entries with sampling variance
    deterministic: int
    det_mismatch: int
    mean_z2: float
    r_eff: float
    bound: float

    @property
    def biased(self) -> bool:
        return self.det_mismatch > 0 or (self.entries > 0 and self.mean_z2 > self.bound)


def _group_stat(name: str, x: torch.Tensor, exact: torch.Tensor, scale: float) -> GroupStat:
    n = x.shape[0]
    live = (exact != 0) | (x != 0).any(0)
    x, exact = x[:, live], exact[live]
    if exact.numel() == 0:
        return GroupStat(name, 0, 0, 0, 0.0, 0.0, math.inf)
    mean, sd = x.mean(0), x.std(0)
    det = sd <= DET_SD * scale
    det_mismatch = int(((mean[det] - exact[det]).abs() > DET_TOL * scale).sum())
    var = ~det
    e = int(var.sum())
    if e == 0:
        return GroupStat(name, 0, int(det.sum()), det_mismatch, 0.0, 0.0, math.inf)
    se = (sd[var].square() / n + (DET_SD * scale) ** 2).sqrt()
    z = (mean[var] - exact[var]) / se
    zs = (x[:, var] - mean[var]) / sd[var]
    gram = zs @ zs.t() / (n - 1)  # (n, n); ||Z^T Z|| = ||Z Z^T||
    r_eff = e**2 / float(gram.square().sum())
    return GroupStat(
        name,
        e,
        int(det.sum()),
        det_mismatch,
        float(z.square().mean()),
        r_eff,
        _chi2_upper(r_eff, Z_BOUND) / r_eff,
    )


def _stats(d: Draws) -> list[GroupStat]:
    scale = max(float(g.abs().max()) for g in d.exact)
    return [_group_stat(k, x, g, scale) for k, x, g in zip(d.names, d.draws, d.exact)]


def _report(stats: list[GroupStat]) -> str:
    return "\n".join(
        f"{s.name}: E={s.entries} det={s.deterministic} mismatch={s.det_mismatch} "
        f"mean_z2={s.mean_z2:.3f} bound={s.bound:.3f} r_eff={s.r_eff:.1f}"
        for s in stats
    )


# -- tests ----------------------------------------------------------------------------------------
def test_statistic_self_check():
    """The criterion on synthetic draws (n = 400, E = 300, seed 0) whose noise has two dominant directions,
    like the real gradients: unbiased draws pass with r_eff ~ 2; a shift of 0.3 sd along the main noise
    direction fails; one deterministic entry off by 1e-6 G fails; float-level residue around a zero
    exact gradient (1e-20) counts as deterministic and passes."""
    g = torch.Generator().manual_seed(0)
    n, e = 400, 300
    exact = torch.randn(e, generator=g, dtype=torch.float64)
    basis = torch.randn(2, e, generator=g, dtype=torch.float64)
    coef = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    noise = coef @ basis + 0.1 * torch.randn(n, e, generator=g, dtype=torch.float64)
    ok = _group_stat("ok", exact + noise, exact, scale=1.0)
    assert not ok.biased and 1.5 < ok.r_eff < 4, ok
    shifted = _group_stat("shift", exact + noise + 0.3 * 3.0 * basis[0], exact, scale=1.0)
    assert shifted.biased, shifted
    draws = exact + noise
    draws[:, 7] = exact[7] + 1e-6
    assert _group_stat("det", draws, exact, scale=1.0).det_mismatch == 1
    residue = 1e-20 * torch.randn(n, e, generator=g, dtype=torch.float64)
    tiny = _group_stat("zero", residue, 1e-20 * torch.randn(e, generator=g, dtype=torch.float64), scale=1.0)
    assert not tiny.biased and tiny.entries == 0, tiny


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampled_gradient_is_unbiased(name):
    """n = 400 sampled gradients (generator seed 0) at rho = [0.4, 0.6, 0.8] bottom-up, nu = 0.5, batch 16.

    Per parameter tensor: no deterministic mismatch and mean z^2 <= chi2_r^-1(z = 4.75) / r (module
    docstring; r = effective number of independent entries). Sanity checks that sampling really ran:
    every sampled linear weight varies in >= 90% of its live entries, and the top block keeps
    0.8 +- 5 SE of its rows on average (E[kept] = sum p = N * rho).
    """
    d = _draw(_build(name), DRAWS)
    stats = _stats(d)
    by_name = {s.name: s for s in stats}
    bad = [s for s in stats if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)

    for k in d.sampled_names:
        s = by_name[k]
        assert s.entries >= 0.9 * (s.entries + s.deterministic), f"{k} barely sampled: {s}"
    kept = d.kept_fraction
    top, se = kept[:, -1].mean(), kept[:, -1].std() / math.sqrt(DRAWS)
    assert abs(float(top) - RHO[-1]) < 5 * float(se) + 1e-3, (float(top), float(se))
    assert all(float(kept[:, b].mean()) <= RHO[b] + 0.05 for b in range(len(RHO))), kept.mean(0)
    assert float(kept[:, 0].mean()) < 0.6, "the bottom block did not sample below the block above it"


def _rows_without_rescaling(self, grad: torch.Tensor, rho: float):
    p = soft_topk(row_norms(grad), grad.shape[0] * rho)
    keep = bernoulli_keep(p, self.generator)
    return grad * keep.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), keep


def _leverage_without_rescaling(a, b, k, generator=None, b_rows=None, capacity=None, drawn=None):
    b = b if b_rows is None else b.index_select(0, b_rows)
    if k >= a.shape[0]:
        return a.t() @ b
    q = soft_topk(leverage_scores(a, b), k)
    idx = bernoulli_keep(q, generator).nonzero().squeeze(1)
    return a[idx].t() @ b[idx]


@pytest.mark.parametrize("control", ["activation", "weight"])
def test_negative_control_without_rescaling_is_flagged(monkeypatch, control):
    """HF BERT, n = 200 draws, the unbiasedness criterion above, with the 1/p rescaling removed from
    SampleA (``RowEngine._draw_rows``; rho = [0.4, 0.6, 0.8], nu = 0.5) or from SampleW
    (``leverage_sample_matmul``; rho = 1 so that SampleA's noise does not mask SampleW's bias).

    The affected groups are those whose draws vary (the encoder-layer parameters for SampleA, the
    sampled linear weights for SampleW); >= 90% of them must be flagged as biased.
    """
    if control == "activation":
        monkeypatch.setattr(vcas_autograd.RowEngine, "_draw_rows", _rows_without_rescaling)
        d = _draw(_build("hf_bert"), 200)
        in_scope = lambda name: ".encoder.layer." in name  # noqa: E731
    else:
        monkeypatch.setattr(vcas_autograd, "leverage_sample_matmul", _leverage_without_rescaling)
        d = _draw(_build("hf_bert"), 200, rho=[1.0] * len(RHO))
        in_scope = d.sampled_names.__contains__
    affected = [s for s in _stats(d) if in_scope(s.name) and s.entries > 0]
    flagged = [s for s in affected if s.biased]
    assert len(affected) >= 10, _report(affected)
    assert len(flagged) >= 0.9 * len(affected), _report(affected)


def _bert_with_hidden_state_loss(dtype: torch.dtype = torch.float32) -> Family:
    """HF BERT whose loss also uses an intermediate hidden state (deep supervision, layer distillation)."""
    family = _hf_bert(dtype)
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 100, (N, 8), generator=g), torch.randint(0, 3, (N,), generator=g)
    v = torch.randn(32, generator=g, dtype=dtype)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        out = m(input_ids=ids, labels=labels, output_hidden_states=True)
        return out.loss + 0.1 * (out.hidden_states[2][:, 0] @ v).square().mean()

    return Family(family.model, "BertLayer", loss_fn)


OTHER_PATHS = {
    "tuple_block_aux_output": lambda dtype: _tuple_net(dtype, aux_grad=True),
    "hf_bert_hidden_state_loss": _bert_with_hidden_state_loss,
}


@pytest.mark.parametrize("case", list(OTHER_PATHS))
def test_gradient_entering_blocks_by_other_paths_stays_unbiased(case):
    """Same n = 400, settings and bound as the unbiasedness test, on two models where part of the loss
    gradient reaches a block without passing through the block above: a ``(hidden, aux)`` block whose
    ``aux`` depends on the block's weights and enters the loss, and BERT with a loss term on
    ``hidden_states[2]`` (the output of block 1, as recorded by HF's output-capturing hook)."""
    d = _draw(_build(case), DRAWS)
    bad = [s for s in _stats(d) if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_mode_matches_unwrapped_model_and_keeps_names(name):
    """rho = 1, nu = 1 (the defaults after wrapping): the wrapped gradient equals the plain model's to
    float tolerance; state_dict keys are unchanged by wrap and unwrap; unwrap leaves no SampledLinear
    and no hook (sampling knobs set after unwrap change nothing)."""
    family = _build(name, dtype=torch.float32)
    model, reference = family.model, copy.deepcopy(family.model)
    keys = list(model.state_dict())
    num_linear = sum(type(m) is nn.Linear for m in model.modules())

    def grads(m: nn.Module) -> list[torch.Tensor]:
        params = [p for p in m.parameters() if p.requires_grad]
        gs = torch.autograd.grad(family.loss_fn(m), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]

    expected = grads(reference)
    wrapped = wrap(model, family.block_type, torch.Generator().manual_seed(0))
    assert len(wrapped.engine.linears) > 0
    assert all(r == 1.0 for r in wrapped.engine.rho) and all(s.nu == 1.0 for s in wrapped.engine.linears)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(grads(model), expected)

    unwrap(wrapped)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, SampledLinear) for m in model.modules())
    assert sum(type(m) is nn.Linear for m in model.modules()) == num_linear
    wrapped.engine.rho = [0.1] * len(wrapped.engine.rho)
    for slot in wrapped.engine.linears:
        slot.nu = 0.1
    torch.testing.assert_close(grads(model), expected)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


# -- static shapes (docs/method.md §15) -------------------------------------------------------------
STATIC_CASES = ["hf_bert", "tuple_block", *OTHER_PATHS]
# The hidden-state loss leaves one row of block 1 with p = 0.013: in 400 draws it is never drawn with
# probability 0.5%, and its tokens' embedding rows would then look deterministic (and wrong). 1,000
# draws make that 2e-6.
STATIC_DRAWS = {"hf_bert_hidden_state_loss": 1000}


@pytest.mark.parametrize("name", STATIC_CASES)
def test_static_shapes_gradient_is_unbiased(name):
    """``static_shapes``: SampleA keeps exactly ``ceil(N * rho)`` rows per block (systematic sampling,
    weights 1/p), SampleW's GEMMs have a fixed size. Same n = 400, settings and bound as above, on BERT,
    the tuple block, and the two models whose blocks receive gradient by other paths. Every draw keeps
    7, 10 and 13 of the 16 rows bottom-up (at least that many rows carry gradient at each block)."""
    d = _draw(_build(name), STATIC_DRAWS.get(name, DRAWS), static_shapes=True)
    stats = _stats(d)
    bad = [s for s in stats if s.biased]
    assert not bad, "biased groups:\n" + _report(bad)
    by_name = {s.name: s for s in stats}
    for k in d.sampled_names:
        s = by_name[k]
        assert s.entries >= 0.9 * (s.entries + s.deterministic), f"{k} barely sampled: {s}"
    expected = torch.tensor([math.ceil(N * r) / N for r in RHO], dtype=d.kept_fraction.dtype)
    assert torch.equal(d.kept_fraction, expected.expand_as(d.kept_fraction)), d.kept_fraction[:3]


def _top_rows_without_randomness(p: torch.Tensor, size: int, generator=None):
    index = torch.topk(p, size).indices.sort().values
    return index, p[index] > 0


def test_static_negative_control_without_random_rows_is_flagged(monkeypatch):
    """HF BERT, n = 200, static shapes, with the systematic draw replaced by the ``m`` rows of largest
    p (weights still 1/p): >= 90% of the encoder-layer groups must be flagged as biased."""
    monkeypatch.setattr(vcas_autograd, "systematic_sample", _top_rows_without_randomness)
    d = _draw(_build("hf_bert"), 200, nu=1.0, static_shapes=True)
    affected = [s for s in _stats(d) if ".encoder.layer." in s.name and s.entries + s.det_mismatch > 0]
    flagged = [s for s in affected if s.biased]
    assert len(affected) >= 10, _report(affected)
    assert len(flagged) >= 0.9 * len(affected), _report(affected)
