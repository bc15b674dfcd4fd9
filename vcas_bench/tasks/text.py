"""Tokenise a text dataset (one sentence or a sentence pair per row) to fixed-length model inputs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import datasets
from transformers import PreTrainedTokenizerBase

__all__ = ["tokenize"]


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    text_columns: Sequence[str] = ("text",),
) -> datasets.Dataset:
    """Torch-format dataset with `input_ids`, `attention_mask` (N, max_length) int64 and `labels` (N,).

    Two `text_columns` are encoded as a pair (`[CLS] a [SEP] b [SEP]`, longest-first truncation) and
    also give `token_type_ids` (N, max_length), as BERT's GLUE fine-tuning does (Devlin et al., 2019).

    Args:
        dataset: Rows with the `text_columns` and `labels`; other columns are dropped.
        tokenizer: The model's tokenizer.
        max_length: Every row is padded or truncated to this many tokens.
        text_columns: One column, or two for a sentence pair.
    """
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if len(text_columns) == 2 else [])

    def encode(batch: dict) -> dict:
        texts = [batch[column] for column in text_columns]
        encoded = tokenizer(*texts, padding="max_length", truncation=True, max_length=max_length)
        return {key: encoded[key] for key in keys if key in encoded}

    drop = [column for column in dataset.column_names if column != "labels"]
    # A dataset loaded from the hub caches its tokenised copy beside it (keyed by tokenizer and length);
    # one built in memory from local files stays in memory, so nothing is written next to the data.
    in_memory = not dataset.cache_files
    # In memory nothing is cached, so the fingerprint need not come from hashing the tokenizer with dill
    # (about a second per call); a hub dataset keeps the hashed one, its cache key.
    fingerprint = _fingerprint(dataset, tokenizer, max_length, text_columns) if in_memory else None
    dataset = dataset.map(encode, batched=True, remove_columns=drop, keep_in_memory=in_memory,
                          new_fingerprint=fingerprint)
    return dataset.with_format("torch", columns=[k for k in keys if k in dataset.column_names] + ["labels"])


def _fingerprint(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 text_columns: Sequence[str]) -> str:
    key = "|".join(map(str, (dataset._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length,
                             list(text_columns))))
    return hashlib.sha256(key.encode()).hexdigest()[:16]
