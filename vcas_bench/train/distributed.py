"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, nccl on CUDA).

Launch: ``torchrun --nproc_per_node=N -m vcas_bench ...``; each process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from its environment (in a multi-task SLURM job, submitit derives them from SLURM's).
Without them (or with ``WORLD_SIZE=1``) everything here is a no-op.

What is synchronised, and how:

- gradients: after a step's micro-batches each rank's ``.grad`` is averaged over ranks with one
  all-reduce per dtype (not DDP's bucketed hooks: VCAS's variance phase takes gradients with
  ``autograd.grad``, and SB/UB backpropagate subsets, neither of which DDP's reducer expects);
- VCAS's variance statistics, through the controller's ``reduce_fn``: every rank runs the phase on its
  own batches, the estimates are averaged, and every rank then takes the same decision (s, rho, nu);
- the logged loss (the global batch mean) and the NaN guard, so that all ranks stop together;
- checkpoints: rank 0 writes; every rank's RNG, sampler and data position are gathered into it.

Per rank: the data shard, the variance-phase batches, dropout (global RNG seeded ``seed + rank``, the
weights then broadcast from rank 0) and the samplers' own generators (``seed + rank``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "init_distributed", "close_distributed"]


@dataclass
class Dist:
    """This process's place among the data-parallel ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives run (CUDA for nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """Mean of a scalar over ranks."""
        if self.world == 1:
            return value
        return float(self.mean_tensor(torch.tensor([value], dtype=torch.float64))[0])

    def mean_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over ranks (the VCAS controller's ``reduce_fn``); returned on the CPU."""
        if self.world == 1:
            return tensor
        buffer = tensor.to(self.device, copy=True)
        dist.all_reduce(buffer)
        return (buffer / self.world).cpu()

    def mean_gradients(self, model: nn.Module) -> None:
        """Average ``.grad`` over ranks; a missing gradient counts as zero (a rank that kept no row)."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        for dtype in {p.grad.dtype for p in params}:
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Rank 0's weights everywhere (each rank initialised its own from its own seed)."""
        if self.world == 1:
            return
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` set up; returns this rank and its training device."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # A SLURM job with several tasks (hydra/launcher=slurm, tasks_per_node > 1): submitit derives
        # torchrun's variables (rank, world size, master address) from SLURM's.
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device), device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
