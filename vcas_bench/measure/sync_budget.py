"""Host syncs of one training step against the depth of a BERT stack, for each sampler and mode
(``scripts/sync_check.py``; docs/benchmarks.md). On a GPU, ``torch.cuda.set_sync_debug_mode("warn")``
is on during the backward and the warnings it raises are counted beside the dispatch-mode count.

Steps are at rho = nu = 0.5 for VCAS (fixed, no controller); SB and UB keep their own default ratios.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from vcas_bench.measure.syncs import SyncCounter
from vcas_bench.samplers import create_sampler
from vcas_bench.vcas import wrap

__all__ = ["SyncCount", "count_syncs", "SAMPLERS"]

T = TypeVar("T")
SAMPLERS = ("exact", "vcas", "vcas-static", "sb", "ub")
BATCH, SEQ = 16, 32


@dataclass
class SyncCount:
    sampler: str
    layers: int
    backward: int  # host syncs in the backward (dispatch mode)
    step: int  # in the whole step: forward, loss, selection, backward, statistics
    cuda_warnings: int | None  # syncs torch.cuda's sync debug mode warned about in the backward (GPU)

    def as_dict(self) -> dict:
        return asdict(self)


def _bert(layers: int, hidden: int, device: torch.device) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, num_labels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForSequenceClassification(config).to(device).train()


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 1000, (BATCH, SEQ), generator=g).to(device),
            "labels": torch.randint(0, 3, (BATCH,), generator=g).to(device)}


class _Backward:
    """Counts what happens inside the sampler's backward while the step runs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.syncs, self.cuda_warnings = device, 0, None

    def run(self, fn: Callable[[], T]) -> T:
        cuda = self.device.type == "cuda"
        with warnings.catch_warnings(record=True) as caught, SyncCounter() as counter:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                result = fn()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        self.syncs += counter.total
        if cuda:
            warned = sum("synchroniz" in str(w.message) for w in caught)
            self.cuda_warnings = (self.cuda_warnings or 0) + warned
        return result


def count_syncs(sampler: str, layers: int, device: torch.device, hidden: int = 64) -> SyncCount:
    """Host syncs of one step of ``sampler`` (one of :data:`SAMPLERS`) on a ``layers``-deep BERT."""
    model = _bert(layers, hidden, device)
    batch = _batch(device)
    backward = _Backward(device)

    def loss_fn(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=b["input_ids"]).logits
        return F.cross_entropy(logits, b["labels"], reduction="none"), logits

    with SyncCounter() as step:
        if sampler in ("sb", "ub"):
            rows = create_sampler(sampler, seed=0)
            rows.attach(model, "BertLayer", total_steps=10)
            inner = rows.rows.backward
            rows.rows.backward = lambda losses, weights: backward.run(lambda: inner(losses, weights))
            rows.step(batch, loss_fn)
            rows.detach()
        else:
            sampled = None
            if sampler != "exact":
                sampled = wrap(model, "BertLayer", torch.Generator().manual_seed(0)).engine
                sampled.static_shapes = sampler == "vcas-static"
                sampled.rho = [0.5] * layers
                for slot in sampled.linears:
                    slot.nu = 0.5
            loss = loss_fn(batch)[0].mean()
            backward.run(loss.backward)
            if sampled is not None:
                sampled.read_step()  # the per-step read of the statistics
    return SyncCount(sampler, layers, backward.syncs, step.total, backward.cuda_warnings)
