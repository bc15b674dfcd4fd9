"""Every registered task: builds offline, batch-shaped columns, fixed stratified split, clear errors."""

import os
import tempfile

# Before transformers/datasets import: never reach the network, never write a user cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="vcas-hf-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vcas_bench.assets import MissingAsset  # noqa: E402
from vcas_bench.models import ModelBundle, create_model  # noqa: E402
from vcas_bench.tasks import TASK_MODALITIES, TASKS, TaskData, create_task  # noqa: E402
from vcas_bench.tasks import rt_polarity as rt  # noqa: E402
from vcas_bench.tasks.images import to_pixel_values  # noqa: E402

# name -> (num_labels, full train rows, full eval rows)
EXPECTED = {"rt-polarity": (2, 10201, 2551), "mnist5k": (10, 4000, 1000), "digits": (10, 1437, 360)}
SMALL = {"train_size": 60, "eval_size": 40}
# The paper's tasks need downloads; tests/test_paper_tasks.py covers them from small local fixtures.
PAPER_TASKS = {"sst2", "mnli", "qqp", "qnli", "cifar10", "cifar100", "imagenet", "c4"}


@pytest.fixture(scope="module")
def bundles() -> dict[str, ModelBundle]:
    """One cheap model per modality; tasks only read its tokenizer or image geometry."""
    return {"text": create_model("bert-tiny", num_labels=2), "image": create_model("vit-tiny", num_labels=10)}


def build(name: str, bundles: dict[str, ModelBundle], **kwargs: object) -> TaskData:
    return create_task(name, bundles[TASK_MODALITIES[name]], **kwargs)


def test_every_registered_task_is_covered() -> None:
    assert sorted(set(EXPECTED) | PAPER_TASKS) == TASKS.names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_small_task_columns_and_labels(name: str, bundles: dict[str, ModelBundle]) -> None:
    task = build(name, bundles, **SMALL)
    num_labels = EXPECTED[name][0]
    assert (task.num_labels, task.modality) == (num_labels, TASK_MODALITIES[name])
    assert (len(task.train), len(task.eval)) == (60, 40)
    for split in (task.train, task.eval):
        rows = split[:]
        if task.modality == "text":
            assert sorted(split.column_names) == ["attention_mask", "input_ids", "labels"]
            assert rows["input_ids"].dtype == rows["attention_mask"].dtype == torch.int64
            assert rows["input_ids"].shape == rows["attention_mask"].shape == (len(split), 64)
            assert (rows["input_ids"][:, 0] == bundles["text"].tokenizer.cls_token_id).all()
        else:
            assert sorted(split.column_names) == ["labels", "pixel_values"]
            assert rows["pixel_values"].dtype == torch.float32
            assert rows["pixel_values"].shape == (len(split), 3, 32, 32)
            assert rows["pixel_values"].min() >= -1 and rows["pixel_values"].max() <= 1
        assert rows["labels"].dtype == torch.int64
        # stratified caps keep every class even at 40 rows
        assert sorted(rows["labels"].unique().tolist()) == list(range(num_labels))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_split_sizes_and_balance(name: str, bundles: dict[str, ModelBundle]) -> None:
    task = build(name, bundles)
    assert (len(task.train), len(task.eval)) == EXPECTED[name][1:]
    train_share = np.bincount(task.train[:]["labels"].numpy()) / len(task.train)
    eval_share = np.bincount(task.eval[:]["labels"].numpy()) / len(task.eval)
    np.testing.assert_allclose(train_share, eval_share, atol=0.01)


def test_rt_polarity_rows_and_labels() -> None:
    raw = rt.load_frame(deduplicate=False)
    assert len(raw) == 12808
    assert raw["labels"].value_counts().to_dict() == {1: 7403, 0: 5405}
    frame = rt.load_frame()
    assert len(frame) == 12752 and not frame["text"].duplicated().any()
    assert rt.LABELS == {"rotten": 0, "fresh": 1}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_split_is_deterministic_and_eval_ignores_seed(name: str, bundles: dict[str, ModelBundle]) -> None:
    key = "input_ids" if TASK_MODALITIES[name] == "text" else "pixel_values"
    first, again = build(name, bundles, **SMALL), build(name, bundles, **SMALL)
    other_seed = build(name, bundles, seed=1, **SMALL)
    assert torch.equal(first.train[:][key], again.train[:][key])
    assert torch.equal(first.eval[:][key], other_seed.eval[:][key])
    assert not torch.equal(first.train[:][key], other_seed.train[:][key])


def test_images_follow_the_model_geometry() -> None:
    bundle = ModelBundle(nn.Identity(), "Block", "image", lambda m, b: b, image_size=16, num_channels=1)
    task = create_task("digits", bundle, eval_size=10)
    assert task.eval[:]["pixel_values"].shape == (10, 1, 16, 16)


def test_to_pixel_values_scaling() -> None:
    pixels = np.stack([np.zeros(64), np.full(64, 16.0)])
    values = to_pixel_values(pixels, side=8, max_value=16.0, image_size=12, num_channels=3)
    assert values.shape == (2, 3, 12, 12) and values.dtype == np.float32
    np.testing.assert_allclose(values[0], -1.0)
    np.testing.assert_allclose(values[1], 1.0)


def test_modality_mismatch_is_one_clear_line(bundles: dict[str, ModelBundle]) -> None:
    with pytest.raises(
        ValueError,
        match=r"task 'mnist5k' is an image task but model 'bert-tiny' is a text model; "
        r"pick one of: timm-vit-tiny, vit-base, vit-large, vit-tiny",
    ):
        create_task("mnist5k", bundles["text"], model_name="bert-tiny")
    with pytest.raises(ValueError, match="task 'rt-polarity' is a text task .* pick one of: bert-base"):
        create_task("rt-polarity", bundles["image"])


def test_unknown_task_and_missing_data(bundles: dict[str, ModelBundle], tmp_path: os.PathLike) -> None:
    with pytest.raises(KeyError, match="valid tasks: c4, cifar10, .*digits, .*rt-polarity, sst2"):
        create_task("nope", bundles["text"])
    with pytest.raises(MissingAsset, match=r"task\.args\.data_dir"):
        create_task("rt-polarity", bundles["text"], data_dir=str(tmp_path))
    with pytest.raises(MissingAsset, match=r"task\.args\.data_dir"):
        create_task("mnist5k", bundles["image"], data_dir=str(tmp_path))
