"""Wrap any model for VCAS given its repeated block type (or ``"auto"``), and unwrap it again.

Wrapping never renames anything: each block gets a forward hook that routes its output through
:class:`~vcas_bench.vcas.autograd.SampleActivation`, and each ``nn.Linear`` inside a block has its
class switched to :class:`SampledLinear`, which keeps the very same ``weight``/``bias`` parameters.
HF ``transformers``' ``Conv1D`` (GPT-2's linears, weight stored ``(in, out)``) keeps its class and gets
a sampled ``forward`` on the instance. So ``state_dict()`` keys, optimizers built before wrapping,
and checkpoints stay valid.

Convolutions and everything else keep their own backward, so a CNN (whose blocks hold no linear) gets
SampleA at block outputs and no SampleW ("activation-only"). Linear-like layers left exact inside the
blocks (1x1 convolutions, ``nn.Linear`` subclasses such as ``MultiheadAttention.out_proj``, which
its owner calls through its weight, not its ``forward``) are listed in a warning and in
:attr:`Wrapped.exact_linear_like`.

Assumptions: dimension 0 of every block input/output is the batch, and blocks are taken in module
order, which must be their forward order (true for BERT/ViT encoders, timm's ``blocks``, ResNet
stages, decoder-only stacks, and T5's encoder then decoder). Layers that mix batch rows (BatchNorm in
train mode) are allowed: SampleA stays unbiased because everything below a block output is linear in
its gradient, and a sampled linear decides which rows to skip from its *own* output gradient, which is
exactly zero only where skipping changes nothing (see ``README.md``, "CNNs and BatchNorm").
"""

from __future__ import annotations

import functools
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vcas_bench.vcas.autograd import (
    LinearSlot,
    OtherPath,
    RowEngine,
    SampleActivation,
    SampledLinearFunction,
)
from vcas_bench.vcas.checkpoint import checkpoint_block, restore_block, uses_hf_checkpointing
from vcas_bench.vcas.rowsets import BlockRows

__all__ = ["SampledLinear", "Wrapped", "wrap", "unwrap", "find_blocks", "auto_block_type",
           "checkpoint_blocks"]


class SampledLinear(nn.Linear):
    """An ``nn.Linear`` whose backward goes through the model's :class:`RowEngine`."""

    _vcas_engine: RowEngine
    _vcas_slot: LinearSlot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SampledLinearFunction.apply(x, self.weight, self.bias, self._vcas_engine, self._vcas_slot)


def _sampled_conv1d_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF ``Conv1D`` is ``x @ W + b`` with ``W (in, out)``: the same linear on the transposed view."""
    return SampledLinearFunction.apply(x, self.weight.t(), self.bias, self._vcas_engine, self._vcas_slot)


def is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D``, recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


@dataclass
class Wrapped:
    """What :func:`wrap` did to a model, so that :func:`unwrap` can undo it."""

    model: nn.Module
    engine: RowEngine
    block_names: list[str]
    linear_modules: list[nn.Module]  # nn.Linear switched to SampledLinear, or HF Conv1D
    hooks: list = field(default_factory=list)
    block_type: str = ""
    exact_linear_like: list[str] = field(default_factory=list)  # linear-like layers in blocks left exact
    checkpointed: bool = False  # blocks re-run on their kept rows in the backward (checkpoint.py)

    @property
    def linear_weights(self) -> list[torch.Tensor]:
        return [m.weight for m in self.linear_modules]

    @property
    def variance_weights(self) -> list[torch.Tensor]:
        """The weights the controller measures variances on: the sampled linears' (in slot order, so
        entry ``l`` belongs to linear ``l``), then every other matrix/kernel inside the blocks (conv
        kernels of a CNN). For transformer blocks the two lists are the same."""
        seen = {id(w) for w in self.linear_weights}
        others = []
        for name in self.block_names:
            for param in self.model.get_submodule(name).parameters():
                if param.requires_grad and param.ndim >= 2 and id(param) not in seen:
                    seen.add(id(param))
                    others.append(param)
        return [*self.linear_weights, *others]

    def output_rows(self, weight: torch.Tensor) -> int:
        """Output features of ``weight``: its rows, or its columns for a ``Conv1D`` (stored ``(in, out)``)."""
        return weight.shape[1] if self._stored_transposed(weight) else weight.shape[0]

    def rows_view(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` of ``weight`` with output features as rows (a transposed view for ``Conv1D``)."""
        return grad.t() if self._stored_transposed(weight) else grad

    def _stored_transposed(self, weight: torch.Tensor) -> bool:
        return any(m.weight is weight and is_hf_conv1d(m) for m in self.linear_modules)


