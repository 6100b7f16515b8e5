"""Tokenising and encoding item texts in batches (the catalogue cache of a frozen encoder)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import ModelFolderError
from ..utils.distributed import gather_rows, is_distributed, shard_batches
from .modeling_llmrec import LlmRecModel
from .precision import autocast

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Share of the encoder's embedding rows the tokenizer must give a token. Some encoders pad their vocabulary
# to a round size (under 1 % of unused rows); a tokenizer that fell back to its special tokens covers almost none.
MIN_VOCABULARY_COVERAGE = 0.9
# Texts per tokenizer call when tokenising to disk: bounds the tokenizer's per-text objects alive at once.
TOKENIZE_CHUNK_SIZE = 50_000
TOKENIZED_LAYOUT_FILE = "layout.json"


def load_tokenizer(folder: str | Path, encoder_vocab_size: Optional[int]) -> PreTrainedTokenizerBase:
    """The folder's own tokenizer, exactly, or `ModelFolderError`.

    Without `tokenizer.json`, transformers quietly builds a tokenizer of five special tokens, which maps
    every word to [UNK]; so the file must exist and parse, the loaded tokenizer must be the one it
    describes, and its ids must fit the encoder's embedding table (`encoder_vocab_size` rows).
    """
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing; without it every word would read as [UNK]. Copy or download the folder again.")
    try:
        file_size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        vocabulary = tokenizer.get_vocab()
    except Exception as error:  # tokenizers and transformers report broken files with assorted types
        raise ModelFolderError(
            f"Could not load the tokenizer {path} ({type(error).__name__}: {str(error)[:200]}); tokenizer.json / "
            "tokenizer_config.json are corrupt. Copy or download the folder again."
        ) from error
    problem = None
    if len(tokenizer) != file_size:
        problem = f"the loaded tokenizer has {len(tokenizer)} tokens but {path.name} describes {file_size}"
    elif encoder_vocab_size is not None and vocabulary and max(vocabulary.values()) >= encoder_vocab_size:
        problem = f"it has token ids up to {max(vocabulary.values())} but the encoder has {encoder_vocab_size} embeddings"
    elif encoder_vocab_size is not None and len(tokenizer) < MIN_VOCABULARY_COVERAGE * encoder_vocab_size:
        problem = f"it has {len(tokenizer)} tokens for an encoder of {encoder_vocab_size}"
    if problem:
        raise ModelFolderError(
            f"The tokenizer in {path} is not the encoder's: {problem}. Copy or download the folder again."
        )
    return tokenizer


def tokenize_item_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids of every item text, padded to one length; row 0 is an empty padding item."""
    encoded = tokenizer(
        [""] + list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def tokenize_item_texts_to_disk(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, folder: str | Path,
    chunk_size: int = TOKENIZE_CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """`tokenize_item_texts`'s tensors, written to `folder` chunk by chunk and returned memory-mapped.

    Tokenising a million texts in one call holds a million Python-side encodings at once (gigabytes);
    here only `chunk_size` are alive, the token ids go straight to `input_ids.npy` / `attention_mask.npy`,
    and encoding (`embed_tokenized_items`) then reads the rows of each batch from disk. The values equal
    `tokenize_item_texts`'s (padded to the longest text); `load_tokenized_items` opens the folder again.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (len(texts) + 1, max_length)
    input_ids = np.lib.format.open_memmap(folder / "input_ids.npy", mode="w+", dtype=np.int64, shape=shape)
    attention_mask = np.lib.format.open_memmap(folder / "attention_mask.npy", mode="w+", dtype=np.int64, shape=shape)
    longest = 1
    for start in range(0, shape[0], chunk_size):
        chunk = [""] + list(texts[: chunk_size - 1]) if start == 0 else list(texts[start - 1 : start - 1 + chunk_size])
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        input_ids[start : start + len(chunk)] = encoded["input_ids"]
        attention_mask[start : start + len(chunk)] = encoded["attention_mask"]
        longest = max(longest, int(encoded["attention_mask"].sum(axis=1).max()))
    input_ids.flush()
    attention_mask.flush()
    del input_ids, attention_mask
    layout = {"width": longest, "padding_side": tokenizer.padding_side, "num_items": len(texts)}
    (folder / TOKENIZED_LAYOUT_FILE).write_text(json.dumps(layout), encoding="utf-8")
    return load_tokenized_items(folder)


def load_tokenized_items(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors `tokenize_item_texts_to_disk` wrote, memory-mapped (pages are read when a batch needs them)."""
    folder = Path(folder)
    try:
        layout = json.loads((folder / TOKENIZED_LAYOUT_FILE).read_text(encoding="utf-8"))
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") for name in ("input_ids", "attention_mask")}
    except (OSError, ValueError) as error:
        raise ModelFolderError(
            f"{folder} holds no complete tokenised catalogue ({error}); write it with tokenize_item_texts_to_disk."
        ) from error
    width, max_length = int(layout["width"]), arrays["input_ids"].shape[1]
    # Padded to max_length on disk; the view keeps the longest text's width, on the side the tokens are.
    columns = slice(max_length - width, None) if layout["padding_side"] == "left" else slice(0, width)
    return {name: torch.from_numpy(array[:, columns]) for name, array in arrays.items()}


@torch.inference_mode()
def embed_tokenized_items(
    model: LlmRecModel,
    tokenized_items: dict[str, torch.Tensor],
    batch_size: int = 256,
    show_progress: bool = True,
    precision: str = "fp32",
    item_encoder: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    accelerator: Optional[object] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled encoder outputs of tokenised items (row 0, the padding item, stays zero).

    Batches are sorted by length so padding costs little. `precision="bf16"` runs the encoder under bf16
    autocast (see `precision.autocast`); the embeddings are stored in the cache's dtype either way.
    `item_encoder` replaces the model's own encoder, e.g. an `OnnxItemEncoder` exported from it.
    With a multi-process `accelerator` each process encodes its share of the batches and every process
    gets the whole table, equal to the one-process table (`utils.distributed`). `out` is a table to write
    into instead of a new one (the model's cache: at 1M items a second table would be another 1.5 GB).
    Only one batch's activations are alive at a time, and `tokenized_items` may be memory-mapped
    (`tokenize_item_texts_to_disk`): each batch reads its own rows.
    """
    encode = item_encoder if item_encoder is not None else model.encode_item_texts
    was_training = model.training
    model.eval()
    input_ids, attention_mask = tokenized_items["input_ids"], tokenized_items["attention_mask"]
    device = model.item_text_embeddings.device
    lengths = attention_mask[1:].sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True) + 1
    batches = shard_batches(accelerator, [order[start : start + batch_size] for start in range(0, len(order), batch_size)])
    dtype, width_out = model.item_text_embeddings.dtype, model.item_encoder.output_size
    if out is None:
        embeddings = torch.zeros(len(input_ids), width_out, dtype=dtype, device=device)
    else:
        if tuple(out.shape) != (len(input_ids), width_out):
            raise ValueError(f"out has shape {tuple(out.shape)}; it must be ({len(input_ids)}, {width_out}), one row per tokenised item.")
        embeddings = out
        embeddings[0] = 0
    distributed = is_distributed(accelerator)
    # Across processes only this shard is held until the gather, not a full table per process.
    shard_rows = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
    shard = torch.zeros(len(shard_rows), width_out, dtype=dtype, device=device) if distributed else embeddings
    written = 0
    for rows in tqdm(batches, desc="encode items", disable=None if show_progress else True, leave=False):
        width = int(attention_mask[rows].sum(dim=1).max())
        with autocast(device, precision):
            pooled = encode(input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device))
        if distributed:
            shard[written : written + len(rows)] = pooled.to(dtype)
            written += len(rows)
        else:
            embeddings[rows.to(device)] = pooled.to(dtype)
    if distributed:
        gather_rows(accelerator, shard_rows, shard, embeddings)
    model.train(was_training)
    return embeddings


def encode_catalogue(
    model: LlmRecModel, tokenized_items: dict[str, torch.Tensor], batch_size: int = 256, show_progress: bool = True,
    precision: str = "fp32", accelerator: Optional[object] = None,
) -> torch.Tensor:
    """Encode every item text once and store the result in `model.item_text_embeddings` (the catalogue cache).

    Pass the run's `accelerator` to split the work across its processes (each ends with the same cache).
    """
    embeddings = embed_tokenized_items(
        model, tokenized_items, batch_size, show_progress, precision, accelerator=accelerator, out=model.item_text_embeddings
    )
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
