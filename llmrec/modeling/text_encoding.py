"""Tokenising and encoding item texts in batches (the catalogue cache of a frozen encoder)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .modeling_llmrec import LlmRecModel

logger = logging.getLogger(__name__)


def tokenize_item_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids of every item text, padded to one length; row 0 is an empty padding item."""
    encoded = tokenizer(
        [""] + list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.inference_mode()
def encode_catalogue(
    model: LlmRecModel,
    tokenized_items: dict[str, torch.Tensor],
    batch_size: int = 256,
    show_progress: bool = True,
) -> torch.Tensor:
    """Encode every item text once and store the result in `model.item_text_embeddings`.

    Batches are sorted by length so padding costs little; row 0 (padding) stays zero.
    """
    was_training = model.training
    model.eval()
    input_ids, attention_mask = tokenized_items["input_ids"], tokenized_items["attention_mask"]
    device = model.item_text_embeddings.device
    lengths = attention_mask[1:].sum(dim=1)
    order = torch.argsort(lengths, descending=True) + 1
    embeddings = torch.zeros_like(model.item_text_embeddings)
    for start in tqdm(range(0, len(order), batch_size), desc="encode items", disable=None if show_progress else True, leave=False):
        rows = order[start : start + batch_size]
        width = int(attention_mask[rows].sum(dim=1).max())
        embeddings[rows.to(device)] = model.encode_item_texts(
            input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device)
        ).to(embeddings.dtype)
    model.item_text_embeddings.copy_(embeddings)
    model.train(was_training)
    logger.info("Encoded %d item texts.", len(order))
    return embeddings
