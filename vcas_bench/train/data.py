"""Training batches as resumable streams: the data position is part of a checkpoint.

A :class:`BatchStream` hands out batches epoch after epoch from a seeded loader and can save and
restore its place mid-epoch without replaying the batches before it. :class:`ShardedOrder` is the
loader's index order (a ``torch.utils.data.Sampler``, named apart from this project's samplers, which
decide the backward): the same seeded permutation on every rank, each rank taking every
``world``-th index (``torch.utils.data.DistributedSampler``'s scheme), and able to start part-way in.

A data-level sampler (InfoBatch) is also an :class:`EpochPlanner`: at each epoch's start it keeps a
subset of the shuffled order (pruned rows are never loaded), and its batches carry an ``index`` field
(the row's position in the dataset, :class:`IndexedRows`) so that it can key per-example state by row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ShardedOrder", "BatchStream", "EpochPlanner", "IndexedRows", "build_train_stream",
           "build_extra_stream"]

EXTRA_SEED_OFFSET = 1_000_003  # variance-phase batches: an order of their own, apart from training's


@runtime_checkable
class EpochPlanner(Protocol):
    """Chooses the rows of each epoch from its shuffled order (a data-level sampler: InfoBatch)."""

    def plan_epoch(self, epoch: int, order: list[int], num_rows: int, min_rows: int) -> list[int]:
        """The rows of ``epoch``, in training order, out of ``order`` (a shuffled subset of the
        ``num_rows`` dataset rows); at least ``min_rows`` of them. Asked again for the same epoch
        (a resumed run), it must return the same plan."""

    def planned_rows(self, epoch: int) -> int | None:
        """How many rows ``epoch``'s plan holds, or None before it is planned."""


class IndexedRows(Dataset):
    """``dataset`` whose rows also carry ``index``, their position in it (so batches have an index field)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "index": torch.tensor(index)}


class ShardedOrder(Sampler[int]):
    """Shuffled indices, one permutation per epoch from ``generator``, sharded by rank.

    With one rank it draws exactly what ``RandomSampler(generator=...)`` draws (including the
    permutation RandomSampler draws for its empty remainder when an epoch is exhausted), so the data
    order of single-process runs is the one earlier versions produced. Every rank shares the
    generator's seed, so the ranks agree on the permutation and their shards do not overlap; the
    ``n % world`` last indices of the permutation are dropped so that all ranks take as many steps.
    """

    def __init__(self, num_rows: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.num_rows, self.generator, self.rank, self.world = num_rows, generator, rank, world
        self.start = 0  # indices of this rank's shard to skip in the next epoch (resume)
        self.planner: EpochPlanner | None = None  # a data-level sampler's per-epoch subset, if any
        self.epoch, self.min_rows = 0, 1  # set by the stream for the planner

    def __len__(self) -> int:
        planned = self.planner.planned_rows(self.epoch) if self.planner is not None else None
        return self.num_rows // self.world if planned is None else planned

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=self.generator)
        order = order[: self.num_rows // self.world * self.world][self.rank :: self.world].tolist()
        if self.planner is not None:  # the same permutation as every sampler's, then the epoch's subset
            order = self.planner.plan_epoch(self.epoch, order, self.num_rows, self.min_rows)
        start, self.start = self.start, 0
        yield from order[start:]
        torch.randperm(self.num_rows, generator=self.generator)  # RandomSampler's remainder draw


class BatchStream:
    """Endless batches from ``loader``, epoch after epoch; :meth:`state_dict` is its position.

    The saved generator state is the one the current epoch started from (or, at an epoch's end, the
    one the next epoch starts from); on resume the epoch's permutation is drawn again and the batches
    already used are skipped by index, without loading them.
    """

    def __init__(self, loader: DataLoader, order: ShardedOrder, generator: torch.Generator) -> None:
        self.loader, self.order, self.generator = loader, order, generator
        self.epoch, self.index = 0, 0  # batches taken in the current epoch
        self._iterator: Iterator[Any] | None = None
        self._epoch_start = generator.get_state()

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch_done(self) -> bool:
        return self.index >= len(self)

    @property
    def progress(self) -> float:
        """Epochs done, counting the current one's share of its batches (a planned epoch may be short)."""
        return self.epoch + self.index / max(1, len(self))

    def next(self) -> Any:
        if self._iterator is None:
            self.order.epoch = self.epoch  # the planner's plan of the epoch that is ending, or resumed
            if self.epoch_done:
                self.epoch, self.index = self.epoch + 1, 0
                self.order.epoch = self.epoch
            self._epoch_start = self.generator.get_state()
            self.order.start = self.index * self.loader.batch_size
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        self.index += 1
        if self.epoch_done:  # exhaust the iterator, as a for loop would, then start afresh next time
            next(self._iterator, None)
            self._iterator = None
        return batch

    def __call__(self) -> Any:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        mid_epoch = self._iterator is not None
        state = self._epoch_start if mid_epoch else self.generator.get_state()
        return {"epoch": self.epoch, "index": self.index, "generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self.generator.set_state(state["generator"])
        self._iterator = None


def _stream(dataset: Dataset, batch_size: int, seed: int, rank: int, world: int,
            planner: EpochPlanner | None = None) -> BatchStream:
    generator = torch.Generator().manual_seed(seed)
    order = ShardedOrder(len(dataset), generator, rank, world)
    if planner is not None:
        if world > 1:  # its per-example state would have to be gathered from every rank
            raise ValueError(f"{type(planner).__name__}: data-parallel runs are not supported")
        order.planner, order.min_rows, dataset = planner, batch_size, IndexedRows(dataset)
    # The loader draws its base seed from the same generator, as a shuffling DataLoader does.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, generator=generator, drop_last=True)
    return BatchStream(loader, order, generator)


def build_train_stream(dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                       world: int = 1, planner: EpochPlanner | None = None) -> BatchStream:
    """Shuffled with its own generator, so every sampler of a comparison sees the same data order
    (with a ``planner``, the subset of it the planner keeps, and batches with an ``index`` field)."""
    return _stream(dataset, batch_size, seed, rank, world, planner)


def build_extra_stream(dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                       world: int = 1) -> BatchStream:
    """Fresh random batches for variance phases, from their own loader: the training order is untouched."""
    return _stream(dataset, batch_size, seed + EXTRA_SEED_OFFSET, rank, world)
