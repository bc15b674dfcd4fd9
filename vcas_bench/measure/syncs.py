"""Count host syncs: the operations that make the host wait for a device value.

A GPU runs ahead of the Python thread until the host needs a number from it (``.item()``,
``float(t)``, ``bool(t)``, ``int(t)``, ``nonzero``, a device-to-host copy). Each such read drains the
device queue. :class:`SyncCounter` is a ``TorchDispatchMode`` that counts them by operator, so a test
can pin a budget on a CPU machine (where the same reads cost nothing but are still made)::

    with SyncCounter() as syncs:
        loss.backward()
    assert syncs.total <= num_blocks

Counted: ``aten._local_scalar_dense`` (``item``/``float``/``bool``/``int`` of a tensor),
``aten.is_nonzero``, ``aten.nonzero``, ``aten.masked_select``, boolean-mask indexing
(``aten.index.Tensor`` with a bool index, which calls ``nonzero`` inside), ``aten.unique*``,
``aten.repeat_interleave`` without ``output_size``, and copies from a non-CPU device to the CPU.
Not visible: ``Tensor.tolist()`` and ``.numpy()`` of a tensor already on the CPU (they read memory
without dispatching); on a GPU they go through a counted device-to-host copy.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SYNC_OPS"]

_aten = torch.ops.aten
# Operators whose output size or value the host must read before it can go on.
SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.is_nonzero.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.nonzero.out: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.unique_dim.default: "unique",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
}


class SyncCounter(TorchDispatchMode):
    """A dispatch mode counting host syncs by kind (``counts``) and in all (``total``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _sync_kind(func, args, kwargs)
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **kwargs)


def _sync_kind(func, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """The kind of host sync ``func(*args, **kwargs)`` makes, or ``None``."""
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func is _aten.index.Tensor:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return "nonzero"
    if func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor):
        return None if kwargs.get("output_size") is not None else "repeat_interleave"
    if func in (_aten._to_copy.default, _aten.copy_.default):
        return "device_to_host" if _device_to_host(func, args, kwargs) else None
    return None


def _device_to_host(func, args: tuple, kwargs: dict[str, Any]) -> bool:
    if func is _aten.copy_.default:  # copy_(dst, src)
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu" and not dst.is_pinned()
    src = args[0]
    target = kwargs.get("device")
    non_blocking = kwargs.get("non_blocking", False)
    return (src.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
            and not non_blocking)
