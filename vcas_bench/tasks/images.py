"""Turn small grayscale digit images into `pixel_values` for a model's input size and channel count."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = ["image_dataset", "to_pixel_values"]

MEAN, STD = 0.5, 0.5  # maps [0, 1] to [-1, 1], the normalisation ViT checkpoints were trained with


def to_pixel_values(
    pixels: np.ndarray, side: int, max_value: float, image_size: int, num_channels: int
) -> np.ndarray:
    """Scale, resize and channel-repeat flattened grayscale images.

    Args:
        pixels: (N, side * side) raw intensities in [0, max_value].
        side: Source height = width.
        max_value: Largest possible raw intensity (255 for MNIST, 16 for sklearn digits).
        image_size: Target height = width (bilinear resize).
        num_channels: Target channels; the gray channel is repeated.

    Returns:
        (N, num_channels, image_size, image_size) float32, normalised with mean 0.5, std 0.5.
    """
    images = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).view(-1, 1, side, side) / max_value
    if image_size != side:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.repeat(1, num_channels, 1, 1)
    return ((images - MEAN) / STD).numpy()


def image_dataset(
    frame: pd.DataFrame, side: int, max_value: float, image_size: int, num_channels: int
) -> datasets.Dataset:
    """A torch-format dataset with `pixel_values` (N, C, H, W) float32 and `labels` (N,) int64.

    Args:
        frame: Columns `pixels` (one flat array per row) and `labels`.
        side: Source height = width.
        max_value: Largest raw intensity.
        image_size: Target height = width.
        num_channels: Target channels.
    """
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D((num_channels, image_size, image_size), "float32"),
            "labels": datasets.Value("int64"),
        }
    )

    def convert(batch: dict) -> dict:
        values = to_pixel_values(np.stack(batch["pixels"]), side, max_value, image_size, num_channels)
        return {"pixel_values": values, "labels": batch["labels"]}

    dataset = datasets.Dataset.from_pandas(frame[["pixels", "labels"]], preserve_index=False)
    # keep_in_memory: no cache files are written next to the data or the repo.
    dataset = dataset.map(
        convert, batched=True, remove_columns=["pixels"], features=features, keep_in_memory=True
    )
    return dataset.with_format("torch", columns=["pixel_values", "labels"])