def auto_block_type(model: nn.Module) -> type:
    """The class of the repeated block: the one with most instances (at least two) as children of
    ``nn.ModuleList`` / ``nn.Sequential`` containers that hold modules of a single class (torch's own
    layers excluded). T5's encoder and decoder ``T5Block`` lists count together; Swin's per-stage layer
    lists add up past its stage list; ResNet's stage ``Sequential`` s give its ``BasicBlock`` s."""
    counts: Counter[type] = Counter()
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            continue
        kinds = {type(child) for child in container}
        kind = next(iter(kinds))
        if len(kinds) == 1 and not kind.__module__.startswith("torch.nn"):
            counts[kind] += len(container)
    counts = Counter({kind: n for kind, n in counts.items() if n >= 2})
    if not counts:
        raise ValueError(f"block_type='auto' found no list of repeated blocks in {type(model).__name__}; "
                         "pass block_type=<the block class or its name>")
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        tied = ", ".join(k.__name__ for k, n in ranked if n == ranked[0][1])
        raise ValueError(f"block_type='auto' is ambiguous in {type(model).__name__}: {tied} repeat "
                         f"{ranked[0][1]} times each; pass block_type=<one of them>")
    return ranked[0][0]


def find_blocks(model: nn.Module, block_type: type | str) -> list[tuple[str, nn.Module]]:
    """All modules of ``block_type`` (a class, a class name, or ``"auto"``), in module order."""
    if block_type == "auto":
        block_type = auto_block_type(model)

    def matches(m: nn.Module) -> bool:
        return type(m).__name__ == block_type if isinstance(block_type, str) else isinstance(m, block_type)

    blocks = [(n, m) for n, m in model.named_modules() if matches(m)]
    if not blocks:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"no module of type {block_type!r} in the model; its module types are: {kinds}")
    return blocks


def _block_input_hook(engine: RowEngine, index: int, mixers: list[nn.Module]):
    """A new :class:`BlockRows` per call of the block; BatchNorm in train mode mixes rows, so a block
    holding one lets its linears read their own rows."""

    def hook(module: nn.Module, args) -> None:
        engine.open_block(index, mixes_rows=any(m.training for m in mixers))

    return hook


def _block_output_hook(engine: RowEngine, index: int):
    def hook(module: nn.Module, args, output):
        rows = engine.current[index]
        if isinstance(output, torch.Tensor):
            return SampleActivation.apply(output, engine, index, rows)
        # Tuple-returning blocks (older HF BertLayer, ViTLayer, T5Block): the hidden state is element 0;
        # gradient arriving at the others (T5's position bias, an auxiliary output) bypasses SampleA.
        return (SampleActivation.apply(output[0], engine, index, rows),
                *(_mark_other_path(o, rows) for o in output[1:]))

    return hook


def _mark_other_path(output, rows: BlockRows):
    if isinstance(output, torch.Tensor) and output.requires_grad:
        return OtherPath.apply(output, rows)
    if isinstance(output, tuple):
        return tuple(_mark_other_path(o, rows) for o in output)
    return output


def _is_linear_like(module: nn.Module) -> bool:
    """A layer whose weight gradient is one GEMM that SampleW could sample, but which wrap leaves exact."""
    if isinstance(module, nn.Linear):
        return type(module) is not nn.Linear  # a subclass: its owner may bypass forward
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return all(k == 1 for k in module.kernel_size) and module.groups == 1
    return False


