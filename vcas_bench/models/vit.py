"""Vision Transformer classifiers (Dosovitskiy et al., 2021) from transformers and timm.

VCAS fine-tunes ImageNet-21k ViT-base/large on image classification (VCAS paper, Table 1). The tiny
variants are random 2-layer ViTs on 32x32 inputs for tests: `vit-tiny` is the transformers model
(blocks `ViTLayer`), `timm-vit-tiny` the timm one (blocks `Block`, which return a plain tensor).
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from vcas_bench.models import ModelBundle, load_pretrained, register_model

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


@register_model("vit-base", "image")
def vit_base(
    num_labels: int, name: str = "google/vit-base-patch16-224-in21k", path: str | None = None
) -> ModelBundle:
    """Pretrained ViT-B/16 (ImageNet-21k, 224x224) with a fresh head."""
    return _create_hf_vit(load_pretrained(ViTForImageClassification, name, path, num_labels=num_labels))


@register_model("vit-large", "image")
def vit_large(
    num_labels: int, name: str = "google/vit-large-patch16-224-in21k", path: str | None = None
) -> ModelBundle:
    """Pretrained ViT-L/16 (ImageNet-21k, 224x224) with a fresh head."""
    return _create_hf_vit(load_pretrained(ViTForImageClassification, name, path, num_labels=num_labels))


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
