"""Recipe: VCAS in a plain loop under DistributedDataParallel (docs/integrations.md).

Start one process per rank (``torchrun --nproc_per_node=N``, or ``torch.multiprocessing.spawn``).
Every rank estimates the variances on its own batches; ``reduce_fn=ddp_mean`` averages the estimates
so that all ranks take the same decision, while each rank draws its own samples (``seed + rank``).
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from vcas_bench.integrations.loop import VcasLoop, ddp_mean  # + VCAS
from vcas_bench.vcas import VcasConfig


def loss_fn(model, batch):
    return model(**batch).loss


def train(model, dataset, steps, accumulate=2):
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, world, rank, seed=0))
    ddp_model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)
    # + VCAS: reduce_fn averages the variance estimates over ranks (the default whenever a group is up)
    vcas = VcasLoop(ddp_model, loss_fn, loader, VcasConfig.plus(F=2), accumulate=accumulate,
                    reduce_fn=ddp_mean)
    batches = iter(loader)
    for _ in range(steps):
        for _ in range(accumulate):
            vcas.backward(next(batches))  # was: (loss_fn(ddp_model, batch) / accumulate).backward()
        optimizer.step()
        optimizer.zero_grad()
    return vcas
