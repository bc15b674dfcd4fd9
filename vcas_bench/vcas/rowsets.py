"""Which batch rows a sampled backward works on, and how a block hands them to its linears.

A :class:`RowSet` holds the kept rows and the skipped rest as device index tensors (one stable sort
gives both), so a linear can gather the kept rows and zero-fill the others without reading anything
back. :func:`row_set` reads one number (the count) from the device; :func:`fixed_row_set` knows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowSet", "BlockRows", "row_set", "fixed_row_set"]


@dataclass
class RowSet:
    """The batch rows a backward works on: ``rows`` (sorted), the ``skipped`` rest, and the ``mask``."""

    rows: torch.Tensor
    skipped: torch.Tensor
    mask: torch.Tensor  # (N,) bool, True at ``rows``


def row_set(mask: torch.Tensor) -> RowSet | None:
    """The rows where ``mask`` is set; ``None`` when that is all of them. One host read (the count)."""
    count = int(mask.sum())
    if count == mask.numel():
        return None
    return _split_rows(mask, count)


def fixed_row_set(index: torch.Tensor, n: int) -> RowSet:
    """The ``index`` rows (a fixed number, sorted) out of ``n``, without a host read."""
    mask = torch.zeros(n, dtype=torch.bool, device=index.device).index_fill_(0, index, True)
    return _split_rows(mask, index.numel())


def _split_rows(mask: torch.Tensor, count: int) -> RowSet:
    # A stable sort puts the set rows first in index order: both index lists from one kernel, no read.
    order = torch.argsort((~mask).to(torch.int8), stable=True)
    return RowSet(order[:count], order[count:], mask)


@dataclass
class BlockRows:
    """One call of one block: the rows its SampleA kept, for its linears to reuse."""

    rows: RowSet | None = None  # None: every row
    decided: bool = False  # SampleA of this call has run its backward
    other_paths: bool = False  # gradient may enter the block's linears elsewhere: they read their own rows
