"""Shared pieces of the integration tests: a tiny BERT, random token data, the recipes, the runner's
FLOPs accounting replayed from a controller's phase history."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from vcas_bench.vcas import VcasController, step_cost_ratio

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"
T = 8  # tokens per row


def recipe(name: str):
    """``docs/recipes/<name>.py`` imported as a module (the docs show these files verbatim)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_bert(seed: int = 0, layers: int = 2, dropout: float = 0.0) -> nn.Module:
    """The tests' BERT: ``layers`` blocks, hidden 32, 2 heads, MLP 64, vocabulary 100, 3 labels, in train
    mode, initialised under ``seed``. Dropout 0 by default, so that resumed and uninterrupted runs (and
    sampled and exact passes) see the same forward."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=3,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)


class TokenRows(torch.utils.data.Dataset):
    """``rows`` random ``{"input_ids": (T,), "labels": ()}`` examples from a fixed seed."""

    def __init__(self, rows: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (rows, T), generator=g)
        self.labels = torch.randint(0, 3, (rows,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def runner_flops_ratio(ctl: VcasController, steps: int, accumulate: int) -> float:
    """The runner's analytic accounting (``train/loop.py``, ``run.py``) for the schedule ``ctl`` ran:
    per optimizer step, the mean over its micro-batches of the step cost at the rho / nu in effect
    (0 for a folded micro-batch), plus each phase's cost / ``accumulate``; averaged over the steps."""
    phases = {h.step: h for h in ctl.history}
    blocks = [slot.block for slot in ctl.engine.linears]
    rho, nu = [1.0] * ctl.engine.num_blocks, [1.0] * len(blocks)
    total = 0.0
    for step in range(steps):
        folded = False
        if step in phases:
            rho, nu = phases[step].rho, phases[step].nu
            total += phases[step].cost / accumulate
            folded = ctl.config.fold_batch
        per_block = [[v for v, b in zip(nu, blocks) if b == j] for j in range(len(rho))]
        micro = [step_cost_ratio(rho, per_block)] * accumulate
        if folded:
            micro[0] = 0.0
        total += sum(micro) / accumulate
    return total / steps


def schedule(ctl: VcasController) -> list[tuple[int, float, list[float], list[float], float]]:
    """Each phase's step, s, rho, nu and V_s: what a resumed run must reproduce."""
    return [(h.step, h.s, h.rho, h.nu, h.V_s) for h in ctl.history]
