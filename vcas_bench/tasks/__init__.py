"""Task registry: each builder returns a `TaskData` of train/eval `datasets.Dataset`s shaped for a model.

Tasks read small labelled sets that ship inside pip packages, so runs and tests work offline. Every task
uses a fixed stratified 80/20 split (random_state=0, independent of `seed`) so eval sets are comparable
across runs; `seed` only picks which training rows survive a `train_size` cap.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import pandas as pd
from sklearn.model_selection import train_test_split

from vcas_bench.models import MODEL_MODALITIES, ModelBundle
from vcas_bench.registry import Registry

__all__ = [
    "TASKS",
    "TASK_MODALITIES",
    "TaskData",
    "create_task",
    "register_task",
    "split_rows",
    "package_file",
]

TASKS = Registry("task")
# name -> "text" | "image", known before any data loads so a bad task/model pair fails first.
TASK_MODALITIES: dict[str, str] = {}

SPLIT_SEED = 0  # fixed: the eval set must not move with the training seed
EVAL_FRACTION = 0.2


@dataclass
class TaskData:
    """Train and eval sets in torch format; columns are exactly the batch keys.

    Attributes:
        train: Text: `input_ids`, `attention_mask` (N, L) int64, `labels` (N,) int64.
            Image: `pixel_values` (N, C, H, W) float32, `labels` (N,) int64.
        eval: Same columns as `train`.
        num_labels: Number of classes; labels lie in [0, num_labels).
        modality: "text" or "image".
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int
    modality: str


def register_task(name: str, modality: str) -> Callable[[Callable[..., TaskData]], Callable[..., TaskData]]:
    """Register a builder in `TASKS` and record its modality.

    Args:
        name: Registry name, as used by `task=<name>` on the command line.
        modality: "text" or "image".
    """

    def decorator(builder: Callable[..., TaskData]) -> Callable[..., TaskData]:
        TASK_MODALITIES[name] = modality
        return TASKS.register(name)(builder)

    return decorator


def create_task(name: str, bundle: ModelBundle, model_name: str | None = None, **kwargs: Any) -> TaskData:
    """Build a registered task shaped for `bundle` (its tokenizer, or its image size and channels).

    Args:
        name: Registered task name (see `TASKS.names()`).
        bundle: The model the data is for.
        model_name: The model's registry name, only to make the mismatch error name it.
        **kwargs: Flat builder arguments, e.g. `seed=`, `train_size=`, `max_length=`, `data_dir=`.

    Raises:
        KeyError: Unknown task name; the message lists the valid names.
        ValueError: The task's modality differs from the model's (checked before any data loads).
    """
    TASKS.get(name)  # unknown names fail with the registry's list of valid tasks
    modality = TASK_MODALITIES[name]
    if modality != bundle.modality:
        model = f"model {model_name!r}" if model_name else "the model"
        choices = ", ".join(sorted(m for m, kind in MODEL_MODALITIES.items() if kind == modality))
        task_kind, model_kind = _with_article(modality), _with_article(bundle.modality)
        raise ValueError(
            f"task {name!r} is {task_kind} task but {model} is {model_kind} model; pick one of: {choices}"
        )
    if modality == "text":
        inputs = {"tokenizer": bundle.tokenizer}
    else:
        inputs = {"image_size": bundle.image_size, "num_channels": bundle.num_channels}
    return TASKS.create(name, **inputs, **kwargs)


def _with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def package_file(package: str, relative: str, data_dir: str | None, install_hint: str) -> str:
    """Path of a data file shipped inside `package`, or of the same file name in `data_dir`.

    Uses `find_spec` so the (sometimes heavy) package is never imported.

    Raises:
        FileNotFoundError: The file is missing; the message says how to provide it.
    """
    if data_dir is not None:
        path = os.path.join(data_dir, os.path.basename(relative))
    else:
        spec = importlib.util.find_spec(package)
        locations = spec.submodule_search_locations if spec is not None else None
        path = os.path.join(locations[0], relative) if locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.basename(relative)} not found (looked in {path!r}): {install_hint}, "
            f"or set task.data_dir=/dir/containing/the/file"
        )
    return path


def split_rows(
    frame: pd.DataFrame, seed: int, train_size: int | None, eval_size: int | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fixed stratified 80/20 train/eval split of a frame with a `labels` column, then optional caps.

    Args:
        frame: One row per example.
        seed: Chooses the training rows kept by `train_size`.
        train_size: Keep at most this many training rows (stratified), or None for all.
        eval_size: Keep at most this many eval rows (stratified, fixed choice), or None for all.

    Returns:
        (train, eval) frames with fresh indices.
    """
    train, eval_ = train_test_split(
        frame, test_size=EVAL_FRACTION, stratify=frame["labels"], random_state=SPLIT_SEED
    )
    train, eval_ = _cap_rows(train, train_size, seed), _cap_rows(eval_, eval_size, SPLIT_SEED)
    return train.reset_index(drop=True), eval_.reset_index(drop=True)


def _cap_rows(frame: pd.DataFrame, size: int | None, seed: int) -> pd.DataFrame:
    """At most `size` rows, stratified by `labels` when both parts can hold every class."""
    if size is None or size >= len(frame):
        return frame
    labels = frame["labels"]
    stratify = labels if min(size, len(frame) - size) >= labels.nunique() else None
    kept, _ = train_test_split(frame, train_size=size, stratify=stratify, random_state=seed)
    return kept


# Imported last so the builders can use the names above while registering.
from vcas_bench.tasks import digits, mnist5k, rt_polarity  # noqa: E402, F401
