"""Tokenising and encoding item texts in batches (the catalogue cache of a frozen encoder)."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .modeling_llmrec import LlmRecModel
from .precision import autocast

logger = logging.getLogger(__name__)


def tokenize_item_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids of every item text, padded to one length; row 0 is an empty padding item."""
    encoded = tokenizer(
        [""] + list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.inference_mode()
def embed_tokenized_items(
    model: LlmRecModel,
    tokenized_items: dict[str, torch.Tensor],
    batch_size: int = 256,
    show_progress: bool = True,
    precision: str = "fp32",
    item_encoder: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Pooled encoder outputs of tokenised items (row 0, the padding item, stays zero).

    Batches are sorted by length so padding costs little. `precision="bf16"` runs the encoder under bf16
    autocast (see `precision.autocast`); the embeddings are stored in the cache's dtype either way.
    `item_encoder` replaces the model's own encoder, e.g. an `OnnxItemEncoder` exported from it.
    """
    encode = item_encoder if item_encoder is not None else model.encode_item_texts
    was_training = model.training
    model.eval()
    input_ids, attention_mask = tokenized_items["input_ids"], tokenized_items["attention_mask"]
    device = model.item_text_embeddings.device
    lengths = attention_mask[1:].sum(dim=1)
    order = torch.argsort(lengths, descending=True) + 1
    embeddings = torch.zeros(len(input_ids), model.item_encoder.output_size, dtype=model.item_text_embeddings.dtype, device=device)
    for start in tqdm(range(0, len(order), batch_size), desc="encode items", disable=None if show_progress else True, leave=False):
        rows = order[start : start + batch_size]
        width = int(attention_mask[rows].sum(dim=1).max())
        with autocast(device, precision):
            pooled = encode(input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device))
        embeddings[rows.to(device)] = pooled.to(embeddings.dtype)
    model.train(was_training)
    return embeddings


def encode_catalogue(
    model: LlmRecModel,
    tokenized_items: dict[str, torch.Tensor],
    batch_size: int = 256,
    show_progress: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Encode every item text once and store the result in `model.item_text_embeddings` (the catalogue cache)."""
    embeddings = embed_tokenized_items(model, tokenized_items, batch_size, show_progress, precision)
    model.item_text_embeddings.copy_(embeddings)
    logger.info("Encoded %d item texts.", len(embeddings) - 1)
    return embeddings


def embed_item_texts(
    model: LlmRecModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 256,
    precision: str = "fp32",
    item_encoder: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Pooled encoder outputs (len(texts), encoder hidden size) of new item texts, e.g. items added after training."""
    tokenized = tokenize_item_texts(tokenizer, texts, model.config.max_text_length)
    return embed_tokenized_items(
        model, tokenized, batch_size, show_progress=len(texts) > batch_size, precision=precision, item_encoder=item_encoder
    )[1:]
