"""Wrap any model for VCAS given its repeated block type, and unwrap it again.

Wrapping never renames anything: each block gets a forward hook that routes its output through
:class:`~vcas_bench.vcas.autograd.SampleActivation`, and each ``nn.Linear`` inside a block has its
class switched to :class:`SampledLinear`, which keeps the very same ``weight``/``bias`` parameters.
So ``state_dict()`` keys, optimizers built before wrapping, and checkpoints stay valid.

Only ``nn.Linear`` is switched: convolutions and everything else keep their own backward, so a CNN
(whose blocks hold no linear) gets SampleA at block outputs and no SampleW ("activation-only").

Assumptions: dimension 0 of every block input/output is the batch, and blocks are taken in module
order, which must be their forward order (true for BERT/ViT encoders, timm's ``blocks`` and ResNet
stages). Layers that mix batch rows (BatchNorm in train mode) are allowed: SampleA stays unbiased
because everything below a block output is linear in its gradient, and a sampled linear decides which
rows to skip from its *own* output gradient, which is exactly zero only where skipping changes nothing
(see ``README.md``, "CNNs and BatchNorm").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vcas_bench.vcas.autograd import LinearSlot, RowSampler, SampleActivation, SampledLinearFunction

__all__ = ["SampledLinear", "Wrapped", "wrap", "unwrap", "find_blocks"]


class SampledLinear(nn.Linear):
    """An ``nn.Linear`` whose backward goes through the model's :class:`RowSampler`."""

    _vcas_sampler: RowSampler
    _vcas_slot: LinearSlot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SampledLinearFunction.apply(x, self.weight, self.bias, self._vcas_sampler, self._vcas_slot)


@dataclass
class Wrapped:
    """What :func:`wrap` did to a model, so that :func:`unwrap` can undo it."""

    model: nn.Module
    sampler: RowSampler
    block_names: list[str]
    linear_modules: list[nn.Linear]
    hooks: list = field(default_factory=list)

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


def find_blocks(model: nn.Module, block_type: type | str) -> list[tuple[str, nn.Module]]:
    """All modules of ``block_type`` (a class or a class name), in module order."""
    def matches(m: nn.Module) -> bool:
        return type(m).__name__ == block_type if isinstance(block_type, str) else isinstance(m, block_type)

    blocks = [(n, m) for n, m in model.named_modules() if matches(m)]
    if not blocks:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"no module of type {block_type!r} in the model; its module types are: {kinds}")
    return blocks


def _block_output_hook(sampler: RowSampler, index: int):
    def hook(module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):
            return SampleActivation.apply(output, sampler, index)
        # Tuple-returning blocks (older HF BertLayer, ViTLayer): the hidden state is element 0.
        return (SampleActivation.apply(output[0], sampler, index), *output[1:])

    return hook


def wrap(model: nn.Module, block_type: type | str, generator: torch.Generator | None = None) -> Wrapped:
    """Insert SampleA at each block output and SampleW into each ``nn.Linear`` inside the blocks."""
    if any(isinstance(m, SampledLinear) for m in model.modules()):
        raise ValueError("model is already wrapped; unwrap it first")
    blocks = find_blocks(model, block_type)
    sampler = RowSampler(num_blocks=len(blocks), generator=generator or torch.Generator())
    wrapped = Wrapped(model=model, sampler=sampler, block_names=[n for n, _ in blocks], linear_modules=[])
    for index, (block_name, block) in enumerate(blocks):
        wrapped.hooks.append(block.register_forward_hook(_block_output_hook(sampler, index)))
        for name, module in block.named_modules():
            if type(module) is nn.Linear:
                slot = LinearSlot(name=f"{block_name}.{name}", block=index)
                sampler.linears.append(slot)
                # A class switch keeps the same Parameter objects, names and any hooks on the module.
                module.__class__ = SampledLinear
                module._vcas_sampler, module._vcas_slot = sampler, slot
                wrapped.linear_modules.append(module)
    return wrapped


def unwrap(wrapped: Wrapped) -> nn.Module:
    """Remove the hooks and restore plain ``nn.Linear`` modules; returns the model."""
    for handle in wrapped.hooks:
        handle.remove()
    for module in wrapped.linear_modules:
        module.__class__ = nn.Linear
        del module._vcas_sampler, module._vcas_slot
    wrapped.hooks.clear()
    return wrapped.model
