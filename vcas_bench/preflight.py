"""Checks of a valid config against this machine before anything is built: the device, the output
directory, and hub assets reachable offline.

A paper task or pretrained model with no local path needs the hub. Offline (``HF_HUB_OFFLINE=1``, as
the Makefile and the tests set it) every such asset that is not in the HF cache is named in one line,
with the override that points at a local copy, before any model or data is built.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vcas_bench.assets import HubAsset, hub_is_offline, missing_assets_line
from vcas_bench.models import MODEL_HUB_ASSETS
from vcas_bench.tasks import TASK_HUB_ASSETS, TASK_MODALITIES, glue

__all__ = ["hub_assets", "machine_errors", "offline_errors", "preflight_errors"]


def hub_assets(cfg: DictConfig) -> list[HubAsset]:
    """Every hub checkpoint and dataset that running ``cfg`` would download."""
    model_args = OmegaConf.to_container(cfg.model.args, resolve=True)
    task_args = OmegaConf.to_container(cfg.task.args, resolve=True)
    mlm = TASK_MODALITIES.get(cfg.task.name) == "mlm"
    assets = MODEL_HUB_ASSETS[cfg.model.name](model_args, mlm) if cfg.model.name in MODEL_HUB_ASSETS else []
    assets += TASK_HUB_ASSETS[cfg.task.name](task_args) if cfg.task.name in TASK_HUB_ASSETS else []
    finetune = cfg.task.glue_eval
    if finetune.task is not None and finetune.data_dir is None:
        assets.append(glue.hub_asset(finetune.task, override="task.glue_eval.data_dir"))
    return assets


def offline_errors(cfg: DictConfig) -> list[str]:
    """One line naming the hub assets ``cfg`` needs that cannot be had offline (empty when online)."""
    if not hub_is_offline():
        return []
    line = missing_assets_line(hub_assets(cfg))
    return [line] if line else []


def preflight_errors(cfg: DictConfig) -> list[str]:
    """:func:`machine_errors`, then (when there are none) :func:`offline_errors`."""
    return machine_errors(cfg) or offline_errors(cfg)


def machine_errors(cfg: DictConfig) -> list[str]:
    """A device this machine lacks, an output directory it cannot write (found now, not after training)."""
    errors = []
    if cfg.trainer.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append("trainer.device=cuda: no CUDA device is visible; use trainer.device=cpu or auto")
    output_error = output_dir_error(cfg.output_dir)
    return errors + ([output_error] if output_error else [])


def output_dir_error(output_dir: str | None) -> str | None:
    """Why ``output_dir`` (null: Hydra's run directory under the working directory) cannot be written."""
    target = Path(output_dir or ".").expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    shown = output_dir if output_dir is not None else "null"
    if not existing.is_dir():
        return f"output_dir={shown}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if output_dir is not None else " (Hydra's run directory goes under the working directory)"
        return f"output_dir={shown}: {existing} is not writable{where}"
    return None
