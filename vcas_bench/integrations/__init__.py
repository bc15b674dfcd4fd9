"""VCAS inside training code you already have: a plain loop, HF ``Trainer``, Lightning.

- :mod:`vcas_bench.integrations.loop` — :class:`~vcas_bench.integrations.loop.VcasLoop`, one call per
  micro-batch instead of ``loss.backward()`` (torch only);
- :mod:`vcas_bench.integrations.hf` — ``VcasTrainer``, a ``transformers.Trainer`` that runs VCAS;
- :mod:`vcas_bench.integrations.lightning` — ``VcasCallback``, a Lightning ``Callback``.

Each owns what a user would otherwise have to get right by hand: the stream of extra batches the
variance phases read (their own shuffle, sharded by rank), device placement, autocast, gradient
accumulation (a phase once per optimizer step, costs counted per micro-batch), the folded batch of
``VcasConfig.plus()``, checkpoint state, and the cross-rank ``reduce_fn`` under DDP. Importing this
package, or any of its modules, needs torch only: ``transformers`` and ``lightning`` are imported when
``VcasTrainer`` / ``VcasCallback`` are first used. Recipes: ``docs/integrations.md``.
"""

from vcas_bench.integrations.loop import ExtraBatches, VcasLoop, ddp_mean, ddp_mean_tensors

__all__ = ["VcasLoop", "ExtraBatches", "ddp_mean", "ddp_mean_tensors"]
