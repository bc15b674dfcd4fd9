"""Tiny local stand-ins, in the real on-disk formats, for every asset the paper's commands download.

Written into a folder by :func:`write_standins` (a session fixture in ``conftest.py``), never committed:

    models/bert-base, models/bert-large   BERT checkpoints as on the hub: `BertForPreTraining` weights
                                          (no classification head), config.json and tokenizer files,
                                          written by `save_pretrained` (hidden 32, 2 layers)
    models/vit-base, models/vit-large     ViT checkpoints as Google's in21k ones: `ViTModel` weights
                                          (32x32 inputs, patch 8, hidden 32, 2 layers)
    models/timm-vit/model.safetensors     timm's weights file of `vit_tiny_patch16_224.augreg_in21k`
                                          (21,843-class head, as the in21k files carry)
    data/sst2, data/mnli                  the original GLUE TSVs (MNLI: dev_matched and dev_mismatched)
    data/qqp, data/qnli                   the hub's parquet export
    data/cifar10, data/cifar100           ImageFolders train/ + test/ (10 and 100 classes of 8x8 PNGs)
    data/imagenet                         ImageFolder train/ + val/, 1,000 classes
    data/c4/en/*.json(.gz)                C4 JSON lines with a validation file

Every folder is named after the task or model it stands in for, so one override serves a sweep:
``task.args.data_dir=<root>/data/${task.name}``, ``model.args.path=<root>/models/${model.name}``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertForPreTraining, ViTConfig, ViTModel

from vcas_bench.models.bert import minilm_path

TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k"
MNLI_HEADER = ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"]
PAIRS = [
    ('A man eats "pasta".', "Someone eats."),
    ("A dog runs.", "A cat sleeps."),
    ("Kids play.", "Kids nap."),
    ("The sun is up.", "It is day."),
]
IMAGE_TASKS = {"cifar10": (10, "test"), "cifar100": (100, "test"), "imagenet": (1000, "val")}


@dataclass(frozen=True)
class Standins:
    """Where each stand-in lies."""

    root: Path

    def model(self, name: str) -> Path:
        """A checkpoint folder: bert-base, bert-large, vit-base, vit-large, or timm-vit (weights file)."""
        if name == "timm-vit":
            return self.root / "models" / "timm-vit" / "model.safetensors"
        return self.root / "models" / name

    def data(self, task: str) -> Path:
        """The local data folder of a paper task (sst2, mnli, qqp, qnli, cifar10, cifar100, imagenet, c4)."""
        return self.root / "data" / task


def write_standins(root: Path) -> Standins:
    """Write every stand-in under ``root`` (about 3 seconds) and say where they are."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # bert-base-uncased's vocabulary
    for name in ("bert-base", "bert-large"):
        _write_bert(root / "models" / name, tokenizer)
    for name in ("vit-base", "vit-large"):
        _write_vit(root / "models" / name)
    _write_timm_vit(root / "models" / "timm-vit")
    _write_glue(root / "data")
    rng = np.random.default_rng(0)
    for task, (classes, eval_split) in IMAGE_TASKS.items():
        _write_image_folder(root / "data" / task, classes, eval_split, rng)
    _write_c4(root / "data" / "c4")
    return Standins(root)


def _write_bert(folder: Path, tokenizer) -> None:
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512,
                        architectures=["BertForPreTraining"])
    BertForPreTraining(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_vit(folder: Path) -> None:
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, architectures=["ViTModel"])
    ViTModel(config).save_pretrained(folder)


def _write_timm_vit(folder: Path) -> None:
    folder.mkdir(parents=True)
    model = timm.create_model(TIMM_NAME, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def _write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    # Unquoted, tab-separated, like the GLUE download (sentences keep bare quote characters).
    path.write_text("\n".join("\t".join(map(str, row)) for row in [header, *rows]) + "\n")


def _write_glue(root: Path) -> None:
    for name in ("sst2", "mnli", "qqp", "qnli"):
        (root / name).mkdir(parents=True)
    sst2_rows = [[f"a {'good' if i % 2 else 'bad'} film number {i} .", i % 2] for i in range(40)]
    for name in ("train.tsv", "dev.tsv"):
        _write_tsv(root / "sst2" / name, ["sentence", "label"], sst2_rows)
    gold = ["entailment", "contradiction", "neutral", "-"]  # "-": no gold label, dropped
    mnli_rows = [[i, "fiction", *PAIRS[i % 4], g, g] for i, g in enumerate(gold * 12)]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write_tsv(root / "mnli" / name, MNLI_HEADER, mnli_rows)
    for name, columns in (("qqp", ("question1", "question2")), ("qnli", ("question", "sentence"))):
        frame = pd.DataFrame({columns[0]: [p[0] for p in PAIRS * 10], columns[1]: [p[1] for p in PAIRS * 10]})
        frame = frame.assign(label=[i % 2 for i in range(40)], idx=range(40))
        # qqp with the hub's shard names, qnli with plain split names: both layouts are read
        train, dev = (("train-00000-of-00001", "validation-00000-of-00001") if name == "qqp"
                      else ("train", "validation"))
        frame.to_parquet(root / name / f"{train}.parquet")
        frame.iloc[:12].to_parquet(root / name / f"{dev}.parquet")


def _write_image_folder(root: Path, classes: int, eval_split: str, rng: np.random.Generator) -> None:
    """8x8 RGB PNGs: at least 64 in train/ (a batch of 32 and more), one per class in the eval split."""
    per_class = max(1, -(-64 // classes))
    for split, count in (("train", per_class), (eval_split, 1)):
        for label in range(classes):
            folder = root / split / f"n{label:05d}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _write_c4(root: Path) -> None:
    docs = [json.dumps({"text": f"Document {i} says the quick brown fox jumps over the lazy dog. " * 12})
            for i in range(80)]
    (root / "en").mkdir(parents=True)
    (root / "en" / "c4-train.00000-of-01024.json").write_text("\n".join(docs[:70]) + "\n")
    with gzip.open(root / "en" / "c4-validation.00000-of-00008.json.gz", "wt") as handle:
        handle.write("\n".join(docs[70:]) + "\n")
