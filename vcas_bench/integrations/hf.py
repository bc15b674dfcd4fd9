"""VCAS in HF ``transformers.Trainer``: ``VcasTrainer`` is a drop-in ``Trainer``.

A ``TrainerCallback`` sees neither the batches nor the loss, so this is a thin subclass of the four
methods that do: ``training_step`` runs the variance phase before the first micro-batch of a due
optimizer step (``state.global_step``) and counts each micro-batch's cost; ``compute_loss`` hands
HF's backward the folded exact loss of the scheduled batch when there is one (so HF's ``1 / GA``,
the GradScaler and DDP apply to it as to any loss); ``_save_checkpoint`` writes the VCAS state
(controller and extra-batch position, per rank) into each ``checkpoint-N`` folder, and ``train``
reads it back on ``resume_from_checkpoint``.

The extra batches come from ``vcas_extra_dataset`` (default: ``train_dataset``) through the Trainer's
own collator and column removal, shuffled on their own and sharded by rank. Each micro-batch's loss is
its own mean loss divided by the accumulation steps (``model_accepts_loss_kwargs = False``), as in
the runner: VCAS compares gradients of per-batch mean losses.

This module imports with torch only; ``transformers`` is imported when ``VcasTrainer`` is first used.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from vcas_bench.integrations.loop import ExtraBatches, ddp_mean, ddp_mean_tensors, seeded_for_rank
from vcas_bench.vcas.config import VcasConfig
from vcas_bench.vcas.controller import VcasController

__all__ = ["VcasTrainer", "STATE_FILE"]  # noqa: F822 (VcasTrainer: built on first use)

STATE_FILE = "vcas_state_rank{rank}.pt"


def _wants_checkpointing(args: Any) -> bool:
    """Whether ``TrainingArguments`` ask for activation checkpointing (either name of the flag)."""
    names = ("activation_checkpointing", "gradient_checkpointing")
    return any(bool(getattr(args, name, False)) for name in names)


def _trainer_class() -> type:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "VcasTrainer needs transformers and accelerate: pip install transformers accelerate"
        ) from err

    class VcasTrainer(transformers.Trainer):
        """``transformers.Trainer`` with VCAS; extra keyword arguments ``vcas_config`` (default: the
        paper's ``VcasConfig()``), ``vcas_block_type`` (default ``"auto"``), ``vcas_extra_dataset``."""

        def __init__(
            self,
            *args: Any,
            vcas_config: VcasConfig | None = None,
            vcas_block_type: type | str = "auto",
            vcas_extra_dataset: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            if self.compute_loss_func is not None:
                raise ValueError(
                    "VcasTrainer: compute_loss_func is not supported; override compute_loss instead"
                )
            self.model_accepts_loss_kwargs = False  # every micro-batch's loss is its own mean
            base_seed = (vcas_config or VcasConfig()).seed
            config = seeded_for_rank(vcas_config, self.args.process_index)
            if config.checkpoint is None and _wants_checkpointing(self.args):
                # Trainer.train switches HF's checkpointing on only later: make VCAS's row-compact now.
                config = dataclasses.replace(config, checkpoint=True)
            reduce_fn = ddp_mean if self.args.world_size > 1 else None
            self.vcas = VcasController(self.model, vcas_block_type, config, reduce_fn)
            self._vcas_extra_dataset = vcas_extra_dataset
            self._vcas_extra: ExtraBatches | None = None
            self._vcas_extra_state: dict[str, int] | None = None
            self._vcas_base_seed = base_seed
            self._vcas_folded: torch.Tensor | None = None

        def training_step(
            self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> torch.Tensor:
            inputs = self._prepare_inputs(inputs)
            self.vcas.adapt_if_due(
                self.state.global_step, self._vcas_phase_loss(model), inputs, self._vcas_next_extra
            )
            grad_mean_fn = ddp_mean_tensors if self.args.world_size > 1 else None
            self._vcas_folded = self.vcas.folded_loss(grad_mean_fn)
            folded = self._vcas_folded is not None
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.vcas.count_step(0.0 if folded else None)
            return loss

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ):
            if self._vcas_folded is not None:  # the phase already has this batch's exact gradient
                loss, self._vcas_folded = self._vcas_folded, None
                return (loss, None) if return_outputs else loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
            if isinstance(checkpoint, str):
                self._vcas_load(checkpoint)
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            folder = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder)
            extra = self._vcas_extra.state_dict() if self._vcas_extra is not None else self._vcas_extra_state
            state = {"controller": self.vcas.state_dict(), "extra": extra}
            os.makedirs(path, exist_ok=True)  # ranks other than 0 may not have written into it
            torch.save(state, os.path.join(path, STATE_FILE.format(rank=self.args.process_index)))

        def _vcas_load(self, checkpoint: str) -> None:
            path = os.path.join(checkpoint, STATE_FILE.format(rank=self.args.process_index))
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"VcasTrainer: {path} is missing; this checkpoint was not written by VcasTrainer"
                )
            state = torch.load(path, weights_only=False)
            self.vcas.load_state_dict(state["controller"])
            self._vcas_extra_state = state["extra"]

        def _vcas_phase_loss(self, model: torch.nn.Module):
            module = self.accelerator.unwrap_model(model)  # not through DDP: the phase syncs no gradient

            def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
                with self.compute_loss_context_manager():
                    return super(VcasTrainer, self).compute_loss(module, batch)

            return loss_fn

        def _vcas_next_extra(self) -> dict[str, Any]:
            if self._vcas_extra is None:
                self._vcas_extra = self._vcas_build_extra()
            return self._prepare_inputs(self._vcas_extra())

        def _vcas_build_extra(self) -> ExtraBatches:
            dataset = self._vcas_extra_dataset if self._vcas_extra_dataset is not None else self.train_dataset
            collator = self.data_collator
            description = "VCAS extra batches"
            if transformers.utils.is_datasets_available():
                import datasets

                if isinstance(dataset, datasets.Dataset):
                    dataset = self._remove_unused_columns(dataset, description=description)
                else:
                    collator = self._get_collator_with_removed_columns(collator, description=description)
            stream = ExtraBatches(
                dataset,
                self._train_batch_size,
                collator,
                self._vcas_base_seed,
                self.args.process_index,
                self.args.world_size,
            )
            if self._vcas_extra_state is not None:
                stream.load_state_dict(self._vcas_extra_state)
            return stream

    VcasTrainer.__module__ = __name__
    return VcasTrainer


def __getattr__(name: str) -> Any:
    if name == "VcasTrainer":
        cls = _trainer_class()
        globals()[name] = cls  # built once per process, on first use
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
