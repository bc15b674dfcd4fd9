"""The paper's tasks (GLUE, CIFAR/ImageNet, C4) from small local fixtures in each supported format, offline.

Fixtures are written to a temporary folder: original GLUE TSVs (SST-2, MNLI with both dev sets), the hub's
parquet export (QQP, QNLI), a 10-class ImageFolder of 8x8 PNGs and C4-style JSON lines. Without a
`data_dir` every task must fail offline in one line that names `task.args.data_dir`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from vcas_bench.assets import MissingAsset
from vcas_bench.config import validate
from vcas_bench.models import ModelBundle, create_model
from vcas_bench.tasks import TASK_MODALITIES, TASKS, TaskData, create_task, glue, vision
from vcas_bench.tasks.c4 import read_texts, token_blocks

NEW_TASKS = ["sst2", "mnli", "qqp", "qnli", "cifar10", "cifar100", "imagenet", "c4"]
MAX_LENGTH = 24
MNLI_HEADER = ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"]
PAIRS = [
    ('A man eats "pasta".', "Someone eats."),
    ("A dog runs.", "A cat sleeps."),
    ("Kids play.", "Kids nap."),
]


@pytest.fixture(scope="module")
def bundles() -> dict[str, ModelBundle]:
    """One cheap model per modality; tasks only read its tokenizer or image geometry."""
    return {"text": create_model("bert-tiny", num_labels=2), "image": create_model("vit-tiny", num_labels=10)}


def _write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    # Unquoted, tab-separated, like the GLUE download (sentences keep bare quote characters).
    path.write_text("\n".join("\t".join(map(str, row)) for row in [header, *rows]) + "\n")


@pytest.fixture(scope="module")
def glue_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sst2 and mnli as GLUE TSVs; qqp and qnli as the hub's parquet export (hub file names for qqp)."""
    root = tmp_path_factory.mktemp("glue")
    dirs = {name: root / name for name in glue.SPECS}
    for folder in dirs.values():
        folder.mkdir()
    sst2_rows = [[f"a {'good' if i % 2 else 'bad'} film number {i} .", i % 2] for i in range(12)]
    for name in ("train.tsv", "dev.tsv"):
        _write_tsv(dirs["sst2"] / name, ["sentence", "label"], sst2_rows)
    gold = ["entailment", "contradiction", "neutral", "-"]  # "-": no gold label, dropped
    mnli_rows = [[i, "fiction", *PAIRS[i % 3], g, g] for i, g in enumerate(gold * 3)]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write_tsv(dirs["mnli"] / name, MNLI_HEADER, mnli_rows[: 12 if "mis" in name else 8])
    for name, columns in (("qqp", ("question1", "question2")), ("qnli", ("question", "sentence"))):
        frame = pd.DataFrame({columns[0]: [p[0] for p in PAIRS * 4], columns[1]: [p[1] for p in PAIRS * 4]})
        frame = frame.assign(label=[i % 2 for i in range(12)], idx=range(12))
        train, dev = (
            ("train-00000-of-00001", "validation-00000-of-00001")
            if name == "qqp"
            else ("train", "validation")
        )
        frame.to_parquet(dirs[name] / f"{train}.parquet")
        frame.iloc[:6].to_parquet(dirs[name] / f"{dev}.parquet")
    return dirs


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10-shaped ImageFolder: train/ and test/, 10 class folders of 8x8 RGB PNGs."""
    root = tmp_path_factory.mktemp("cifar10")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def c4_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """C4-style JSON lines: with a validation file (one gzipped), and train-only (eval is held out)."""
    root = tmp_path_factory.mktemp("c4")
    docs = [
        json.dumps({"text": f"Document {i} says the quick brown fox jumps over the lazy dog. " * 4})
        for i in range(40)
    ]
    with_val, train_only = root / "with_val", root / "train_only"
    (with_val / "en").mkdir(parents=True)
    train_only.mkdir()
    (with_val / "en" / "c4-train.00000-of-01024.jsonl").write_text("\n".join(docs[:30]) + "\n")
    with gzip.open(with_val / "en" / "c4-validation.00000-of-00008.json.gz", "wt") as handle:
        handle.write("\n".join(docs[30:]) + "\n")
    (train_only / "docs.json").write_text("\n".join(docs) + "\n")
    return {"with_val": with_val, "train_only": train_only}


def _first_batch(dataset, batch_size: int = 4) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(dataset, batch_size=batch_size)))


# name -> (train rows, eval rows, labels present) of the fixtures above
GLUE_EXPECTED = {
    "sst2": (12, 12, {0, 1}),
    "mnli": (6, 6, {0, 1, 2}),
    "qqp": (12, 6, {0, 1}),
    "qnli": (12, 6, {0, 1}),
}


@pytest.mark.parametrize("name", sorted(GLUE_EXPECTED))
def test_glue_from_local_files(name: str, bundles, glue_dirs) -> None:
    task = create_task(name, bundles["text"], data_dir=str(glue_dirs[name]), max_length=MAX_LENGTH)
    train_rows, eval_rows, labels = GLUE_EXPECTED[name]
    pair = len(glue.SPECS[name].text_columns) == 2
    keys = {"input_ids", "attention_mask", "labels"} | ({"token_type_ids"} if pair else set())
    assert (task.num_labels, task.modality) == (glue.SPECS[name].num_labels, "text")
    assert (len(task.train), len(task.eval)) == (train_rows, eval_rows)
    assert set(task.train[:]["labels"].tolist()) == labels
    batch = _first_batch(task.train)
    assert set(batch) == keys
    assert all(value.dtype == torch.int64 for value in batch.values())
    assert batch["input_ids"].shape == (4, MAX_LENGTH) and batch["labels"].shape == (4,)
    tokenizer = bundles["text"].tokenizer
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    sep_count = (batch["input_ids"] == tokenizer.sep_token_id).sum(1)
    assert (sep_count == (2 if pair else 1)).all()  # pairs are encoded as [CLS] a [SEP] b [SEP]
    if pair:
        assert (batch["token_type_ids"].amax(1) == 1).all()


def test_mnli_reports_both_dev_sets(bundles, glue_dirs) -> None:
    """The dev TSVs keep the bare quotes; "-" rows are dropped; the other dev set is in `extra_eval`."""
    data_dir = str(glue_dirs["mnli"])
    matched = create_task("mnli", bundles["text"], data_dir=data_dir, max_length=MAX_LENGTH)
    assert set(matched.extra_eval) == {"mismatched"} and len(matched.extra_eval["mismatched"]) == 9
    assert matched.eval[:]["labels"].tolist() == [0, 2, 1, 0, 2, 1]  # entailment, contradiction, neutral
    assert '" pasta "' in bundles["text"].tokenizer.decode(matched.eval[0]["input_ids"])
    swapped = create_task(
        "mnli", bundles["text"], data_dir=data_dir, max_length=MAX_LENGTH, eval_split="mismatched"
    )
    assert (len(swapped.eval), set(swapped.extra_eval)) == (9, {"matched"})
    with pytest.raises(ValueError, match="eval_split must be 'matched' or 'mismatched'"):
        create_task("mnli", bundles["text"], data_dir=data_dir, eval_split="dev")


def test_glue_tsv_string_labels_follow_the_hub(tmp_path: Path) -> None:
    _write_tsv(
        tmp_path / "train.tsv",
        ["index", "question", "sentence", "label"],
        [[0, "Who?", "Him.", "entailment"], [1, "Why?", "No.", "not_entailment"]],
    )
    frame = glue.load_split("qnli", "train", str(tmp_path))
    assert frame.to_dict("list") == {
        "question": ["Who?", "Why?"],
        "sentence": ["Him.", "No."],
        "labels": [0, 1],
    }
    _write_tsv(
        tmp_path / "dev.tsv",
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        [[0, 1, 2, "How?", "How so?", 1]],
    )
    assert glue.load_split("qqp", "validation", str(tmp_path))["labels"].tolist() == [1]


def test_glue_caps_are_seeded_and_eval_is_fixed(bundles, glue_dirs) -> None:
    data_dir = str(glue_dirs["qqp"])
    first, other = (
        create_task(
            "qqp",
            bundles["text"],
            data_dir=data_dir,
            max_length=MAX_LENGTH,
            seed=seed,
            train_size=6,
            eval_size=4,
        )
        for seed in (0, 1)
    )
    assert (len(first.train), len(first.eval)) == (6, 4)
    assert sorted(first.train[:]["labels"].tolist()) == [0, 0, 0, 1, 1, 1]  # stratified
    assert torch.equal(first.eval[:]["input_ids"], other.eval[:]["input_ids"])


def test_image_folder_batches(bundles, image_root) -> None:
    task = create_task("cifar10", bundles["image"], data_dir=str(image_root))
    assert (task.num_labels, task.modality, len(task.train), len(task.eval)) == (10, "image", 30, 20)
    batch = _first_batch(task.train, batch_size=8)
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].dtype == torch.int64
    assert batch["pixel_values"].shape == (8, 3, 32, 32)  # 8x8 PNGs resized to vit-tiny's 32
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    assert batch["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # sorted class folders, sorted files
    assert set(task.eval[:]["labels"].tolist()) == set(range(10))


def test_image_folder_follows_the_model_and_caps(image_root) -> None:
    bundle = ModelBundle(nn.Identity(), "Block", "image", lambda m, b: b, image_size=16, num_channels=1)
    task = create_task("cifar10", bundle, data_dir=str(image_root), train_size=10, eval_size=10)
    assert (len(task.train), len(task.eval)) == (10, 10)
    assert sorted(task.train[:]["labels"].tolist()) == list(range(10))  # stratified: one per class
    pixels = _first_batch(task.eval)["pixel_values"]
    assert pixels.shape == (4, 1, 16, 16)
    image = task.eval.with_format(None)[0]["image"].convert("L").resize((16, 16), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255 * 2 - 1)
    torch.testing.assert_close(pixels[0, 0], expected)


def test_image_folder_with_the_wrong_class_count(bundles, image_root) -> None:
    with pytest.raises(ValueError, match="cifar100 has 100 classes but .* has 10 in train/"):
        create_task("cifar100", bundles["image"], data_dir=str(image_root))


def _c4(bundles, data_dir: Path, **kwargs) -> TaskData:
    return TASKS.create(
        "c4", tokenizer=bundles["text"].tokenizer, data_dir=str(data_dir), max_length=MAX_LENGTH, **kwargs
    )


def test_c4_blocks_and_masking(bundles, c4_dirs) -> None:
    tokenizer = bundles["text"].tokenizer
    task = _c4(bundles, c4_dirs["with_val"])
    assert (task.modality, task.num_labels) == ("mlm", len(tokenizer))
    raw = task.train.with_format("torch")[:]["input_ids"]  # unmasked blocks (the transform removed)
    assert raw.shape[1] == MAX_LENGTH and len(task.eval) > 0
    assert (raw[:, 0] == tokenizer.cls_token_id).all() and (raw[:, -1] == tokenizer.sep_token_id).all()
    batch = _first_batch(task.train, batch_size=len(task.train))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(value.dtype == torch.int64 and value.shape == raw.shape for value in batch.values())
    assert (batch["attention_mask"] == 1).all()
    masked = batch["labels"] != -100
    assert torch.equal(batch["labels"][masked], raw[masked])  # labels are the original tokens...
    assert torch.equal(batch["input_ids"][~masked], raw[~masked])  # ...and only masked tokens change
    assert not masked[:, [0, -1]].any()  # [CLS] and [SEP] are never masked
    assert 0.1 < masked[:, 1:-1].float().mean() < 0.2  # mlm_probability 0.15 of ~1,000 tokens
    replaced = batch["input_ids"][masked] == tokenizer.mask_token_id
    assert 0.6 < replaced.float().mean() < 0.95  # 80% of the masked become [MASK]
    again = _first_batch(task.train, batch_size=len(task.train))
    assert not torch.equal(again["labels"], batch["labels"])  # fresh masks every read


def test_c4_eval_masks_are_fixed_and_held_out(bundles, c4_dirs) -> None:
    """Without validation files the last `eval_size` blocks are held out, masked once with a fixed seed."""
    tokenizer = bundles["text"].tokenizer
    first, second = (_c4(bundles, c4_dirs["train_only"], eval_size=5, seed=seed) for seed in (0, 1))
    blocks = torch.from_numpy(
        token_blocks(read_texts([str(c4_dirs["train_only"] / "docs.json")]), tokenizer, MAX_LENGTH)
    ).long()
    assert (len(first.train), len(first.eval)) == (len(blocks) - 5, 5)
    rows = first.eval[:]
    masked = rows["labels"] != -100
    assert torch.equal(rows["labels"][masked], blocks[-5:][masked])
    assert torch.equal(rows["input_ids"][~masked], blocks[-5:][~masked])
    assert masked.sum(1).gt(0).all() and torch.equal(rows["labels"], second.eval[:]["labels"])


def test_token_blocks_cut_the_concatenated_text(bundles) -> None:
    tokenizer = bundles["text"].tokenizer
    blocks = token_blocks(["word " * 50, "word " * 49], tokenizer, 12)  # 100 words + 2 [SEP]
    assert blocks.shape == (10, 12) and blocks.dtype == np.int32  # 102 // 10-token pieces
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    assert (blocks[5, 1:-1] == tokenizer.sep_token_id).sum() == 1  # the document boundary, token 51
    assert token_blocks(["word " * 50], tokenizer, 12, limit=3).shape == (3, 12)


def _on_disk(splits: dict[str, datasets.Dataset], folder: Path) -> datasets.DatasetDict:
    """Like a hub download: arrow files in a cache folder, so tokenised copies are cached beside them."""
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def test_glue_from_the_hub_layout(bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online branch, fed a hub-shaped MNLI (ClassLabel labels, an `idx` column, hidden test labels)."""
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(glue.MNLI_LABELS)),
            "idx": datasets.Value("int32"),
        }
    )
    rows = {
        "premise": [p[0] for p in PAIRS * 2],
        "hypothesis": [p[1] for p in PAIRS * 2],
        "label": [0, 1, 2] * 2,
        "idx": list(range(6)),
    }
    splits = {
        s: datasets.Dataset.from_dict(rows, features=features)
        for s in ("train", "validation_matched", "validation_mismatched", "test_matched")
    }
    hub = _on_disk(splits, tmp_path / "mnli")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append(args) or hub)
    task = create_task("mnli", bundles["text"], max_length=MAX_LENGTH, train_size=3)
    assert calls == [(glue.HUB_NAME, "mnli")]
    assert set(task.train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert sorted(task.train[:]["labels"].tolist()) == [0, 1, 2]
    assert (len(task.eval), len(task.extra_eval["mismatched"])) == (6, 6)
    assert task.train.cache_files  # tokenised once into HF's cache, not kept in memory


def test_images_from_the_hub_layout(bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online branch, fed a hub-shaped CIFAR-100 (`img`, `fine_label`, `coarse_label`)."""
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(num_classes=100),
            "coarse_label": datasets.ClassLabel(num_classes=20),
        }
    )
    rows = {
        "img": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)],
        "fine_label": [0, 99, 5, 0, 99, 5],
        "coarse_label": [0] * 6,
    }
    split = datasets.Dataset.from_dict(rows, features=features)
    hub = _on_disk({"train": split, "test": split}, tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: [hub[s] for s in split])
    task = create_task("cifar100", bundles["image"], eval_size=3)
    batch = _first_batch(task.train, batch_size=6)
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["labels"].tolist() == rows["fine_label"]
    assert sorted(task.eval[:]["labels"].tolist()) == [0, 5, 99]


def test_c4_streams_a_finite_set(bundles, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online C4 is an endless stream: `train_size` and `eval_size` blocks are taken from it."""
    doc = {"text": "the quick brown fox jumps over the lazy dog " * 20}
    endless = datasets.IterableDataset.from_generator(lambda: iter(lambda: doc, None))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: {"train": endless, "validation": endless})
    tokenizer = bundles["text"].tokenizer
    task = TASKS.create("c4", tokenizer=tokenizer, max_length=MAX_LENGTH, train_size=7, eval_size=3)
    assert (len(task.train), len(task.eval)) == (7, 3)
    with pytest.raises(ValueError, match="set task.args.train_size and task.args.eval_size"):
        TASKS.create("c4", tokenizer=tokenizer, train_size=7)


@pytest.mark.parametrize("name", NEW_TASKS)
def test_no_data_dir_offline_is_one_clear_line(name: str, bundles) -> None:
    with pytest.raises(MissingAsset, match=r"task\.args\.data_dir") as raised:
        if TASK_MODALITIES[name] == "mlm":
            TASKS.create(name, tokenizer=bundles["text"].tokenizer)
        else:
            create_task(name, bundles[TASK_MODALITIES[name]])
    assert "\n" not in str(raised.value) and "offline" in str(raised.value)


@pytest.mark.parametrize("name", ["sst2", "mnli", "cifar10", "c4"])
def test_empty_data_dir_names_the_files(name: str, bundles, tmp_path: Path) -> None:
    with pytest.raises(MissingAsset, match=r"task\.args\.data_dir"):
        if name == "c4":
            _c4(bundles, tmp_path)
        else:
            create_task(name, bundles[TASK_MODALITIES[name]], data_dir=str(tmp_path))


def test_modality_mismatch(bundles, image_root) -> None:
    with pytest.raises(
        ValueError, match="task 'cifar10' is an image task but model 'bert-tiny' is a text model"
    ):
        create_task("cifar10", bundles["text"], model_name="bert-tiny", data_dir=str(image_root))
    with pytest.raises(ValueError, match="task 'sst2' is a text task but the model is an image model"):
        create_task("sst2", bundles["image"])
    with pytest.raises(
        ValueError, match=r"task 'c4' is masked-LM pretraining; model 'bert-tiny' was built as a classifier"
    ):
        create_task("c4", bundles["text"], model_name="bert-tiny")
    with pytest.raises(ValueError, match="model 'vit-tiny' has no masked-LM variant; pick one of: bert-base"):
        create_task("c4", bundles["image"], model_name="vit-tiny")


@pytest.mark.parametrize("name", NEW_TASKS)
def test_task_configs_match_their_builders(name: str) -> None:
    model = {"text": "bert-tiny", "image": "vit-tiny", "mlm": "bert-tiny"}[TASK_MODALITIES[name]]
    cfg = compose_config([f"task={name}", f"model={model}"])
    assert validate(cfg) == []
    spec = glue.SPECS.get(name) or vision.SPECS.get(name)
    if spec is not None:
        assert cfg.task.num_labels == spec.num_labels
    assert "data_dir" in cfg.task.args and cfg.task.args.data_dir is None
