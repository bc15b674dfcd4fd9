"""C4 (Raffel et al., 2020) masked-LM pretraining blocks, as VCAS pretrains a crammed BERT on C4 (VCAS paper,
Table 1; cramming: Geiping & Goldstein, 2023).

Online, `datasets.load_dataset("allenai/c4", "en", streaming=True)`: the stream is endless for our
purpose, so the first `train_size` blocks of its train split and the first `eval_size` of its validation
split are materialised (both must be set). Offline, `data_dir` holds C4-style JSON-lines files (`*.json`,
`*.jsonl`, `*.json.gz`, `*.jsonl.gz`, one `{"text": ...}` per line, e.g. the hub's
`en/c4-train.00000-of-01024.json.gz`), searched recursively; files with "validation" in their name form
the eval set, and without such files the last `eval_size` blocks (default 20%) are held out.

Documents are tokenised without special tokens, joined with [SEP] and cut into `max_length - 2`-token
pieces, each wrapped as `[CLS] piece [SEP]` (the remainder is dropped), so every block is full. Masking
is BERT's (15% of tokens; of those 80% [MASK], 10% random, 10% kept) by `DataCollatorForLanguageModeling`:
drawn afresh for every training batch (`with_transform`, RoBERTa's dynamic masking) and once, with a
fixed seed, for the eval set so its loss is comparable across runs. Labels are -100 except at masked
positions. The cramming recipe masks 25% (`mlm_probability=0.25`).
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
from array import array
from collections.abc import Iterable, Iterator

import datasets
import numpy as np
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.tasks.base import EVAL_FRACTION, SPLIT_SEED, TaskData, register_task

__all__ = ["HUB_NAME", "c4", "mask_transform", "read_texts", "token_blocks"]

HUB_NAME = "allenai/c4"
PATTERNS = ("*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz")
CHUNK = 1000  # documents tokenised per tokenizer call


def read_texts(paths: Iterable[str]) -> Iterator[str]:
    """The `text` field of every line of JSON-lines files (gzipped when the name ends in .gz)."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)["text"]


def token_blocks(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int, limit: int | None = None
) -> np.ndarray:
    """Concatenated documents cut into full `[CLS] ... [SEP]` blocks.

    Args:
        texts: Documents, read only as far as `limit` blocks need.
        tokenizer: A BERT-style tokenizer (with CLS, SEP and MASK tokens).
        max_length: Block length, special tokens included.
        limit: At most this many blocks, or None for all.

    Returns:
        (N, max_length) int32 token ids.
    """
    width = max_length - 2
    ids = array("i")
    for chunk in _chunks(texts, CHUNK):
        for document in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(document)
            ids.append(tokenizer.sep_token_id)
        if limit is not None and len(ids) >= limit * width:
            break
    count = len(ids) // width if limit is None else min(limit, len(ids) // width)
    body = np.frombuffer(ids, dtype=np.int32)[: count * width].reshape(count, width)
    column = np.ones((count, 1), dtype=np.int32)
    return np.concatenate([column * tokenizer.cls_token_id, body, column * tokenizer.sep_token_id], axis=1)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def mask_transform(collator: DataCollatorForLanguageModeling):
    """A batch transform: token blocks -> `input_ids` (masked), `attention_mask`, `labels` (N, L) int64."""

    def transform(batch: dict) -> dict:
        rows = zip(batch["input_ids"], batch["attention_mask"])
        return dict(collator([{"input_ids": ids, "attention_mask": mask} for ids, mask in rows]))

    return transform


def _blocks_dataset(blocks: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": np.ones_like(blocks, dtype=np.int8)}
    )


def _local_blocks(
    data_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_size: int | None,
    eval_size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(
        {p for pattern in PATTERNS for p in glob.glob(os.path.join(data_dir, "**", pattern), recursive=True)}
    )
    if not paths:
        raise MissingAsset(
            f"c4: no JSON-lines files ({', '.join(PATTERNS)}) under {data_dir!r}; "
            f'task.args.data_dir must hold C4-style files with one {{"text": ...}} per line'
        )
    held_out = [p for p in paths if "validation" in os.path.basename(p)]
    train_paths = [p for p in paths if p not in held_out]
    if held_out:
        return (
            token_blocks(read_texts(train_paths), tokenizer, max_length, train_size),
            token_blocks(read_texts(held_out), tokenizer, max_length, eval_size),
        )
    limit = None if train_size is None or eval_size is None else train_size + eval_size
    blocks = token_blocks(read_texts(train_paths), tokenizer, max_length, limit)
    count = eval_size if eval_size is not None else round(EVAL_FRACTION * len(blocks))
    return blocks[: len(blocks) - count][:train_size], blocks[len(blocks) - count :]


def _hub_blocks(
    tokenizer: PreTrainedTokenizerBase, max_length: int, train_size: int | None, eval_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    try:
        stream = datasets.load_dataset(HUB_NAME, "en", streaming=True)
    except (OSError, datasets.exceptions.DatasetsError) as err:  # offline, or hub errors
        raise MissingAsset(
            f"C4 {HUB_NAME!r} is not available offline (it streams from the hub); run online, or set "
            f"{HUB_ASSET.override}"
        ) from err
    if train_size is None or eval_size is None:
        raise ValueError("c4 streams from the hub: set task.args.train_size and task.args.eval_size (blocks)")
    texts = {split: (row["text"] for row in stream[split]) for split in ("train", "validation")}
    return (
        token_blocks(texts["train"], tokenizer, max_length, train_size),
        token_blocks(texts["validation"], tokenizer, max_length, eval_size),
    )


HUB_ASSET = HubAsset(
    f"C4 ({HUB_NAME}, streamed)", HUB_NAME, "dataset",
    f'task.args.data_dir=<folder of C4 JSON-lines files ({", ".join(PATTERNS)}), field "text">',
    streamed=True,
)


@register_task("c4", "mlm", HUB_ASSET)
def c4(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_length: int = 128,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
    mlm_probability: float = 0.15,
) -> TaskData:
    """C4 English masked-LM blocks of `max_length` tokens (cramming's 128).

    Args:
        tokenizer: The model's tokenizer; `num_labels` of the result is its vocabulary size.
        seed: Seeds the training masks (the eval masks are fixed).
        max_length: Tokens per block, [CLS] and [SEP] included.
        train_size: Training blocks; required when streaming, else None reads every train file.
        eval_size: Eval blocks; required when streaming.
        data_dir: Folder of C4 JSON-lines files; None streams from the hub.
        mlm_probability: Share of tokens masked (BERT 0.15; cramming 0.25).
    """
    if data_dir is None:
        train, eval_ = _hub_blocks(tokenizer, max_length, train_size, eval_size)
    else:
        train, eval_ = _local_blocks(data_dir, tokenizer, max_length, train_size, eval_size)
    if not len(train) or not len(eval_):
        raise ValueError(f"c4: too little text for one {max_length}-token block in train and in eval")
    eval_collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=mlm_probability, seed=SPLIT_SEED
    )
    masked = mask_transform(eval_collator)(_blocks_dataset(eval_)[:])  # once: eval masks never change
    eval_set = datasets.Dataset.from_dict({key: value.numpy() for key, value in masked.items()})
    train_set, phase_set = (
        _blocks_dataset(train).with_transform(mask_transform(DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=mlm_probability, seed=mask_seed)))
        for mask_seed in (seed, seed + 1_000_003)  # the phases' copy masks from its own stream
    )
    return TaskData(train_set, eval_set.with_format("torch"), len(tokenizer), "mlm", phase_train=phase_set)
