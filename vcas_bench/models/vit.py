"""Vision Transformer classifiers (Dosovitskiy et al., 2021) from transformers and timm.

VCAS fine-tunes ImageNet-21k ViT-base/large on image classification (VCAS paper, Table 1). `vit-base` and
`vit-large` load either the transformers checkpoints (`backend="hf"`, `checkpoint`, blocks `ViTLayer`) or
timm's (`backend="timm"`, e.g. `vit_base_patch16_224.augreg_in21k`, blocks `Block`); both are ImageNet-21k
ViT-B/16 and ViT-L/16 at 224x224 with mean = std = 0.5 inputs, the paper does not say which it used. The
tiny variants are random 2-layer ViTs on 32x32 inputs for tests: `vit-tiny` is the transformers model
(blocks `ViTLayer`), `timm-vit-tiny` the timm one (blocks `Block`, which return a plain tensor).
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.models.base import ModelBundle, checkpoint_asset, load_pretrained, register_model

__all__ = ["timm_vit_tiny", "vit_base", "vit_large", "vit_tiny"]


def hf_image_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits (N, num_labels) of a transformers image classifier for a batch with `pixel_values` (N,C,H,W)."""
    return model(pixel_values=batch["pixel_values"]).logits


def timm_image_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits (N, num_labels) of a timm classifier for a batch with `pixel_values` (N,C,H,W)."""
    return model(batch["pixel_values"])


def _create_hf_vit(model: ViTForImageClassification) -> ModelBundle:
    """Bundle a transformers ViT, reading the input geometry from its config."""
    config = model.config
    return ModelBundle(
        model,
        "ViTLayer",
        "image",
        hf_image_logits,
        image_size=config.image_size,
        num_channels=config.num_channels,
    )


@register_model("vit-tiny", "image")
def vit_tiny(
    num_labels: int, image_size: int = 32, patch_size: int = 4, num_channels: int = 3
) -> ModelBundle:
    """Random transformers ViT: 2 layers, hidden 64, 2 heads, MLP 128."""
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=num_labels,
    )
    return _create_hf_vit(ViTForImageClassification(config))


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm_weights_file(path: str, timm_name: str) -> str:
    """A weights file timm can load for `path`: the file itself, or a known file inside a folder."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if found:
            return found[0]
    elif os.path.isfile(path):
        return path
    raise MissingAsset(
        f"model.args.path={path!r} is neither a weights file nor a folder with one of "
        f"{', '.join(WEIGHT_FILES)}; expected a local copy of timm's {timm_name}"
    )


TIMM_OVERRIDE = "model.args.path=<local model.safetensors, or a folder holding it>"


def _vit_hub_assets(args: dict, mlm: bool) -> list[HubAsset]:
    """hf: the transformers checkpoint; timm: timm's weights file on the hub (`timm/<timm_name>`)."""
    if args.get("path") is not None:
        return []
    if args.get("backend", "hf") == "timm":
        name = args["timm_name"]
        return [HubAsset(f"timm checkpoint {name!r}", f"timm/{name}", "model", TIMM_OVERRIDE, WEIGHT_FILES)]
    return [checkpoint_asset(args["checkpoint"])]


def _create_timm_vit(timm_name: str, num_labels: int, path: str | None, **kwargs: Any) -> ModelBundle:
    """A pretrained timm ViT with a fresh `num_labels` head, from timm's hub cache or a local file.

    `path` goes through `pretrained_cfg_overlay=dict(file=...)`, timm's way to load a named model's
    weights from disk. `kwargs` reach `timm.create_model` (architecture overrides, for tests).

    Raises:
        FileNotFoundError: `path` holds no weights, or the checkpoint is neither cached nor downloadable.
    """
    overlay = None if path is None else {"file": _timm_weights_file(path, timm_name)}
    try:
        model = timm.create_model(timm_name, pretrained=True, num_classes=num_labels,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError when offline and not cached
        raise MissingAsset(
            f"cannot load timm checkpoint {timm_name!r} (not cached, no network): download it once while "
            f"online, or set {TIMM_OVERRIDE}"
        ) from err
    size, channels = model.patch_embed.img_size[0], model.patch_embed.proj.in_channels
    return ModelBundle(model, "Block", "image", timm_image_logits, image_size=size, num_channels=channels)


def _create_pretrained_vit(
    backend: str, checkpoint: str, timm_name: str, num_labels: int, path: str | None
) -> ModelBundle:
    if backend == "timm":
        return _create_timm_vit(timm_name, num_labels, path)
    if backend != "hf":
        raise ValueError(f"model.args.backend={backend!r}; valid: hf, timm")
    return _create_hf_vit(load_pretrained(ViTForImageClassification, checkpoint, path, num_labels=num_labels))


@register_model("vit-base", "image", hub_assets=_vit_hub_assets)
def vit_base(
    num_labels: int,
    checkpoint: str = "google/vit-base-patch16-224-in21k",
    path: str | None = None,
    backend: str = "hf",
    timm_name: str = "vit_base_patch16_224.augreg_in21k",
) -> ModelBundle:
    """Pretrained ViT-B/16 (ImageNet-21k, 224x224) with a fresh head, from transformers (`checkpoint`) or timm
    (`timm_name`); `path` is a local copy (a checkpoint folder for hf, a weights file or folder for timm)."""
    return _create_pretrained_vit(backend, checkpoint, timm_name, num_labels, path)


@register_model("vit-large", "image", hub_assets=_vit_hub_assets)
def vit_large(
    num_labels: int,
    checkpoint: str = "google/vit-large-patch16-224-in21k",
    path: str | None = None,
    backend: str = "hf",
    timm_name: str = "vit_large_patch16_224.augreg_in21k",
) -> ModelBundle:
    """Pretrained ViT-L/16 (ImageNet-21k, 224x224) with a fresh head, from transformers (`checkpoint`) or timm
    (`timm_name`); `path` is a local copy (a checkpoint folder for hf, a weights file or folder for timm)."""
    return _create_pretrained_vit(backend, checkpoint, timm_name, num_labels, path)


@register_model("timm-vit-tiny", "image")
def timm_vit_tiny(
    num_labels: int, image_size: int = 32, patch_size: int = 4, num_channels: int = 3
) -> ModelBundle:
    """Random timm ViT (vit_tiny_patch16_224 shrunk to 2 blocks, dim 64, 2 heads, MLP 128)."""
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size,
        in_chans=num_channels,
        num_classes=num_labels,
        depth=2,
        embed_dim=64,
        num_heads=2,
        mlp_ratio=2.0,
    )
    return ModelBundle(
        model, "Block", "image", timm_image_logits, image_size=image_size, num_channels=num_channels
    )
