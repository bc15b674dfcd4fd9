"""VCAS in a plain PyTorch loop: :class:`VcasLoop` replaces ``loss.backward()`` (torch only).

``vcas.backward(batch)`` does, for one micro-batch: move the batch to the model's device; before the
first micro-batch of an optimizer step that is due, run the variance phase (on the scheduled batch
and fresh batches from its own :class:`ExtraBatches` stream, under the same autocast, on the
unwrapped module so DDP sees nothing); backpropagate either the folded exact loss of the scheduled
batch (``fold_batch``) or the sampled loss, divided by ``accumulate``; count the micro-batch's cost.
The optimizer step stays the user's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vcas_bench.vcas.config import VcasConfig
from vcas_bench.vcas.controller import VcasController, VcasSummary

__all__ = ["VcasLoop", "ExtraBatches", "ddp_mean", "ddp_mean_tensors", "to_device", "world"]

EXTRA_SEED_OFFSET = 1_000_003  # the extra stream's shuffle must not repeat the training order's


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device(t: torch.Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device


def ddp_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all ranks (the controller's ``reduce_fn``; NCCL gets a CUDA copy)."""
    out = t.detach().to(_collective_device(t), copy=True)
    dist.all_reduce(out)
    return (out / dist.get_world_size()).to(t.device)


def ddp_mean_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's mean over all ranks, in one all-reduce (a folded gradient no DDP hook will sync)."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    mean = ddp_mean(flat)
    return [m.view_as(t).to(t.dtype) for m, t in zip(mean.split([t.numel() for t in tensors]), tensors)]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor inside dicts, lists and tuples moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class _EpochShuffle(Sampler[int]):
    """A permutation per epoch from ``seed + epoch`` (no generator chain: a resume only sets the
    epoch), sharded by rank like ``DistributedSampler``, starting ``start`` indices into the shard."""

    def __init__(self, num_rows: int, seed: int, rank: int, world_size: int) -> None:
        self.num_rows, self.seed, self.rank, self.world_size = num_rows, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.num_rows // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        shard = order[: len(self) * self.world_size][self.rank :: self.world_size]
        yield from shard[self.start :].tolist()


class ExtraBatches:
    """Endless fresh batches for the variance phases, from their own shuffle of ``dataset``; the
    training order is untouched. :meth:`state_dict` is the position, restored without loading data."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate_fn: Callable | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.order = _EpochShuffle(len(dataset), seed + EXTRA_SEED_OFFSET, rank, world_size)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.order,
            collate_fn=collate_fn,
            drop_last=True,
            num_workers=num_workers,
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"VCAS extra batches: {len(dataset)} rows over {world_size} rank(s) do not "
                f"fill one batch of {batch_size}"
            )
        self.epoch, self.index = 0, 0
        self._iterator: Iterator[Any] | None = None

    @classmethod
    def like(cls, loader: DataLoader, seed: int = 0, rank: int = 0, world_size: int = 1) -> ExtraBatches:
        """A stream over ``loader``'s dataset with its batch size, collate function and workers."""
        return cls(
            loader.dataset, loader.batch_size, loader.collate_fn, seed, rank, world_size, loader.num_workers
        )

    def __call__(self) -> Any:
        if self.index >= len(self.loader):
            self.epoch, self.index, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self.order.epoch, self.order.start = self.epoch, self.index * self.loader.batch_size
            self._iterator = iter(self.loader)
        self.index += 1
        return next(self._iterator)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._iterator = state["epoch"], state["index"], None


def seeded_for_rank(config: VcasConfig | None, rank: int) -> VcasConfig:
    """``config`` (default: the paper's) with ``seed + rank``: independent draws on every rank."""
    config = config or VcasConfig()
    return dataclasses.replace(config, seed=config.seed + rank)


class VcasLoop:
    """VCAS for a plain training loop; call :meth:`backward` once per micro-batch.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (the inner module is wrapped).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the batch's mean loss.
        extra: where the variance phases draw their fresh batches: a ``DataLoader`` (its dataset is
            reshuffled by its own :class:`ExtraBatches`, sharded by rank), or any ``() -> batch``.
        config: VCAS hyper-parameters (``VcasConfig()`` = paper, ``VcasConfig.plus()``); under DDP
            each rank uses ``seed + rank``.
        block_type: the repeated block's class or class name, or ``"auto"``.
        accumulate: micro-batches per optimizer step (the loss of each is divided by it).
        autocast: a dtype (``torch.bfloat16``) to run every forward under ``torch.autocast``.
        reduce_fn: mean over ranks for the variance estimates; default :func:`ddp_mean` when a process
            group is initialised.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        extra: DataLoader | Callable[[], Any],
        config: VcasConfig | None = None,
        *,
        block_type: type | str = "auto",
        accumulate: int = 1,
        autocast: torch.dtype | None = None,
        reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if accumulate < 1:
            raise ValueError(f"VcasLoop: accumulate must be >= 1, got {accumulate}")
        rank, size = world()
        self.model, self.loss_fn, self.accumulate, self.autocast = model, loss_fn, accumulate, autocast
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.module = model.module if self.ddp else model
        base_seed = (config or VcasConfig()).seed  # one shuffle for all ranks: their shards do not overlap
        reduce_fn = reduce_fn or (ddp_mean if size > 1 else None)
        self.controller = VcasController(self.module, block_type, seeded_for_rank(config, rank), reduce_fn)
        self.grad_mean_fn = ddp_mean_tensors if size > 1 else None
        if isinstance(extra, DataLoader):
            extra = ExtraBatches.like(extra, base_seed, rank, size)
        self.extra = extra
        self.micro = 0  # micro-batches done; the optimizer step is micro // accumulate

    @property
    def device(self) -> torch.device:
        return self.controller.device

    def backward(self, batch: Any) -> torch.Tensor:
        """One micro-batch: the phase if due, then its folded or sampled backward into ``.grad``
        (divided by ``accumulate``); returns its (undivided) loss, detached."""
        ctl, batch = self.controller, to_device(batch, self.device)
        ctl.adapt_if_due(self.micro // self.accumulate, self._phase_loss, batch, self._next_extra)
        loss = ctl.folded_loss(self.grad_mean_fn)
        folded = loss is not None
        last = self.micro % self.accumulate == self.accumulate - 1
        # Between optimizer steps DDP must not all-reduce; a folded loss never goes through DDP.
        sync = contextlib.nullcontext() if last or not self.ddp else self.model.no_sync()
        with sync:
            if not folded:
                with self._autocast():
                    loss = self.loss_fn(self.model, batch)
            (loss / self.accumulate).backward()
        ctl.count_step(0.0 if folded else None)
        self.micro += 1
        return loss.detach()

    def summary(self) -> VcasSummary:
        return self.controller.summary()

    def state_dict(self) -> dict[str, Any]:
        extra = self.extra.state_dict() if isinstance(self.extra, ExtraBatches) else None
        return {"controller": self.controller.state_dict(), "micro": self.micro, "extra": extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.micro = state["micro"]
        if isinstance(self.extra, ExtraBatches) and state["extra"] is not None:
            self.extra.load_state_dict(state["extra"])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _phase_loss(self, batch: Any) -> torch.Tensor:
        with self._autocast():
            return self.loss_fn(self.module, batch)

    def _next_extra(self) -> Any:
        return to_device(self.extra(), self.device)
