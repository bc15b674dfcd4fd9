"""Small builders, each returning one object the training loop needs (torchtune-style setup)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vcas_bench.models import ModelBundle

Batch = dict[str, torch.Tensor]


def build_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against underflow of small gradients; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float):
    """AdamW / Adam / SGD; no weight decay on biases and LayerNorm weights (the BERT recipe)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_ratio: float,
                    clock: Callable[[], float] | None = None):
    """Linear warm-up then linear decay to 0 (HF's ``get_linear_schedule_with_warmup``), or constant.

    ``clock`` (a data-level sampler, whose epochs are short): the schedule's position in full-data steps,
    read instead of the optimizer steps taken, so that it spans the run's epochs as the authors of
    InfoBatch stretch theirs.
    """
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    if clock is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(clock()))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, (N,), in float32.

    Args:
        logits: (N, C) for classification, or (N, L, V) token logits for masked-LM.
        labels: (N,) classes, or (N, L) token ids with -100 where a token is not predicted.

    For masked-LM an example's loss is the mean over its masked tokens (0 for an example with none), so
    the samplers that pick examples by their loss (SB, UB) see one number per example.
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none",
                                ignore_index=-100).view(labels.shape)  # 0 at ignored tokens
    return per_token.sum(1) / labels.ne(-100).sum(1).clamp_min(1)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_loss_fn(bundle: ModelBundle, device: torch.device, precision: str = "fp32",
                  compile: bool = False) -> Callable[..., tuple]:
    """``batch -> (per-example cross-entropy (N,), logits)``, moving the batch to ``device``.

    With ``precision`` bf16 or fp16 the forward runs under autocast; the loss is taken in float32.
    With ``compile`` the model runs under ``torch.compile`` (compiled at its first call, so after a
    sampler wrapped it); it shares the parameters, hooks and sampler of ``bundle.model``.
    """
    dtype = PRECISIONS[precision]
    if compile:
        # VCAS's variance phase backpropagates one forward more than once (retain_graph), which a
        # compiled backward with donated buffers refuses; this process-wide switch allows it.
        torch._functorch.config.donated_buffer = False
        bundle = dataclasses.replace(bundle, model=torch.compile(bundle.model))

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = bundle.logits_fn(bundle.model, batch)
        return per_example_loss(logits, batch["labels"]), logits

    return loss_fn


@torch.no_grad()
def evaluate(bundle: ModelBundle, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Accuracy and mean loss over the whole eval set, in eval mode (dropout off).

    For masked-LM both are over the masked tokens (labels other than -100): token accuracy and the
    mean cross-entropy per predicted token.
    """
    model = bundle.model
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = bundle.logits_fn(model, batch).float()
        logits, labels = logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        scored = labels.ne(-100)
        logits, labels = logits[scored], labels[scored]
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return {"eval_accuracy": correct / total, "eval_loss": loss_sum / total}


def evaluate_all(
    bundle: ModelBundle, loaders: dict[str, DataLoader], device: torch.device
) -> dict[str, float]:
    """:func:`evaluate` on each loader; keys ``eval_<prefix>accuracy`` (prefix "" for the main set)."""
    results = {}
    for prefix, loader in loaders.items():
        scores = evaluate(bundle, loader, device)
        results.update({key.replace("eval_", f"eval_{prefix}"): value for key, value in scores.items()})
    return results


def planned_steps(num_train: int, batch_size: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) for ``epochs`` over ``num_train`` rows, capped."""
    per_epoch = max(1, num_train // batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    return (min(total, max_steps) if max_steps else total), per_epoch
