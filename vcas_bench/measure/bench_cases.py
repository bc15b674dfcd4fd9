"""The models and batches `make bench` times (``scripts/bench_backward.py``; docs/benchmarks.md).

A case is a model, the block type VCAS wraps, one fixed batch of ``BATCH`` rows and how to get
logits. Names:

- ``minilm-<seq>``: MiniLM, random token ids, full attention mask (every row is real work);
- ``minilm-text-<seq>``: MiniLM on the first reviews of rt-polarity, padded to ``seq`` (real text:
  most positions are padding, as in training);
- ``bert-base-width-<seq>``: a 2-layer BERT-base-width stack (hidden 768, 12 heads, MLP 3072), random
  init and ids, full mask; ``-nodropout`` turns dropout off (its random draws cost time, not FLOPs);
- ``vit-tiny``: the tiny ViT on random 32x32 images;
- ``tiny-width-<seq>``: a 2-layer BERT of hidden 64 (2 heads, MLP 256), full mask, dropout off: where
  the sampled step's fixed per-linear cost shows;
- ``llama-<seq>``: a 2-layer Llama-style decoder (hidden 512, 8 heads, 4 KV heads, SwiGLU MLP 1376,
  RMSNorm, rotary), sequence classification on random ids;
- ``tiny-bert-<seq>``: a 2-layer, 32-wide BERT for smoke tests (seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BATCH", "Case", "build_case"]

BATCH = 32


@dataclass
class Case:
    name: str
    model: nn.Module
    block_type: str
    batch: dict[str, torch.Tensor]
    logits: Callable[[nn.Module, dict], torch.Tensor]
    seq: int | None
    num_labels: int = 2


def _text_batch(vocab: int, seq: int, generator: torch.Generator, low: int = 1000) -> dict[str, torch.Tensor]:
    ids = torch.randint(low, vocab, (BATCH, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _text_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _bert(layers: int, hidden: int, heads: int, mlp: int, dropout: float | None) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    extra = {} if dropout is None else dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=mlp, num_labels=2, **extra)
    return BertForSequenceClassification(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(config)


def _review_batch(tokenizer, seq: int) -> dict[str, torch.Tensor]:
    """The first ``BATCH`` rt-polarity reviews, tokenised and padded to ``seq``."""
    from vcas_bench.tasks.rt_polarity import load_frame

    texts = load_frame()["text"].head(BATCH).tolist()
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _seq(name: str) -> int:
    return int(name.removesuffix("-nodropout").rsplit("-", 1)[1])


def build_case(name: str, generator: torch.Generator) -> Case:
    """The case called ``name`` (module docstring); ``generator`` draws its ids or images."""
    from vcas_bench.models import create_model

    if name.startswith("minilm-text-"):
        bundle = create_model("minilm", num_labels=2)
        return Case(name, bundle.model, bundle.block_type, _review_batch(bundle.tokenizer, _seq(name)),
                    _text_logits, _seq(name))
    if name.startswith("minilm-"):
        bundle = create_model("minilm", num_labels=2)
        return Case(name, bundle.model, bundle.block_type, _text_batch(30522, _seq(name), generator),
                    _text_logits, _seq(name))
    if name.startswith("bert-base-width-"):
        model = _bert(2, 768, 12, 3072, 0.0 if name.endswith("-nodropout") else None)
        batch = _text_batch(30522, _seq(name), generator)
        return Case(name, model, "BertLayer", batch, _text_logits, _seq(name))
    if name.startswith("tiny-width-"):
        model = _bert(2, 64, 2, 256, 0.0)
        batch = _text_batch(30522, _seq(name), generator)
        return Case(name, model, "BertLayer", batch, _text_logits, _seq(name))
    if name.startswith("llama-"):
        batch = _text_batch(32000, _seq(name), generator)
        return Case(name, _llama(), "LlamaDecoderLayer", batch, _text_logits, _seq(name))
    if name.startswith("tiny-bert-"):
        model = _bert(2, 32, 2, 64, None)
        return Case(name, model, "BertLayer", _text_batch(30522, _seq(name), generator, low=0), _text_logits,
                    _seq(name))
    if name == "vit-tiny":
        bundle = create_model("vit-tiny", num_labels=10)
        images = torch.randn(BATCH, 3, 32, 32, generator=generator)
        return Case(name, bundle.model, bundle.block_type, {"pixel_values": images}, bundle.logits_fn, None,
                    num_labels=10)
    raise ValueError(f"unknown bench case {name!r}")
