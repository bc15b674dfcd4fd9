"""VCAS in Lightning: ``VcasCallback`` in ``Trainer(callbacks=[...])``.

``setup`` wraps the ``LightningModule`` (``block_type="auto"`` by default). Before each training
batch, ``on_train_batch_start`` runs the variance phase when the optimizer step
(``trainer.global_step``) is due, once per step whatever ``accumulate_grad_batches`` is, on the
scheduled batch (already on the device) and fresh batches from its own :class:`ExtraBatches` stream
over the train loader's dataset, under the precision plugin's autocast and with ``self.log`` muted.
With ``fold_batch`` that batch's ``training_step`` returns the folded exact loss instead of running
a forward, so Lightning's ``1 / accumulate``, its GradScaler and DDP's hooks apply to it as to any
loss. Costs are counted per micro-batch. The state (controller and extra-batch position) travels in
Lightning checkpoints through ``state_dict`` / ``load_state_dict``. Automatic optimization only.

This module imports with torch only; ``lightning`` (or ``pytorch_lightning``) is imported when
``VcasCallback`` is first used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vcas_bench.integrations.loop import ExtraBatches, ddp_mean, seeded_for_rank
from vcas_bench.vcas.config import VcasConfig
from vcas_bench.vcas.controller import VcasController

__all__ = ["VcasCallback"]  # noqa: F822 (built on first use)


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as err:
            raise ImportError("VcasCallback needs Lightning: pip install lightning") from err
    return pl


def _loss_of(output: Any) -> torch.Tensor:
    """The loss in a ``training_step`` output: the tensor itself or its ``"loss"`` entry."""
    return output["loss"] if isinstance(output, dict) else output


@contextlib.contextmanager
def _muted_logging(module: Any) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing while the phase calls ``training_step``."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


def _callback_class() -> type:
    pl = _lightning()

    class VcasCallback(pl.Callback):
        """VCAS for a ``LightningModule``; ``extra``: a ``DataLoader`` for the phases' fresh batches
        (default: a reshuffle of the train loader's dataset)."""

        def __init__(
            self,
            config: VcasConfig | None = None,
            block_type: type | str = "auto",
            extra: torch.utils.data.DataLoader | None = None,
        ) -> None:
            self.config, self.block_type, self.extra_loader = config, block_type, extra
            self.controller: VcasController | None = None
            self.extra: ExtraBatches | None = None
            self._pending: dict[str, Any] | None = None

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage != "fit" or self.controller is not None:
                return
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "VcasCallback supports automatic optimization only; with manual "
                    "optimization use vcas_bench.integrations.loop.VcasLoop in training_step"
                )
            config = seeded_for_rank(self.config, trainer.global_rank)
            reduce_fn = ddp_mean if trainer.world_size > 1 else None
            self.controller = VcasController(pl_module, self.block_type, config, reduce_fn)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            loader = self.extra_loader if self.extra_loader is not None else trainer.train_dataloader
            seed = (self.config or VcasConfig()).seed
            self.extra = ExtraBatches.like(loader, seed, trainer.global_rank, trainer.world_size)
            if self._pending is not None:
                self.extra.load_state_dict(self._pending)
                if trainer.world_size > 1:  # every rank loaded rank 0's generator: draw independently again
                    seed = seeded_for_rank(self.config, trainer.global_rank).seed
                    self.controller.generator.manual_seed(seed + 7919 * self.controller.phases)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            ctl = self.controller

            def loss_fn(b: Any) -> torch.Tensor:
                return _loss_of(pl_module.training_step(b, batch_idx))

            with trainer.precision_plugin.train_step_context(), _muted_logging(pl_module):
                ctl.adapt_if_due(trainer.global_step, loss_fn, batch, lambda: self._next_extra(trainer))
            folded = ctl.folded_loss()
            if folded is not None:
                _return_once(pl_module, folded)
            ctl.count_step(0.0 if folded is not None else None)

        def state_dict(self) -> dict[str, Any]:
            extra = self.extra.state_dict() if self.extra is not None else self._pending
            return {"controller": self.controller.state_dict(), "extra": extra}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.controller.load_state_dict(state_dict["controller"])
            self._pending = state_dict["extra"]

        def _next_extra(self, trainer: Any) -> Any:
            return trainer.strategy.batch_to_device(self.extra())

    VcasCallback.__module__ = __name__
    return VcasCallback


def _return_once(pl_module: Any, loss: torch.Tensor) -> None:
    """The next ``training_step`` call returns ``loss`` without a forward, then the method is back."""

    def folded_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        del pl_module.training_step
        return loss

    pl_module.training_step = folded_step


def __getattr__(name: str) -> Any:
    if name == "VcasCallback":
        cls = _callback_class()
        globals()[name] = cls  # built once per process, on first use
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
