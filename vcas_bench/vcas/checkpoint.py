"""VCAS-aware activation checkpointing: a block's backward re-runs its forward on the rows SampleA kept.

With plain checkpointing a block's forward keeps only its input, and its backward re-runs the whole
forward before backpropagating it: two forwards and a backward per step. Here the re-run happens after
the block's SampleA has drawn its rows, so it runs on those rows only, and every op of the block
(linears, LayerNorm, activation, softmax and attention, dropout, residual adds) is backpropagated on a
batch of ``|kept|`` rows: one forward plus ``rho`` x (forward + backward).

It is unbiased for the same reason the plain sampled backward is: a row-independent block's gradient
restricted to the kept rows is exactly the rows' own gradient. Two things make that hold:

- the block must not mix rows. BatchNorm in train mode does; :func:`checkpoint_block` refuses it;
- the re-run must see the forward's random masks. The forward draws every dropout mask of the *full*
  batch and keeps it as a boolean mask (:class:`_RowReplay`, a dispatch mode); the re-run takes the kept
  rows' part, so each kept row meets the very mask it met in the forward, and nothing is drawn twice.
  A random op that cannot be replayed so (dropout fused into an attention kernel on a GPU,
  ``torch.rand`` inside a block) stops the re-run with a one-line error instead of drawing a new mask.

Dimension 0 of the block's input and of every activation inside it is the batch (or, for blocks that
split images into windows, ``batch x windows``, image-major), as :mod:`vcas_bench.vcas.wrap` assumes.
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint

from vcas_bench.vcas.autograd import RowEngine
from vcas_bench.vcas.rowsets import BlockRows, RowSet

__all__ = ["checkpoint_block", "restore_block", "uses_hf_checkpointing", "CheckpointError"]

_aten = torch.ops.aten
# Attention kernels whose dropout is drawn inside the kernel: a re-run on fewer rows cannot replay it.
_FUSED_DROPOUT = tuple(
    op for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                    "_efficient_attention_forward", "_flash_attention_forward")
    if (op := getattr(_aten, name, None)) is not None)


_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class CheckpointError(RuntimeError):
    """A block VCAS cannot checkpoint row by row (it would silently change the gradient)."""


class _RowReplay(TorchDispatchMode):
    """Dropout and Bernoulli draws of a checkpointed block: drawn in the forward, reused in the re-run.

    In the forward (``rows=None``) every draw is made over the full batch in a contiguous layout and kept
    as a boolean mask in ``masks``; the re-run on ``rows`` (of ``n``) takes its rows' part of each mask, in
    order, and draws nothing. So each kept row meets the very mask it met in the forward, the re-run does
    not pay for the full batch's draws again (dropout costs time, not FLOPs), and repeated backwards of
    one forward (the variance phase's) replay the same masks."""

    def __init__(self, n: int, rows: torch.Tensor | None, block: str, masks: list[torch.Tensor],
                 replay: bool) -> None:
        super().__init__()
        self.n, self.rows, self.block, self.masks, self.used = n, rows, block, masks, 0
        self.replay = replay  # the re-run (``rows`` None: all of them), not the forward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.native_dropout.default:
            return self._dropout(*args, **kwargs)
        if func is _aten.bernoulli_.float and kwargs.get("generator") is None and len(args) <= 2:
            target = args[0]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            return target.copy_(self._draw(target.shape, target.dtype, target.device, p))
        if self.replay:
            self._refuse_unreplayable(func, args, kwargs)
        return func(*args, **kwargs)

    def _dropout(self, x: torch.Tensor, p: float, train: bool | None):
        if not train or p == 0:
            return _aten.native_dropout.default(x, p, train)
        keep = self._draw(x.shape, x.dtype, x.device, 1 - p)
        return x * keep * (1.0 / (1 - p)), keep.bool()

    def _draw(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, p: float) -> torch.Tensor:
        if not self.replay:
            keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(p)
            self.masks.append(keep.bool())
            return keep
        if self.used >= len(self.masks):
            raise CheckpointError(f"VCAS checkpointing: the re-run of {self.block} draws more random masks "
                                  "than its forward did")
        full, self.used = self.masks[self.used], self.used + 1
        if self.rows is None:
            return full.to(dtype)
        kept = self.rows.numel()
        if shape[0] % kept or full.shape[0] != shape[0] // kept * self.n or full.shape[1:] != shape[1:]:
            raise CheckpointError(f"VCAS checkpointing: a random draw of shape {tuple(shape)} in "
                                  f"{self.block} is not batch-major ({kept} kept rows): no replay")
        return full.view(self.n, -1).index_select(0, self.rows).view(shape).to(dtype)

    def _refuse_unreplayable(self, func, args, kwargs) -> None:
        fused = func.overloadpacket in _FUSED_DROPOUT
        if fused:
            names = [arg.name for arg in func._schema.arguments]
            at = names.index("dropout_p") if "dropout_p" in names else len(args)
            unreplayable = bool(kwargs.get("dropout_p", args[at] if at < len(args) else 0.0))
        else:
            unreplayable = torch.Tag.nondeterministic_seeded in func.tags
        if unreplayable:
            what = "attention dropout inside a fused kernel" if fused else f"the random op {func}"
            raise CheckpointError(
                f"VCAS checkpointing cannot replay {what} in {self.block} on the kept rows; use eager "
                "attention (attn_implementation='eager'), set that dropout to 0, or turn checkpointing off")


@dataclass
class _Call:
    """One forward call of a checkpointed block: what its re-run needs."""

    name: str
    forward: Any  # the block's own forward (unbound from the patch)
    engine: RowEngine
    index: int
    rows: BlockRows
    args: tuple
    kwargs: dict
    params: list[torch.Tensor]
    training: bool
    masks: list[torch.Tensor] = field(default_factory=list)  # the forward's random draws (_RowReplay)
    extras: tuple = ()  # the outputs after the hidden state (not floating tensors)
    tuple_out: bool = False  # the block returns a tuple (hidden state first)

    def run(self, hidden: torch.Tensor, rows: torch.Tensor | None, replay: bool) -> Any:
        n = self.args[0].shape[0]
        args, kwargs = (hidden, *self.args[1:]), self.kwargs
        if rows is not None:
            args, kwargs = tree_map(lambda t: _take_rows(t, rows, n), (args, kwargs))
            args = (hidden, *args[1:])
        if not self.training:
            return self.forward(*args, **kwargs)
        with _RowReplay(n, rows, self.name, self.masks, replay):
            return self.forward(*args, **kwargs)


def _take_rows(value: Any, rows: torch.Tensor, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.index_select(0, rows)
    return value


class _RowCheckpoint(torch.autograd.Function):
    """Forward: the block without a graph. Backward: the block again on the rows SampleA kept, with grad,
    and its backward on them; returns the input's gradient (zero on the other rows) and the parameters'."""

    @staticmethod
    def forward(ctx, call: _Call, hidden: torch.Tensor, *params: torch.Tensor):
        ctx.call = call
        ctx.save_for_backward(hidden)
        out = call.run(hidden, None, replay=False)
        if isinstance(out, torch.Tensor):
            return out
        call.tuple_out, call.extras = True, tuple(out[1:])
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tree_flatten(call.extras)[0]):
            raise _NotRowCompact("it returns tensors besides its hidden state (attention weights, a position "
                                 "bias), whose gradient would bypass the kept rows")
        return out[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        call: _Call = ctx.call
        (hidden,) = ctx.saved_tensors
        rows = _kept_rows(call)
        index = None if rows is None else rows.rows
        # A non-leaf input: module trackers (FlopCounterMode's) hook the inputs of the re-run's modules,
        # which autograd.grad refuses on leaves.
        g = grad if index is None else grad.index_select(0, index)
        engine, block = call.engine, call.index
        outer = engine.current[block]
        engine.current[block] = BlockRows(decided=True)  # the re-run's rows are all kept: no skipping inside
        try:
            with torch.enable_grad():
                source = hidden.detach().requires_grad_(ctx.needs_input_grad[1])
                x = source.view_as(source) if index is None else source.index_select(0, index)
                out = call.run(x, index, replay=True)
            out = out if isinstance(out, torch.Tensor) else out[0]
            inputs = ([x] if x.requires_grad else []) + call.params
            grads = list(torch.autograd.grad(out, inputs, g, allow_unused=True))
        finally:
            engine.current[block] = outer
        grad_x = grads.pop(0) if x.requires_grad else None
        if grad_x is not None and index is not None:
            grad_x = grad.new_zeros(hidden.shape).index_copy_(0, index, grad_x)
        return None, grad_x, *grads


def _kept_rows(call: _Call) -> RowSet | None:
    """The rows to re-run: those the block's SampleA kept (``None``: all of them)."""
    if call.rows.decided and not call.rows.other_paths:
        return call.rows.rows
    return None  # SampleA has not decided (no sampling above): every row


def _checkpointed_forward(block: nn.Module, name: str, forward: Any, engine: RowEngine, index: int,
                          *args: Any, **kwargs: Any) -> Any:
    params = [p for p in block.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        if torch.is_grad_enabled() and params:
            raise CheckpointError(f"VCAS checkpointing: {name} must get its hidden state as its first "
                                  "positional argument")
        return forward(*args, **kwargs)
    hidden = args[0]
    if not (hidden.requires_grad or params):
        return forward(*args, **kwargs)
    # Like HF's own checkpointing: no KV cache in a checkpointed block (the re-run would write it twice).
    kwargs = {k: None if k in _CACHE_ARGS or _is_cache(v) else v for k, v in kwargs.items()}
    args = tuple(None if _is_cache(v) else v for v in args)
    if getattr(block, "_vcas_not_row_compact", None) is None:
        leaves = tree_flatten((args[1:], kwargs))[0]
        others = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        if not others:
            call = _Call(name, forward, engine, index, engine.current[index], args, kwargs, params,
                         block.training)
            try:
                out = _RowCheckpoint.apply(call, hidden, *params)
                return (out, *call.extras) if call.tuple_out else out
            except _NotRowCompact as reason:
                _fall_back(block, name, str(reason))
        else:
            _fall_back(block, name, f"it gets {len(others)} input tensor(s) besides its hidden state that "
                       "need a gradient (a position bias, encoder states)")
    # The safe path: the block's plain sampled backward under ordinary checkpointing.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _is_cache(value: Any) -> bool:
    """An HF KV cache object (passed positionally by some models, GPT-2's blocks)."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


class _NotRowCompact(Exception):
    """A block whose gradient does not all flow through its hidden state (internal: falls back)."""


def _fall_back(block: nn.Module, name: str, reason: str) -> None:
    block._vcas_not_row_compact = reason
    warnings.warn(f"VCAS checkpointing: {name} is checkpointed plainly (its full forward re-runs), not on "
                  f"the kept rows only: {reason}", stacklevel=3)


def checkpoint_block(block: nn.Module, name: str, engine: RowEngine, index: int) -> None:
    """Make ``block`` (the ``index``-th wrapped block, called ``name``) checkpoint row by row."""
    mixers = [n for n, m in block.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mixers:
        raise CheckpointError(f"VCAS checkpointing re-runs {name} on the kept rows only, but its "
                              f"BatchNorm ({mixers[0]}) mixes rows in train mode; turn checkpointing off")
    own = getattr(block, "gradient_checkpointing", None)
    if own:  # the model's own checkpointing (HF's, or checkpoint_blocks') would re-run the re-run
        block._vcas_hf_checkpointing = own
        block.gradient_checkpointing = False
    previous = vars(block).get("forward")  # checkpoint_blocks' torch.utils.checkpoint around forward
    block._vcas_previous_forward = previous
    plain = isinstance(previous, functools.partial) and previous.args
    forward = previous.args[0] if plain else _own_forward(block)
    block.forward = functools.partial(_checkpointed_forward, block, name, forward, engine, index)
    block._vcas_checkpointed = True


def _own_forward(block: nn.Module) -> Any:
    """The block's forward without HF's per-layer checkpointing wrapper, which a trainer may switch on
    after wrapping (``Trainer.train`` does): the re-run must not be re-run again."""
    cls_forward = type(block).forward
    inner = getattr(cls_forward, "__wrapped__", None)
    if inner is not None and cls_forward.__code__.co_name == "forward_with_checkpointing":
        return types.MethodType(inner, block)
    return block.forward


def restore_block(block: nn.Module) -> None:
    """Undo :func:`checkpoint_block` (HF's own checkpointing flag included)."""
    if not getattr(block, "_vcas_checkpointed", False):
        return
    del block.forward, block._vcas_checkpointed
    if hasattr(block, "_vcas_not_row_compact"):
        del block._vcas_not_row_compact
    if block._vcas_previous_forward is not None:
        block.forward = block._vcas_previous_forward
    del block._vcas_previous_forward
    if hasattr(block, "_vcas_hf_checkpointing"):
        block.gradient_checkpointing = block._vcas_hf_checkpointing
        del block._vcas_hf_checkpointing


def uses_hf_checkpointing(blocks: list[nn.Module]) -> bool:
    """Whether the model's own (HF ``gradient_checkpointing_enable``) checkpointing is on for its blocks."""
    return any(getattr(b, "gradient_checkpointing", False) is True for b in blocks)
