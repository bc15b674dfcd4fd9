"""Training batches as resumable streams: the data position is part of a checkpoint.

A :class:`BatchStream` hands out batches epoch after epoch from a seeded loader and can save and
restore its place mid-epoch without replaying the batches before it. :class:`ShardedSampler` is the
loader's index sampler: the same seeded permutation on every rank, each rank taking every
``world``-th index (``torch.utils.data.DistributedSampler``'s scheme), and able to start part-way in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ShardedSampler", "BatchStream", "build_train_stream", "build_extra_stream"]

EXTRA_SEED_OFFSET = 1_000_003  # variance-phase batches: an order of their own, apart from training's


class ShardedSampler(Sampler[int]):
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

    def __len__(self) -> int:
        return self.num_rows // self.world

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=self.generator)
        order = order[: len(self) * self.world][self.rank :: self.world]
        start, self.start = self.start, 0
        yield from order[start:].tolist()
        torch.randperm(self.num_rows, generator=self.generator)  # RandomSampler's remainder draw


class BatchStream:
    """Endless batches from ``loader``, epoch after epoch; :meth:`state_dict` is its position.

    The saved generator state is the one the current epoch started from (or, at an epoch's end, the
    one the next epoch starts from); on resume the epoch's permutation is drawn again and the batches
    already used are skipped by index, without loading them.
    """

    def __init__(self, loader: DataLoader, sampler: ShardedSampler, generator: torch.Generator) -> None:
        self.loader, self.sampler, self.generator = loader, sampler, generator
        self.epoch, self.index = 0, 0  # batches taken in the current epoch
        self._iterator: Iterator[Any] | None = None
        self._epoch_start = generator.get_state()

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch_done(self) -> bool:
        return self.index >= len(self)

    def next(self) -> Any:
        if self._iterator is None:
            if self.epoch_done:
                self.epoch, self.index = self.epoch + 1, 0
            self._epoch_start = self.generator.get_state()
            self.sampler.start = self.index * self.loader.batch_size
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


def _stream(dataset: Dataset, batch_size: int, seed: int, rank: int, world: int) -> BatchStream:
    generator = torch.Generator().manual_seed(seed)
    sampler = ShardedSampler(len(dataset), generator, rank, world)
    # The loader draws its base seed from the same generator, as a shuffling DataLoader does.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator, drop_last=True)
    return BatchStream(loader, sampler, generator)


def build_train_stream(dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                       world: int = 1) -> BatchStream:
    """Shuffled with its own generator, so every sampler of a comparison sees the same data order."""
    return _stream(dataset, batch_size, seed, rank, world)


def build_extra_stream(dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                       world: int = 1) -> BatchStream:
    """Fresh random batches for variance phases, from their own loader: the training order is untouched."""
    return _stream(dataset, batch_size, seed + EXTRA_SEED_OFFSET, rank, world)
