"""Model registry: each builder returns a `ModelBundle` (the network plus what the runner needs to feed it).

Builders live in `bert.py` (text) and `vit.py` (image) and register under the names used in `conf/model/`.
`block_type` names the repeated transformer block class that VCAS wraps (VCAS paper, Sec. 4: activation
sampling is applied per block), so the runner can find blocks with `type(m).__name__ == block_type`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.registry import Registry

# The factory's own parameters: `create_model(name, num_labels, mlm, **builder_args)`.
MODELS = Registry("model", reserved=("name",))
# name -> "text" | "image", known without building, so tasks can list compatible models in errors.
MODEL_MODALITIES: dict[str, str] = {}
# Text models whose builder also makes a masked-LM (`mlm=True`), for pretraining tasks such as c4.
MLM_MODELS: set[str] = set()
# name -> (builder args, mlm) -> the hub assets the builder would download with those args.
HubAssets = Callable[[dict[str, Any], bool], list[HubAsset]]
MODEL_HUB_ASSETS: dict[str, HubAssets] = {}


@dataclass
class ModelBundle:
    """A built model and how to run it.

    Attributes:
        model: The network, in train mode as built.
        block_type: Class name of the repeated block VCAS wraps, e.g. "BertLayer", "ViTLayer", "Block".
        modality: "text", "image" or "mlm" (a masked-LM built with `mlm=True`).
        logits_fn: `(model, batch) -> logits` of shape (N, num_labels), or (N, L, vocab) for "mlm";
            batch is a dict of tensors.
        tokenizer: Tokenizer for text models, else None.
        image_size: Expected input height = width for image models, else None.
        num_channels: Expected input channels for image models, else None.
    """

    model: nn.Module
    block_type: str
    modality: str
    logits_fn: Callable[[nn.Module, dict], torch.Tensor]
    tokenizer: Any | None = None
    image_size: int | None = None
    num_channels: int | None = None


def register_model(
    name: str, modality: str, mlm: bool = False, hub_assets: HubAssets | None = None
) -> Callable[[Callable[..., ModelBundle]], Callable[..., ModelBundle]]:
    """Register a builder in `MODELS` and record its modality.

    Args:
        name: Registry name, as used by `model=<name>` on the command line.
        modality: "text" or "image".
        mlm: The builder takes `mlm: bool` and then returns a masked-LM bundle (modality "mlm").
        hub_assets: What the builder downloads for given args (none when everything is local).
    """

    def decorator(builder: Callable[..., ModelBundle]) -> Callable[..., ModelBundle]:
        MODEL_MODALITIES[name] = modality
        if mlm:
            MLM_MODELS.add(name)
        if hub_assets is not None:
            MODEL_HUB_ASSETS[name] = hub_assets
        return MODELS.register(name)(builder)

    return decorator


def create_model(name: str, /, num_labels: int, mlm: bool = False, **kwargs: Any) -> ModelBundle:
    """Build a registered model.

    Args:
        name: Registered model name (see `MODELS.names()`).
        num_labels: Size of the classification head (for `mlm`, the vocabulary size).
        mlm: Build the masked-LM variant (pretraining tasks); only for names in `MLM_MODELS`.
        **kwargs: Flat builder arguments, e.g. `path=`, `dropout=`.

    Raises:
        KeyError: Unknown name; the message lists the valid names.
        ValueError: `mlm` for a model without a masked-LM variant.
        TypeError: `kwargs` names an argument the factory sets (`name`).
    """
    if clashes := sorted(set(kwargs) & {"name"}):
        raise TypeError(f"model {name!r}: builder arguments may not be named {', '.join(clashes)} "
                        "(the registry name); e.g. a hub checkpoint is model.args.checkpoint")
    if not mlm:
        return MODELS.create(name, num_labels=num_labels, **kwargs)
    MODELS.get(name)
    if name not in MLM_MODELS:
        choices = ", ".join(sorted(MLM_MODELS))
        raise ValueError(f"model {name!r} has no masked-LM variant; pick one of: {choices}")
    return MODELS.create(name, num_labels=num_labels, mlm=True, **kwargs)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report ("newly initialized classifier") and weight-loading bar.

    A fresh head is the point of fine-tuning, so the report is noise in benchmark logs.
    """
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


CHECKPOINT_FOLDER = "a local checkpoint folder (config.json, weights, tokenizer files)"


def checkpoint_asset(checkpoint: str, files: tuple[str, ...] = ("config.json",)) -> HubAsset:
    """A transformers checkpoint on the hub, replaced by `model.args.path`."""
    return HubAsset(f"checkpoint {checkpoint!r}", checkpoint, "model",
                    f"model.args.path=<{CHECKPOINT_FOLDER}>", files)


def load_pretrained(cls: Any, checkpoint: str, path: str | None, **kwargs: Any) -> Any:
    """`cls.from_pretrained` from `path` (a local dir) or the hub name, with one clear error offline.

    Args:
        cls: A transformers class with `from_pretrained` (model, config or tokenizer).
        checkpoint: Hub name, e.g. "bert-base-uncased"; named in the error.
        path: Local directory that overrides `checkpoint`, or None.
        **kwargs: Passed to `from_pretrained` (e.g. `num_labels`, config overrides).

    Raises:
        MissingAsset: `path` is not a directory, or the checkpoint is neither cached nor downloadable.
    """
    if path is not None and not os.path.isdir(path):
        raise MissingAsset(
            f"model.args.path={path!r} is not a directory; expected a local copy of {checkpoint}"
        )
    try:
        with _quiet_transformers():
            return cls.from_pretrained(path or checkpoint, **kwargs)
    except OSError as err:  # transformers raises OSError for "not cached and offline"
        where = f"{path!r} holds no loadable copy of it" if path else "not cached, no network"
        raise MissingAsset(f"cannot load checkpoint {checkpoint!r} ({where}): download it once while "
                           f"online, or set model.args.path=<{CHECKPOINT_FOLDER}>") from err
