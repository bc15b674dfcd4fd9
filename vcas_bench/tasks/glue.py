"""GLUE (Wang et al., 2019) SST-2, MNLI, QQP and QNLI, on which VCAS fine-tunes BERT (VCAS paper, Table 1).

Online the splits come from `datasets.load_dataset("nyu-mll/glue", <config>)` (the hub's current name for
"glue"); HF caches them and their tokenised copies. Offline, `data_dir` is a folder holding either the
original GLUE download's TSVs (`train.tsv`, `dev.tsv`; MNLI `dev_matched.tsv`, `dev_mismatched.tsv`) or
the hub's parquet export (`train.parquet` or `train-00000-of-00001.parquet`, `validation.parquet`; MNLI
`validation_matched.parquet`, `validation_mismatched.parquet`); those are read into memory.

Columns and label ids follow the hub: sst2 `sentence`; mnli `premise`, `hypothesis`, entailment 0 /
neutral 1 / contradiction 2; qqp `question1`, `question2`, duplicate 1; qnli `question`, `sentence`,
entailment 0 / not_entailment 1. The TSVs' string labels are mapped to these ids and rows without a gold
label are dropped. Pairs are tokenised as pairs. The eval sets are the GLUE dev sets (test labels are
hidden): MNLI reports both, the chosen one as `eval` and the other in `extra_eval`.
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass

import datasets
import pandas as pd
from transformers import PreTrainedTokenizerBase

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.tasks.base import SPLIT_SEED, TaskData, cap_indices, register_task
from vcas_bench.tasks.text import tokenize

__all__ = ["HUB_NAME", "SPECS", "hub_asset", "load_split", "mnli", "qnli", "qqp", "sst2"]

HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    """How one GLUE task is laid out on the hub and in the original TSVs."""

    text_columns: tuple[str, ...]  # hub columns; two are tokenised as a pair
    num_labels: int
    tsv_columns: dict[str, str]  # original TSV column -> hub column ("label" for the label)
    tsv_labels: dict[str, int] | None = None  # TSV label string -> hub id; None: the TSV has ids
    eval_splits: tuple[str, ...] = ("validation",)


MNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
SPECS = {
    "sst2": GlueSpec(("sentence",), 2, {"sentence": "sentence", "label": "label"}),
    "mnli": GlueSpec(
        ("premise", "hypothesis"),
        3,
        {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        MNLI_LABELS,
        ("validation_matched", "validation_mismatched"),
    ),
    "qqp": GlueSpec(
        ("question1", "question2"),
        2,
        {"question1": "question1", "question2": "question2", "is_duplicate": "label"},
    ),
    "qnli": GlueSpec(
        ("question", "sentence"),
        2,
        {"question": "question", "sentence": "sentence", "label": "label"},
        {"entailment": 0, "not_entailment": 1},
    ),
}


def _tsv_name(split: str) -> str:
    return split.replace("validation", "dev") + ".tsv"


def _expected_files(config: str) -> str:
    """The files `data_dir` must hold, for error messages."""
    splits = ("train", *SPECS[config].eval_splits)
    tsv, parquet = (
        " and ".join(names) for names in ([_tsv_name(s) for s in splits], [f"{s}.parquet" for s in splits])
    )
    return f"{tsv} (or {parquet})"


def hub_asset(config: str, override: str = "task.args.data_dir") -> HubAsset:
    """GLUE task `config` on the hub, replaced by a local folder at `override`."""
    return HubAsset(f"GLUE {config!r} ({HUB_NAME})", HUB_NAME, "dataset",
                    f"{override}=<folder with {_expected_files(config)}>")


def _read_tsv(path: str, spec: GlueSpec) -> pd.DataFrame:
    """An original GLUE TSV as a frame with the hub's column names and integer labels."""
    # QUOTE_NONE: GLUE's TSVs are unquoted and their sentences contain bare quote characters.
    raw = pd.read_csv(
        path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, on_bad_lines="warn"
    )
    frame = raw[list(spec.tsv_columns)].rename(columns=spec.tsv_columns)
    labels = (
        frame["label"].map(spec.tsv_labels)
        if spec.tsv_labels
        else pd.to_numeric(frame["label"], errors="coerce")
    )
    return frame.assign(label=labels).dropna()


