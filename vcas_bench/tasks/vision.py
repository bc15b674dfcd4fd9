"""CIFAR-10/100 (Krizhevsky, 2009) and ImageNet-1k (Russakovsky et al., 2015), on which VCAS fine-tunes
ViT-base/large (VCAS paper, Table 1).

Online the splits come from the hub: `uoft-cs/cifar10` (columns `img`, `label`), `uoft-cs/cifar100`
(`img`, `fine_label`) and `ILSVRC/imagenet-1k` (`image`, `label`; gated: accept its terms on the hub and
log in once). Offline, `data_dir` is an ImageFolder root: `train/<class>/*.png` plus `test/<class>/...`
(ImageNet: `val/<class>/...`), class ids in sorted folder-name order as torchvision's `ImageFolder`.

Images stay encoded (or on disk) and become `pixel_values` only when a batch is read (`with_transform`),
so 224x224 ImageNet never sits in memory: converted to RGB (or gray for 1 channel), resized to the model's
`image_size` (bilinear, as ViT's image processor), scaled to [0, 1] and normalised with mean = std = 0.5
(the ViT ImageNet-21k checkpoints' processor). No augmentation: the paper states none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.tasks.base import SPLIT_SEED, TaskData, cap_indices, register_task
from vcas_bench.tasks.images import MEAN, STD

__all__ = ["SPECS", "cifar10", "cifar100", "image_folder", "imagenet", "pixel_transform"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class ImageSpec:
    """Where one image task lives on the hub and in an ImageFolder."""

    hub_name: str
    image_column: str
    label_column: str
    hub_eval: str  # hub split used for evaluation
    folder_eval: str  # ImageFolder sub-folder used for evaluation
    num_labels: int


SPECS = {
    "cifar10": ImageSpec("uoft-cs/cifar10", "img", "label", "test", "test", 10),
    "cifar100": ImageSpec("uoft-cs/cifar100", "img", "fine_label", "test", "test", 100),
    "imagenet": ImageSpec("ILSVRC/imagenet-1k", "image", "label", "validation", "val", 1000),
}


def hub_asset(name: str) -> HubAsset:
    """Image task `name` on the hub, replaced by a local ImageFolder at task.args.data_dir."""
    spec = SPECS[name]
    layout = f"an ImageFolder root with train/<class>/ and {spec.folder_eval}/<class>/"
    return HubAsset(f"{name} ({spec.hub_name})", spec.hub_name, "dataset", f"task.args.data_dir=<{layout}>")


def pixel_transform(image_size: int, num_channels: int):
    """A batch transform: `image` (PIL) and `labels` -> `pixel_values` (N, C, H, W) float32, `labels` (N,).

    Args:
        image_size: Output height = width.
        num_channels: 3 (RGB) or 1 (gray).
    """
    if num_channels not in (1, 3):
        raise ValueError(f"image tasks give 1 or 3 channels, not num_channels={num_channels}")
    mode = "RGB" if num_channels == 3 else "L"

    def transform(batch: dict) -> dict:
        pixels = [_to_array(image, mode, image_size) for image in batch["image"]]
        values = (torch.from_numpy(np.stack(pixels)) - MEAN) / STD
        return {"pixel_values": values, "labels": torch.as_tensor(batch["labels"], dtype=torch.long)}

    return transform


def _to_array(image: Image.Image, mode: str, size: int) -> np.ndarray:
    """(C, size, size) float32 in [0, 1]."""
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_folder(root: str, split: str, classes: list[str] | None = None) -> datasets.Dataset:
    """`root/<split>/<class>/**/<image>` as a dataset of lazily decoded `image` and `labels` (in memory).

    Args:
        root: ImageFolder root.
        split: Sub-folder, e.g. "train", "test", "val".
        classes: Class folder names in label order; None: the sorted sub-folders of `root/<split>`.

    Raises:
        FileNotFoundError: `root/<split>` is not a folder.
        ValueError: It has a class folder outside `classes`.
    """
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no {split}/ folder in {root!r}")
    found = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    classes = found if classes is None else classes
    if unknown := sorted(set(found) - set(classes)):
        raise ValueError(f"{folder!r} has class folders missing from train/: {', '.join(unknown[:5])}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for parent, _, files in sorted(os.walk(os.path.join(folder, name))):
            images = [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
            paths += images
            labels += [label] * len(images)
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=classes)})
    # Image() stores only the paths; files are read when a batch is.
    return datasets.Dataset.from_dict({"image": paths, "labels": labels}, features=features)


def _load_folder(name: str, data_dir: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    spec = SPECS[name]
    layout = f"train/<class>/*.png and {spec.folder_eval}/<class>/*.png"
    try:
        train = image_folder(data_dir, "train")
        eval_ = image_folder(data_dir, spec.folder_eval, train.features["labels"].names)
    except FileNotFoundError as err:
        message = f"{name}: {err}; task.args.data_dir must be an ImageFolder root ({layout})"
        raise MissingAsset(message) from None
    classes = train.features["labels"].num_classes
    if classes != spec.num_labels:
        raise ValueError(f"{name} has {spec.num_labels} classes but {data_dir!r} has {classes} in train/")
    return train, eval_


def _load_hub(name: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    spec = SPECS[name]
    try:
        loaded = datasets.load_dataset(spec.hub_name, split=["train", spec.hub_eval])
    except (OSError, datasets.exceptions.DatasetsError) as err:  # offline and not cached, gated, hub errors
        gated = "; it is gated: accept its terms on the hub and log in first" if name == "imagenet" else ""
        raise MissingAsset(
            f"{name} is not available offline (not in the HF cache); download it once online "
            f'(datasets.load_dataset("{spec.hub_name}"){gated}) or set {hub_asset(name).override}'
        ) from err
    renames = {spec.image_column: "image", spec.label_column: "labels"}
    train, eval_ = (split.select_columns(list(renames)).rename_columns(renames) for split in loaded)
    return train, eval_


def _image_task(
    name: str,
    image_size: int,
    num_channels: int,
    seed: int,
    train_size: int | None,
    eval_size: int | None,
    data_dir: str | None,
) -> TaskData:
    transform = pixel_transform(image_size, num_channels)
    train, eval_ = _load_hub(name) if data_dir is None else _load_folder(name, data_dir)
    splits = []
    for split, size, split_seed in ((train, train_size, seed), (eval_, eval_size, SPLIT_SEED)):
        keep = cap_indices(list(split["labels"]), size, split_seed)
        splits.append((split if keep is None else split.select(keep)).with_transform(transform))
    return TaskData(splits[0], splits[1], SPECS[name].num_labels, "image")


@register_task("cifar10", "image", hub_asset("cifar10"))
def cifar10(
    image_size: int,
    num_channels: int,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """CIFAR-10: 50,000 train / 10,000 test 32x32 images, 10 classes, resized to `image_size`."""
    return _image_task("cifar10", image_size, num_channels, seed, train_size, eval_size, data_dir)


@register_task("cifar100", "image", hub_asset("cifar100"))
def cifar100(
    image_size: int,
    num_channels: int,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """CIFAR-100: 50,000 train / 10,000 test 32x32 images, 100 fine classes, resized to `image_size`."""
    return _image_task("cifar100", image_size, num_channels, seed, train_size, eval_size, data_dir)


@register_task("imagenet", "image", hub_asset("imagenet"))
def imagenet(
    image_size: int,
    num_channels: int,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """ImageNet-1k: 1,281,167 train / 50,000 validation images, 1,000 classes, resized to `image_size`."""
    return _image_task("imagenet", image_size, num_channels, seed, train_size, eval_size, data_dir)
