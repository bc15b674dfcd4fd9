"""Mixed precision (``trainer.precision``): autocast forward, the sampled Linear under autocast, fp16 loss
scaling, and VCAS's statistics in float32 whatever the compute dtype."""

from __future__ import annotations

import math

import pytest
import torch
from test_vcas_controller import _batches, _controller

from vcas_bench.train.run import run
from vcas_bench.train.state import latest_checkpoint, load_checkpoint
from vcas_bench.vcas.variance import VarianceEstimate
from vcas_bench.vcas.wrap import SampledLinear


def _sampled_step(dtype: torch.dtype | None) -> tuple[list[float], dict[str, torch.Tensor], set]:
    """One VCAS backward at fixed rho = nu = 0.5 from a fixed generator state; returns SampleA's kept
    fractions per block, the gradients and the dtypes the sampled linears computed in."""
    ctrl = _controller(M=2, F=1)
    model = ctrl.wrapped.model
    ctrl.engine.rho = [0.5, 0.5, 0.5]
    for slot in ctrl.engine.linears:
        slot.nu = 0.5
    ctrl.generator.manual_seed(5)  # the controller's own generator, not the global RNG
    dtypes = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
             for m in model.modules() if isinstance(m, SampledLinear)]
    (batch,) = _batches(1, seed=3)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(**batch).loss
    loss.float().backward()
    for hook in hooks:
        hook.remove()
    return list(ctrl.engine.kept_fraction), {n: p.grad for n, p in model.named_parameters()}, dtypes


def test_bf16_autocast_vcas_step_is_finite_and_keeps_the_same_rows_as_fp32():
    """bf16 autocast on CPU: the sampled linears compute in bf16, gradients come back finite in the
    parameters' fp32, and SampleA keeps the same number of rows per block as in fp32 (its probabilities
    are computed in fp32 from norms that bf16 perturbs by ~1%, far from this case's draw thresholds);
    the gradient stays close to fp32's (cosine > 0.99)."""
    kept32, grads32, dtypes32 = _sampled_step(None)
    kept16, grads16, dtypes16 = _sampled_step(torch.bfloat16)
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert kept16 == kept32 and min(kept32) < 1  # rows were dropped, the same number in both
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([g.flatten() for g in grads16.values()])
    assert all(g.dtype == torch.float32 for g in grads16.values())
    assert bool(torch.isfinite(flat16).all())
    assert float(torch.nn.functional.cosine_similarity(flat16, flat32, dim=0)) > 0.99


def test_a_phase_with_non_finite_statistics_changes_nothing():
    """An fp16 overflow makes the variance sums inf: s, rho and nu stay; the phase is still recorded."""
    ctrl = _controller(M=2, F=1, tau_act=0.0)
    ctrl.engine.rho = [0.7, 0.8, 0.9]
    before = (ctrl.s, ctrl.rho, ctrl.nu)
    estimate = VarianceEstimate(V_s_layer=[1.0] * 18, V_w_layer=[math.inf] * 18, V_act=math.nan,
                                keep_at={+1: [0.5] * 3, -1: [0.4] * 3})
    ctrl._update(estimate, step=0, cost=0.0)
    assert (ctrl.s, ctrl.rho, ctrl.nu) == before and len(ctrl.history) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_vcas_run(make_cfg, tmp_path, precision):
    """Six VCAS steps with phases on vit-tiny: finite losses; fp16 checkpoints its loss scaler."""
    cfg = make_cfg("task=digits", "model=vit-tiny", "sampler=vcas", "baselines=[]", "sampler.F=2",
                   "trainer.max_steps=6", "task.args.train_size=256", "task.args.eval_size=64",
                   "trainer.num_threads=1", f"trainer.precision={precision}", "trainer.checkpoint_every=6")
    (metrics,) = run(cfg, tmp_path)
    assert metrics["precision"] == precision and metrics["adapt_phases"] == 3
    assert math.isfinite(metrics["final_train_loss"]) and math.isfinite(metrics["eval_loss"])
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "vcas"))["scaler"]
    assert (scaler is not None and scaler["scale"] > 0) if precision == "fp16" else scaler is None