def load_split(config: str, split: str, data_dir: str) -> pd.DataFrame:
    """One split from local files as a frame with the hub's text columns and `labels` (int64).

    Args:
        config: "sst2", "mnli", "qqp" or "qnli".
        split: Hub split name, e.g. "train", "validation", "validation_matched".
        data_dir: Folder with `<split>.parquet` / `<split>-*.parquet`, or the GLUE TSV (`dev*.tsv` for
            the validation splits).

    Raises:
        FileNotFoundError: Neither file is there.
    """
    spec = SPECS[config]
    parquet = sorted(glob.glob(os.path.join(data_dir, f"{split}.parquet")))
    parquet += sorted(glob.glob(os.path.join(data_dir, f"{split}-*.parquet")))
    tsv = os.path.join(data_dir, _tsv_name(split))
    if parquet:
        frame = pd.concat([pd.read_parquet(path) for path in parquet], ignore_index=True)
    elif os.path.isfile(tsv):
        frame = _read_tsv(tsv, spec)
    else:
        raise MissingAsset(
            f"GLUE {config!r}: neither {_tsv_name(split)} nor {split}.parquet is in {data_dir!r}; "
            f"task.args.data_dir must hold {_expected_files(config)}"
        )
    frame = frame[[*spec.text_columns, "label"]].rename(columns={"label": "labels"})
    return frame.astype({"labels": "int64"}).reset_index(drop=True)


def _load(config: str, data_dir: str | None) -> dict[str, datasets.Dataset]:
    """Train and dev splits with the text columns and `labels`, from `data_dir` or the hub."""
    spec = SPECS[config]
    splits = ("train", *spec.eval_splits)
    if data_dir is not None:
        return {
            s: datasets.Dataset.from_pandas(load_split(config, s, data_dir), preserve_index=False)
            for s in splits
        }
    try:
        loaded = datasets.load_dataset(HUB_NAME, config)
    except (OSError, datasets.exceptions.DatasetsError) as err:  # offline and not cached, or hub errors
        raise MissingAsset(
            f"GLUE {config!r} is not available offline (not in the HF cache); download it once online "
            f'(datasets.load_dataset("{HUB_NAME}", "{config}")) or set {hub_asset(config).override}'
        ) from err
    return {
        s: loaded[s].rename_column("label", "labels").select_columns([*spec.text_columns, "labels"])
        for s in splits
    }


def _capped(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    keep = cap_indices(list(dataset["labels"]), size, seed)
    return dataset if keep is None else dataset.select(keep)


def _glue(
    config: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    max_length: int,
    train_size: int | None,
    eval_size: int | None,
    data_dir: str | None,
    eval_split: str = "validation",
) -> TaskData:
    """Tokenised train set and dev set(s); `eval_split` becomes `eval`, other dev sets `extra_eval`."""
    spec = SPECS[config]
    splits = _load(config, data_dir)
    train = tokenize(_capped(splits["train"], train_size, seed), tokenizer, max_length, spec.text_columns)
    evals = {
        split: tokenize(
            _capped(splits[split], eval_size, SPLIT_SEED), tokenizer, max_length, spec.text_columns
        )
        for split in spec.eval_splits
    }
    extra = {split.removeprefix("validation_"): data for split, data in evals.items() if split != eval_split}
    return TaskData(train, evals[eval_split], spec.num_labels, "text", extra_eval=extra)


@register_task("sst2", "text", hub_asset("sst2"))
def sst2(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_length: int = 128,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """SST-2 sentence sentiment (Socher et al., 2013): 67,349 train / 872 dev sentences, 2 labels."""
    return _glue("sst2", tokenizer, seed, max_length, train_size, eval_size, data_dir)


@register_task("mnli", "text", hub_asset("mnli"))
def mnli(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_length: int = 128,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
    eval_split: str = "matched",
) -> TaskData:
    """MultiNLI entailment (Williams et al., 2018): 392,702 train pairs, 3 labels.

    Args:
        eval_split: "matched" (9,815 dev pairs, the training genres) or "mismatched" (9,832, other
            genres) becomes `eval`; the other one is `extra_eval[<name>]`.
    """
    if eval_split not in ("matched", "mismatched"):
        raise ValueError(f"mnli eval_split must be 'matched' or 'mismatched', not {eval_split!r}")
    return _glue(
        "mnli", tokenizer, seed, max_length, train_size, eval_size, data_dir, f"validation_{eval_split}"
    )


@register_task("qqp", "text", hub_asset("qqp"))
def qqp(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_length: int = 128,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """Quora Question Pairs duplicate detection: 363,846 train / 40,430 dev pairs, 2 labels."""
    return _glue("qqp", tokenizer, seed, max_length, train_size, eval_size, data_dir)


@register_task("qnli", "text", hub_asset("qnli"))
def qnli(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_length: int = 128,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """Question-answer entailment from SQuAD (Rajpurkar et al., 2016): 104,743 train / 5,463 dev, 2 labels."""
    return _glue("qnli", tokenizer, seed, max_length, train_size, eval_size, data_dir)
