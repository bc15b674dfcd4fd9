"""Recipe: VCAS in a plain PyTorch loop, with gradient accumulation (docs/integrations.md)."""

import torch

from vcas_bench.integrations.loop import VcasLoop  # + VCAS
from vcas_bench.vcas import VcasConfig  # + VCAS (VcasConfig() is the paper's; .plus() the vcas-plus preset)


def loss_fn(model, batch):
    return model(**batch).loss  # the batch's mean loss, a scalar tensor


def train(model, loader, steps, accumulate=2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vcas = VcasLoop(model, loss_fn, loader, VcasConfig.plus(F=2), accumulate=accumulate)  # + VCAS
    batches = iter(loader)
    for _ in range(steps):
        for _ in range(accumulate):
            vcas.backward(next(batches))  # was: (loss_fn(model, batch) / accumulate).backward()
        optimizer.step()
        optimizer.zero_grad()
    return vcas
