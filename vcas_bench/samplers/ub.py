"""``ub``: upper-bound importance sampling (Katharopoulos & Fleuret 2018, "Not all samples are created
equal"), as the VCAS paper compares against it (docs/method.md §12).

Forward the full batch of ``N``; score each example by the upper bound on its gradient norm, the
norm of the loss gradient at the logits (``||softmax(z) - onehot(y)||`` for cross-entropy; for masked-LM
the same over the example's masked tokens, divided by their count, the loss being their mean); draw
``b = round(N * ratio)`` examples with replacement with ``p_i ∝ score_i``; weight each draw by
``1 / (b * N * p_i)`` so that the gradient is an unbiased estimate of the batch-mean gradient; and
backpropagate only the drawn examples.

``tau_th`` (optional, off by default) is the original's switch: importance sampling is used only
when the estimated variance reduction ``tau = N * sum(score^2) / sum(score)^2`` (the ratio of the
second moments of uniform and importance sampling under the bound) exceeds it; uniform otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vcas_bench.samplers.base import SAMPLERS, LossFn, ReduceFn, StepStats
from vcas_bench.samplers.rows import RowSubsetSampler


def gradient_norm_bound(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The norm of each example's loss gradient at the logits, (N,).

    Classification, logits (N, C): ``||softmax(z_i) - onehot(y_i)||_2``. Masked-LM, logits (N, L, V) and
    labels -100 at unmasked tokens, with the per-example loss the mean over its ``m_i`` masked tokens:
    ``sqrt(sum_t ||softmax(z_it) - onehot(y_it)||^2) / m_i`` over the masked tokens (0 without any).
    """
    if logits.dim() == 2:
        probs = torch.softmax(logits.detach().float(), dim=-1)
        return (probs - torch.nn.functional.one_hot(labels, probs.shape[-1]).float()).norm(dim=-1)
    masked = labels.ne(-100)
    row = masked.nonzero()[:, 0]  # example of each masked token
    probs = torch.softmax(logits.detach()[masked].float(), dim=-1)  # only the masked tokens
    sq = (probs - torch.nn.functional.one_hot(labels[masked], probs.shape[-1]).float()).square().sum(-1)
    per_example = torch.zeros(len(labels), device=sq.device).index_add_(0, row, sq)
    return per_example.sqrt() / masked.sum(1).clamp_min(1)


def variance_reduction(scores: torch.Tensor) -> float:
    """``N * sum(s^2) / sum(s)^2`` (>= 1): how much importance sampling shrinks the second moment."""
    total = scores.sum()
    return float(len(scores) * scores.square().sum() / total.square()) if total > 0 else 1.0


def importance_weights(p: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``draws`` indices with replacement from ``p``; weight ``count_i / (draws * N * p_i)``."""
    idx = torch.multinomial(p, draws, replacement=True, generator=generator)
    counts = torch.bincount(idx, minlength=len(p)).float()
    return torch.where(counts > 0, counts / (draws * len(p) * p), torch.zeros_like(p))


@SAMPLERS.register("ub")
class UpperBoundSampler(RowSubsetSampler):
    """Unbiased importance sampling of examples by the loss-gradient upper bound."""

    name = "ub"

    @dataclass
    class Settings:
        ratio: float = 1 / 3  # b / N, the paper's keep ratio
        tau_th: float | None = None  # switch to uniform sampling below this variance reduction

        def __post_init__(self) -> None:
            if not 0 < self.ratio <= 1:
                raise ValueError(f"invalid ub settings: ratio={self.ratio}")

    def __init__(self, settings: Settings, seed: int = 0, reduce_fn: ReduceFn | None = None) -> None:
        # Each rank decides per example from its own batch: nothing to agree on, reduce_fn is unused.
        self.settings = settings
        super().__init__(seed)

    def probabilities(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores = gradient_norm_bound(logits, labels).cpu()
        uniform = torch.full_like(scores, 1 / len(scores))
        if scores.sum() <= 0:
            return uniform
        if self.settings.tau_th is not None and variance_reduction(scores) <= self.settings.tau_th:
            return uniform
        return scores / scores.sum()

    def step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepStats:
        losses, logits = loss_fn(batch)
        p = self.probabilities(logits, batch["labels"].to(logits.device))
        draws = max(1, round(len(p) * self.settings.ratio))
        weights = importance_weights(p, draws, self.generator)  # on the CPU, like the rows it keeps
        return self.backward_weighted(losses, weights)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
