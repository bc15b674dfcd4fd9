"""sklearn digits: 1,797 8x8 handwritten digits (UCI optdigits test set), intensities 0..16.

Loaded with `sklearn.datasets.load_digits`, which reads a file inside scikit-learn (no download).
Split 1,437 train / 360 eval.
"""

from __future__ import annotations

import pandas as pd
from sklearn.datasets import load_digits

from vcas_bench.tasks.base import TaskData, register_task, split_rows
from vcas_bench.tasks.images import image_dataset

__all__ = ["digits"]

SIDE, MAX_VALUE, NUM_LABELS = 8, 16.0, 10


def load_frame() -> pd.DataFrame:
    """All 1,797 rows as a frame with `pixels` (64 uint8 values) and `labels`."""
    bunch = load_digits()
    return pd.DataFrame({"pixels": list(bunch.data.astype("uint8")), "labels": bunch.target.astype("int64")})


@register_task("digits", "image")
def digits(
    image_size: int,
    num_channels: int,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
) -> TaskData:
    """sklearn digits resized to `image_size` and repeated to `num_channels` (see `tasks/images.py`)."""
    train, eval_ = split_rows(load_frame(), seed, train_size, eval_size)
    train_set, eval_set = (
        image_dataset(f, SIDE, MAX_VALUE, image_size, num_channels) for f in (train, eval_)
    )
    return TaskData(train_set, eval_set, NUM_LABELS, "image")