def _switch(module: nn.Module, engine: RowEngine, slot: LinearSlot) -> None:
    """Route ``module``'s forward through the sampled linear, keeping its parameters and hooks."""
    if is_hf_conv1d(module):
        module.forward = types.MethodType(_sampled_conv1d_forward, module)
    else:
        module.__class__ = SampledLinear
    module._vcas_engine, module._vcas_slot = engine, slot


def wrap(model: nn.Module, block_type: type | str = "auto", generator: torch.Generator | None = None,
         checkpoint: bool | None = None) -> Wrapped:
    """Insert SampleA at each block output and SampleW into each ``nn.Linear`` / HF ``Conv1D`` inside the
    blocks; warn about linear-like layers that stay exact.

    ``checkpoint``: re-run each block's forward in its backward on the rows its SampleA kept only
    (:mod:`vcas_bench.vcas.checkpoint`); ``None`` follows the model's own setting (HF
    ``gradient_checkpointing_enable()``), which VCAS then replaces with this one."""
    if any(hasattr(m, "_vcas_slot") for m in model.modules()):
        raise ValueError("model is already wrapped; unwrap it first")
    blocks = find_blocks(model, block_type)
    engine = RowEngine(num_blocks=len(blocks), generator=generator or torch.Generator())
    if checkpoint is None:
        checkpoint = uses_hf_checkpointing([b for _, b in blocks])
    wrapped = Wrapped(model=model, engine=engine, block_names=[n for n, _ in blocks], linear_modules=[],
                      block_type=type(blocks[0][1]).__name__, checkpointed=checkpoint)
    for index, (block_name, block) in enumerate(blocks):
        mixers = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        wrapped.hooks.append(block.register_forward_pre_hook(_block_input_hook(engine, index, mixers)))
        # prepend: hooks registered before wrapping (HF's output recorders) see the SampleA output, so
        # gradient from a recorded hidden state passes through SampleA like the rest.
        wrapped.hooks.append(block.register_forward_hook(_block_output_hook(engine, index), prepend=True))
        for name, module in block.named_modules():
            full_name = f"{block_name}.{name}"
            if type(module) is nn.Linear or is_hf_conv1d(module):
                slot = LinearSlot(name=full_name, block=index, index=len(engine.linears))
                engine.linears.append(slot)
                _switch(module, engine, slot)
                wrapped.linear_modules.append(module)
            elif _is_linear_like(module):
                wrapped.exact_linear_like.append(full_name)
        if checkpoint:
            checkpoint_block(block, block_name, engine, index)
    if wrapped.exact_linear_like:
        names = wrapped.exact_linear_like
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(f"VCAS leaves {len(names)} linear-like layer(s) inside the blocks exact (no SampleW): "
                      f"{shown}", stacklevel=2)
    return wrapped


def checkpoint_blocks(model: nn.Module, block_type: type | str = "auto") -> None:
    """Plain activation checkpointing of every block (the exact baseline's): HF's own
    ``gradient_checkpointing_enable`` where the model has it, else ``torch.utils.checkpoint`` around each
    block's forward. A later :func:`wrap` follows it with its row-compact checkpointing."""
    if getattr(model, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    for _, block in find_blocks(model, block_type):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block.gradient_checkpointing = True


def unwrap(wrapped: Wrapped) -> nn.Module:
    """Remove the hooks and restore plain ``nn.Linear`` / ``Conv1D`` modules; returns the model."""
    for handle in wrapped.hooks:
        handle.remove()
    for name in wrapped.block_names:
        restore_block(wrapped.model.get_submodule(name))
    for module in wrapped.linear_modules:
        if is_hf_conv1d(module):
            del module.forward
        else:
            module.__class__ = nn.Linear
        del module._vcas_engine, module._vcas_slot
    wrapped.hooks.clear()
    return wrapped.model
