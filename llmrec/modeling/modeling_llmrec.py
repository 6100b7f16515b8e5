"""The llmrec model: item text encoder, self-attentive user encoder and cross-attention reranking head.

The whole forward pass lives in this file. Item *indices* are 1-based (row 0 is padding); histories are
left-padded with 0 so the most recent item always sits in the last slot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..errors import ModelFolderError
from ..utils.quiet import quiet_library_progress
from ..utils.snapshots import download_snapshot, is_hub_repo_id
from .configuration_llmrec import LlmRecConfig
from .encoders import locate_encoder, portable_encoder_name

# A LoRA-tuned encoder is saved as a PEFT adapter in this subfolder, beside the rest of the model.
ENCODER_ADAPTER_FOLDER = "encoder_adapter"
_BACKBONE_PREFIX = "item_encoder.backbone."
# `from_pretrained` arguments that choose which snapshot of a Hub repo to read.
_SNAPSHOT_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")

IGNORE_INDEX = -100


def _raise_on_incomplete_load(
    folder: Path, missing: Sequence[str] = (), unexpected: Sequence[str] = (), mismatched: Sequence[str] = (), errors: Sequence[str] = ()
) -> None:
    """Strict loading: a module whose weights are not in the folder would silently start from random values."""
    problems = [
        f"{what} {sorted(names)[:8]}{' and more' if len(names) > 8 else ''}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched), ("errors", errors))
        if names
    ]
    if problems:
        raise ModelFolderError(
            f"The weights in {folder} do not match its config: tensors {'; '.join(problems)}. The weights file is "
            "incomplete or config.json was edited; save the model again with save_pretrained, or copy the folder again."
        )


def _check_sizes_before_building(folder: Path, config: LlmRecConfig) -> None:
    """Compare the sizes config.json asks for with the weights file's header, before any tensor is allocated.

    transformers builds the model from the config first, so an edited `num_items` of 10^10 would ask
    for terabytes before the shape mismatch is noticed.
    """
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as weights:  # reads the header only
            shapes = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except Exception as error:  # safetensors reports a corrupt header with its own error type
        raise ModelFolderError(f"{path} is corrupt ({type(error).__name__}: {str(error)[:200]}); copy or download it again.") from error
    layers = {name.split(".")[2] for name in shapes if name.startswith("user_encoder.blocks.")}
    found = {
        "num_items": shapes.get("warm_items", [None])[0],
        "max_history_length": shapes.get("user_encoder.position_embeddings.weight", [None])[0],
        "hidden_size": shapes.get("user_encoder.position_embeddings.weight", [None, None])[1],
        "user_num_layers": len(layers),
    }
    found["num_items"] = None if found["num_items"] is None else found["num_items"] - 1  # row 0 is padding
    wrong = [f"{name} is {getattr(config, name)} but the weights hold {value}" for name, value in found.items()
             if value is not None and value != getattr(config, name)]
    if wrong:
        raise ModelFolderError(
            f"{folder / 'config.json'} does not match {path}: {'; '.join(wrong)}. config.json was edited or belongs "
            "to another model; save the model again with save_pretrained, or copy the folder again."
        )


@dataclass
class LlmRecOutput(ModelOutput):
    """`loss` when targets/labels are given; `logits` are catalogue scores (retrieval) or candidate scores (rerank)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    user_embeddings: Optional[torch.Tensor] = None
    attentions: Optional[torch.Tensor] = None


def pad_histories(histories: Sequence[Sequence[int]], max_length: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Left-pad (and truncate to the most recent `max_length`) item-index histories into a (B, L) tensor."""
    length = max(1, min(max_length, max((len(history) for history in histories), default=1)))
    padded = torch.zeros(len(histories), length, dtype=torch.long)
    for row, history in enumerate(histories):
        recent = list(history)[-length:]
        if recent:
            padded[row, length - len(recent):] = torch.as_tensor(recent, dtype=torch.long)
    return padded if device is None else padded.to(device)


def split_histories(
    histories: Sequence[Sequence[int]], max_length: int, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The window (`pad_histories`) and, when some history is longer, the older items before it (B, M), 0-padded.

    The older part is None when every history fits the window, so the common case builds nothing extra.
    """
    window = pad_histories(histories, max_length, device)
    older = [list(history)[: max(0, len(history) - max_length)] for history in histories]
    longest = max((len(items) for items in older), default=0)
    if longest == 0:
        return window, None
    padded = torch.zeros(len(histories), longest, dtype=torch.long)
    for row, items in enumerate(older):
        if items:
            padded[row, : len(items)] = torch.as_tensor(items, dtype=torch.long)
    return window, padded if device is None else padded.to(device)


def _attention_mask_without_empty_rows(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A query whose keys are all masked makes softmax return NaN, and 0 x NaN leaks through later layers.

    Such rows are opened to every key and flagged, so the caller can zero their output.
    """
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    return allowed | empty_rows, empty_rows


def plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: Optional[torch.Tensor],
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T / sqrt(d)) V written out, returning the weights too (for `explain` and as the reference kernel)."""
    logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if is_causal:
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    weights = logits.softmax(dim=-1)
    return F.dropout(weights, dropout_p) @ value if dropout_p > 0 else weights @ value, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`, with weights on request.

    The mask is dropped when it masks nothing, and a purely causal mask becomes `is_causal=True`, so
    PyTorch may pick its fused (flash / memory-efficient) kernels; an explicit boolean mask rules flash out.
    `config._attn_implementation == "eager"` selects `plain_attention` instead (the reference the
    benchmarks compare against); `output_attentions=True` always uses it, since fused kernels return no weights.
    """

    def __init__(self, config: LlmRecConfig, num_heads: int, dropout: float) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        allowed: Optional[torch.Tensor],
        output_attentions: bool = False,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`allowed` is a boolean mask broadcastable to (B, heads, Q, K), True = may attend, or None (all)."""
        return self.attend(self.query(queries), self.key(keys), self.value(keys), allowed, output_attentions, is_causal)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: Optional[torch.Tensor],
        output_attentions: bool = False,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention over already projected (B, L, hidden) inputs, e.g. the reranker's cached item projections."""
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        empty_rows = None
        if allowed is not None:
            allowed, empty_rows = _attention_mask_without_empty_rows(allowed)
        if output_attentions or self.config._attn_implementation == "eager":
            dropout_p = self.dropout if self.training else 0.0
            attended, weights = plain_attention(query, key, value, allowed, is_causal, dropout_p)
            if empty_rows is not None:
                weights = weights.masked_fill(empty_rows, 0.0)
            weights = weights if output_attentions else None
        else:
            weights = None
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        if empty_rows is not None:
            attended = attended.masked_fill(empty_rows, 0.0)
        batch, _, length, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.output(attended), weights


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention block (as in SASRec), whose training is stable without warm-up."""

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.attention = MultiHeadAttention(config, config.user_num_heads, config.dropout)
        self.feed_forward_norm = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(4 * hidden_size, hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, states: torch.Tensor, allowed: Optional[torch.Tensor], is_causal: bool = False) -> torch.Tensor:
        normed = self.attention_norm(states)
        attended, _ = self.attention(normed, normed, allowed, is_causal=is_causal)
        states = states + self.dropout(attended)
        return states + self.dropout(self.feed_forward(self.feed_forward_norm(states)))

    def forward_at(self, states: torch.Tensor, read: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's output (B, 1, hidden) at slot `read` (B,) of each row only: queries from that slot,
        keys and values from all slots; `allowed` (B, 1, 1, L) is that slot's row of the mask (or None)."""
        rows = torch.arange(len(states), device=states.device)
        normed = self.attention_norm(states)
        attended, _ = self.attention(normed[rows, read].unsqueeze(1), normed, allowed)
        states = states[rows, read].unsqueeze(1) + self.dropout(attended)
        return states + self.dropout(self.feed_forward(self.feed_forward_norm(states)))


class UserEncoder(nn.Module):
    """Causal self-attention over the history: the state at slot t is the user after t items.

    Training reads every slot at once (each predicts the next item), so one pass over a whole history
    replaces the prefix expansion that makes RecBole's SASRec slow.

    Leading tokens may be put before the history; every slot may attend to them, so they condition the
    whole sequence. They have no position embedding (they are not events in time) and their output slots
    are dropped, so the states still line up with the history slots. Two kinds exist:

    - a projected free-text user profile (`use_user_profiles`); for a user with a profile and an empty
      history, the last slot is the profile token's state;
    - with `history_summary`, a summary of the history older than the window: the mean of those items'
      representations through a learned projection. Self-attention stays within the most recent
      `max_history_length` items plus one token, so a history of any length costs the window's quadratic
      attention plus one pass over the older items (linear), and the older items still count.
    """

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        self.max_history_length = config.max_history_length
        self.position_embeddings = nn.Embedding(config.max_history_length, config.hidden_size)
        self.input_norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.user_num_layers))
        self.output_norm = nn.LayerNorm(config.hidden_size)
        self.summary_projection = nn.Linear(config.hidden_size, config.hidden_size) if config.history_summary else None
        self.gradient_checkpointing = False

    def forward(
        self,
        history_embeddings: torch.Tensor,
        history_mask: torch.Tensor,
        leading_embeddings: Optional[torch.Tensor] = None,
        leading_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(B, L, hidden) states; `leading_embeddings` (B, P, hidden) with `leading_mask` (B, P) are leading tokens.

        `last_only=True` returns just the user now (B, 1, hidden), for serving: the last block then
        computes that one slot (its keys and values still cover every slot), not all L.
        """
        if last_only and len(self.blocks) == 0:  # no block to narrow: read the last slot of the full pass
            return self.forward(history_embeddings, history_mask, leading_embeddings, leading_mask)[:, -1:]
        length = history_embeddings.shape[1]
        # Positions count from the end of a full window, as if every history were padded to max length,
        # so the most recent item has the same position in training and serving.
        positions = torch.arange(length, device=history_embeddings.device) + (self.max_history_length - length)
        states = self.input_norm(history_embeddings + self.position_embeddings(positions))
        leading_only = None
        if leading_embeddings is not None:
            leading_only = leading_mask.any(dim=1) & ~history_mask.any(dim=1)
            states = torch.cat([self.input_norm(leading_embeddings), states], dim=1)
            history_mask = torch.cat([leading_mask, history_mask], dim=1)
        states = self.dropout(states)
        if bool(history_mask.all()):
            allowed, is_causal = None, True  # no padding: the fused kernels' own causal mask suffices
        else:
            total = states.shape[1]
            causal = torch.ones(total, total, dtype=torch.bool, device=states.device).tril()
            allowed, is_causal = (causal & history_mask[:, None, :])[:, None], False  # (B, 1, L, L)
        blocks = list(self.blocks)[:-1] if last_only else self.blocks
        for block in blocks:
            if self.gradient_checkpointing and self.training:
                states = self._gradient_checkpointing_func(block.__call__, states, allowed, is_causal)
            else:
                states = block(states, allowed, is_causal)
        # With no history, the last leading token is the user's last real token: read the user there, not
        # at a padding slot whose own (untrained) residual stream would swamp it.
        last_leading = None if leading_only is None else leading_mask.shape[1] - 1 - leading_mask.flip(1).int().argmax(dim=1)
        if last_only:
            return self.output_norm(self._last_block_at_read_slot(states, history_mask, leading_only, last_leading))
        states = self.output_norm(states)
        if leading_only is None:
            return states
        history_states = states[:, states.shape[1] - length :]
        leading_state = states[torch.arange(len(states), device=states.device), last_leading]
        last = torch.where(leading_only.unsqueeze(-1), leading_state, history_states[:, -1])
        return torch.cat([history_states[:, :-1], last.unsqueeze(1)], dim=1)

    def _last_block_at_read_slot(
        self, states: torch.Tensor, mask: torch.Tensor, leading_only: Optional[torch.Tensor], last_leading: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The last block at the slot the user is read from: the last slot, or the last leading token for a
        row with leading tokens but no history. That slot's causal row is every slot up to it, less padding."""
        total = states.shape[1]
        read = torch.full((len(states),), total - 1, dtype=torch.long, device=states.device)
        if leading_only is not None:
            read = torch.where(leading_only, last_leading, read)
        allowed = (torch.arange(total, device=states.device) <= read[:, None]) & mask
        return self.blocks[-1].forward_at(states, read, None if bool(allowed.all()) else allowed[:, None, None, :])


@dataclass
class RerankCache:
    """The reranking head's per-item projections, computed once per catalogue (`CrossAttentionReranker.project_items`).

    A candidate's query and a history item's key and value depend on the item alone, so serving gathers
    rows instead of running three projections per request; recency terms are per position and added after.
    """

    item_queries: torch.Tensor  # (num_items + 1, hidden), query bias included
    item_keys: torch.Tensor  # (num_items + 1, hidden), without bias
    item_values: torch.Tensor  # (num_items + 1, hidden), without bias
    recency_keys: torch.Tensor  # (max_history_length, hidden), key bias included
    recency_values: torch.Tensor  # (max_history_length, hidden), value bias included

    def extended(self, other: "RerankCache") -> "RerankCache":
        """This cache followed by `other`'s item rows (items added to the catalogue); recency terms are shared."""
        return RerankCache(
            torch.cat([self.item_queries, other.item_queries]),
            torch.cat([self.item_keys, other.item_keys]),
            torch.cat([self.item_values, other.item_values]),
            self.recency_keys,
            self.recency_values,
        )


class CrossAttentionReranker(nn.Module):
    """Each candidate attends over the user's history items (with recency), then a residual MLP scores it.

    The score is added to the retriever's own score with a learned weight, so the head learns a correction
    and starts no worse than retrieval; its attention weights say which history items drove a score.
    All candidates of all users in a batch are scored in one call; the cost is linear in the history length.
    """

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.recency_embeddings = nn.Embedding(config.max_history_length, hidden)
        self.attention = MultiHeadAttention(config, config.rerank_num_heads, dropout=0.0)
        self.attention_norm = nn.LayerNorm(hidden)
        self.feed_forward = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(2 * hidden, hidden))
        self.feed_forward_norm = nn.LayerNorm(hidden)
        self.scorer = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.retrieval_weight = nn.Parameter(torch.ones(()))

    def project_items(self, item_embeddings: torch.Tensor) -> RerankCache:
        """Per-item query/key/value projections of `item_embeddings` (rows = item indices), for serving."""
        attention = self.attention
        recency = self.recency_embeddings.weight
        return RerankCache(
            item_queries=attention.query(item_embeddings),
            item_keys=F.linear(item_embeddings, attention.key.weight),
            item_values=F.linear(item_embeddings, attention.value.weight),
            recency_keys=attention.key(recency),
            recency_values=attention.value(recency),
        )

    def forward(
        self,
        candidate_item_indices: torch.Tensor,
        history_item_indices: torch.Tensor,
        item_embeddings: torch.Tensor,
        user_embeddings: torch.Tensor,
        retrieval_scores: torch.Tensor,
        output_attentions: bool = False,
        cache: Optional[RerankCache] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores (B, C) of candidate item indices for left-padded histories (B, L); `cache` skips the projections."""
        length = history_item_indices.shape[1]
        recency = torch.arange(length - 1, -1, -1, device=history_item_indices.device).clamp(max=self.recency_embeddings.num_embeddings - 1)
        candidate_embeddings = item_embeddings[candidate_item_indices]
        if cache is None:
            keys = item_embeddings[history_item_indices] + self.recency_embeddings(recency)
            query, key, value = self.attention.query(candidate_embeddings), self.attention.key(keys), self.attention.value(keys)
        else:
            query = cache.item_queries[candidate_item_indices]
            key = cache.item_keys[history_item_indices] + cache.recency_keys[recency]
            value = cache.item_values[history_item_indices] + cache.recency_values[recency]
        history_mask = history_item_indices > 0
        # Every candidate sees the whole history; a history without padding needs no mask at all.
        allowed = None if bool(history_mask.all()) else history_mask[:, None, None, :]
        attended, weights = self.attention.attend(query, key, value, allowed, output_attentions)
        states = self.attention_norm(candidate_embeddings + attended)
        states = self.feed_forward_norm(states + self.feed_forward(states))
        features = torch.cat(
            [states, states * candidate_embeddings, candidate_embeddings * user_embeddings[:, None, :]], dim=-1
        )
        scores = self.scorer(features).squeeze(-1) + self.retrieval_weight * retrieval_scores
        return scores, weights


class ItemTextEncoder(nn.Module):
    """A Hugging Face encoder plus pooling: item text -> one vector."""

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        if not config.encoder_config:
            raise ValueError("LlmRecConfig.encoder_config is empty; build the model with LlmRecModel.from_encoder(...).")
        encoder_config = AutoConfig.for_model(**config.encoder_config)
        self.backbone = AutoModel.from_config(encoder_config, attn_implementation="sdpa")
        self.pooling = config.pooling

    @property
    def output_size(self) -> int:
        return self.backbone.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Pooled in fp32 even when the encoder runs in bf16: a sum over tokens is where bf16 loses digits.
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class LlmRecPreTrainedModel(PreTrainedModel):
    config_class = LlmRecConfig
    base_model_prefix = "llmrec"
    main_input_name = "history_item_indices"
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class LlmRecModel(LlmRecPreTrainedModel):
    """Two towers for retrieval (user encoder x item representations) plus the cross-attention reranker.

    Item representation (hybrid, the default): the projected text embedding plus a learned ID embedding
    for items seen in training (`warm_items`). The text path carries over to items the model never saw;
    the ID path adds what text cannot say (collaborative signal: which films the same people watch).
    An item without interactions (a held-out or later-added item) keeps the text path alone, and two
    things keep that from biasing it down:

    - ID dropout (`id_dropout`): in training each warm item loses its ID embedding with that probability,
      so the user tower is also fitted to text-only vectors and scores them on the same scale;
    - scores are cosine similarities, so a cold vector's smaller norm (text only, no ID term) does not
      lower its score; only its direction counts.

    - items unseen in training are left out of the training softmax (`exclude_unseen_items_from_loss`),
      as if they had been added after training; as negatives at every step they would teach the model
      that text like theirs is never chosen, which ranks every cold item down (bench/README.md: with
      them in the softmax, cold items filled 0 % of the top 10s on MovieLens-100k, 1.2 % without).

    A learned gate between the two paths was not used: the gate's input for a cold item would be a
    value it never saw in training (no ID), the very case it would have to be calibrated for.
    `use_id_embeddings=False` is the text-only model; `use_text_embeddings=False` is the ID-only model,
    in which items never seen in training keep their random initial vector (detached, so as negatives of
    the full softmax they are not pushed down either) and rank at random.

    With `use_user_profiles`, a free-text user profile, encoded by the same BERT and projected by
    `profile_projection`, is a leading token of the user sequence (see `UserEncoder`).
    """

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__(config)
        self.item_encoder = ItemTextEncoder(config)
        # Optional modules exist only when switched on, so the state dict of the default (hybrid, no profile)
        # model is the one saved before these options existed.
        self.text_projection = (
            nn.Linear(self.item_encoder.output_size, config.hidden_size) if config.use_text_embeddings else None
        )
        self.profile_projection = (
            nn.Linear(self.item_encoder.output_size, config.hidden_size) if config.use_user_profiles else None
        )
        self.item_id_embeddings = (
            nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0) if config.use_id_embeddings else None
        )
        # Cached pooled encoder outputs of the catalogue (row 0 = padding): with a frozen encoder the
        # catalogue is encoded once, not at every step.
        self.register_buffer("item_text_embeddings", torch.zeros(config.num_items + 1, self.item_encoder.output_size))
        self.register_buffer("warm_items", torch.zeros(config.num_items + 1, dtype=torch.bool))
        self.user_encoder = UserEncoder(config)
        self.reranker = CrossAttentionReranker(config)
        self.post_init()
        # An untrained head adds exactly zero, so reranking starts as the retrieval ranking.
        nn.init.zeros_(self.reranker.scorer[-1].weight)
        nn.init.zeros_(self.reranker.scorer[-1].bias)

    @classmethod
    @quiet_library_progress()
    def from_encoder(cls, encoder_name_or_path: str, **config_kwargs) -> "LlmRecModel":
        """A new model around pretrained encoder weights (a local path or hub id, loaded by HF)."""
        encoder = AutoModel.from_pretrained(
            locate_encoder(str(encoder_name_or_path)), attn_implementation="sdpa", trust_remote_code=False
        )
        config = LlmRecConfig(
            encoder_name_or_path=portable_encoder_name(str(encoder_name_or_path)),
            encoder_config=encoder.config.to_dict(),
            **config_kwargs,
        )
        model = cls(config)
        model.item_encoder.backbone.load_state_dict(encoder.state_dict())
        return model

    # ----- saving and loading ------------------------------------------------------------------------

    @property
    def has_encoder_adapter(self) -> bool:
        """True when the encoder is wrapped in PEFT (LoRA) adapters."""
        return hasattr(self.item_encoder.backbone, "peft_config")

    @quiet_library_progress()
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> None:
        """Like `PreTrainedModel.save_pretrained`; a LoRA-tuned encoder is saved as a PEFT adapter.

        The adapter records its base model by portable name, and `model.safetensors` then holds everything
        but the frozen base encoder, so the folder stays small and the adapter can be reused or merged.
        """
        self.config.encoder_weights = "adapter" if self.has_encoder_adapter else "full"
        if self.has_encoder_adapter:
            backbone = self.item_encoder.backbone
            for adapter_config in backbone.peft_config.values():
                adapter_config.base_model_name_or_path = self.config.encoder_name_or_path
            backbone.save_pretrained(Path(save_directory) / ENCODER_ADAPTER_FOLDER)
            if kwargs.get("state_dict") is None:
                kwargs["state_dict"] = {
                    name: tensor for name, tensor in self.state_dict().items() if not name.startswith(_BACKBONE_PREFIX)
                }
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    @quiet_library_progress()
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> "LlmRecModel":
        """Like `PreTrainedModel.from_pretrained`, but strict and without remote code.

        A Hub repo id is first resolved to its local snapshot (`snapshot_download`, honouring `revision`,
        `token`, `cache_dir` and `local_files_only`), so it loads exactly as a folder does. A folder holding
        an encoder adapter gets base model + adapter. Any tensor the weights lack, hold in excess or hold in
        another shape than `config.json` implies raises `ModelFolderError` naming it: transformers would
        start such modules from random values and only log a load report.
        """
        kwargs["trust_remote_code"] = False
        want_loading_info = kwargs.pop("output_loading_info", False)
        if is_hub_repo_id(pretrained_model_name_or_path):
            download_kwargs = {name: kwargs.pop(name) for name in _SNAPSHOT_KWARGS if name in kwargs}
            pretrained_model_name_or_path = download_snapshot(
                str(pretrained_model_name_or_path), walk=(ENCODER_ADAPTER_FOLDER,), **download_kwargs
            )
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and (folder / "config.json").is_file():
            config = LlmRecConfig.from_pretrained(folder, trust_remote_code=False)
            _check_sizes_before_building(folder, config)
            if config.encoder_weights == "adapter":
                model = cls._from_adapter_folder(folder, config, device=kwargs.get("device_map"))
                return (model, {}) if want_loading_info else model
        # Mismatched shapes are reported back rather than raised, so the error below can name the tensors.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        _raise_on_incomplete_load(
            folder,
            missing=loading_info.get("missing_keys", ()),
            unexpected=loading_info.get("unexpected_keys", ()),
            mismatched=[str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in loading_info.get("mismatched_keys", ())],
            errors=loading_info.get("error_msgs", ()),
        )
        return (model, loading_info) if want_loading_info else model

    @classmethod
    def _from_adapter_folder(cls, folder: Path, config: LlmRecConfig, device: Optional[str] = None) -> "LlmRecModel":
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict, load_peft_weights
        from safetensors.torch import load_file

        adapter_folder = folder / ENCODER_ADAPTER_FOLDER
        if not (adapter_folder / "adapter_config.json").is_file():
            raise ModelFolderError(
                f"{folder / 'config.json'} says the encoder is a PEFT adapter, but {adapter_folder}/adapter_config.json "
                "is missing; copy the whole model folder, or save it again with save_pretrained."
            )
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
        except RuntimeError as error:  # shapes that do not match config.json
            raise ModelFolderError(
                f"{folder / 'model.safetensors'} does not match {folder / 'config.json'} ({str(error)[:300]}); save the "
                "model again with save_pretrained."
            ) from error
        _raise_on_incomplete_load(folder, [name for name in missing if not name.startswith(_BACKBONE_PREFIX)], unexpected)
        base_model = config.encoder_name_or_path
        try:
            base = AutoModel.from_pretrained(locate_encoder(base_model), attn_implementation="sdpa", trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise ModelFolderError(
                f"The encoder adapter in {adapter_folder} needs its base model {base_model!r}, which could not be "
                f"loaded ({error}); install it or download it, then load again."
            ) from error
        try:
            backbone = PeftModel.from_pretrained(base, adapter_folder)
            stored = set(load_peft_weights(str(adapter_folder), device="cpu"))
        except Exception as error:  # peft reports unreadable or mismatched adapters with assorted types
            raise ModelFolderError(f"Could not load the encoder adapter in {adapter_folder} ({type(error).__name__}: {str(error)[:300]}).") from error
        expected = set(get_peft_model_state_dict(backbone))
        _raise_on_incomplete_load(adapter_folder, sorted(expected - stored), sorted(stored - expected))
        model.item_encoder.backbone = backbone
        return model.to(device or "cpu").eval()

    # ----- item side -------------------------------------------------------------------------------

    def encode_item_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.item_encoder(input_ids, attention_mask)

    def _encode_texts_by_length(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int = 128
    ) -> torch.Tensor:
        """`encode_item_texts` in chunks of similar length, each cut to its own longest text.

        A LoRA step re-encodes a few hundred to thousands of item texts; padded together to the longest,
        most of the encoder's work (forward and backward) would go into padding.
        """
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths)
        pooled = []
        for chunk in order.split(chunk_size):
            width = max(1, int(lengths[chunk].max()))
            pooled.append(self.encode_item_texts(input_ids[chunk, :width], attention_mask[chunk, :width]))
        return torch.cat(pooled)[torch.argsort(order)]

    @torch.no_grad()
    def add_items(self, text_embeddings: torch.Tensor) -> None:
        """Grow the catalogue by items known only by their text (cold items: no learned ID embedding).

        They get the item indices after the current last one; nothing already learned changes.
        """
        count = len(text_embeddings)
        device = self.item_text_embeddings.device
        self.item_text_embeddings = torch.cat(
            [self.item_text_embeddings, text_embeddings.to(device, self.item_text_embeddings.dtype)]
        )
        self.warm_items = torch.cat([self.warm_items, torch.zeros(count, dtype=torch.bool, device=device)])
        if self.item_id_embeddings is not None:
            old = self.item_id_embeddings.weight
            grown = nn.Embedding(old.shape[0] + count, old.shape[1], padding_idx=0, device=device, dtype=old.dtype)
            if self.text_projection is None:  # ID-only: a new item is a random vector, as untrained cold items are
                nn.init.normal_(grown.weight, std=0.02)
            else:
                grown.weight.zero_()
            grown.weight[: old.shape[0]] = old
            grown.weight.requires_grad_(old.requires_grad)
            self.item_id_embeddings = grown
        self.config.num_items += count

    def enable_user_profiles(self) -> None:
        """Add the profile path to a model built without it (e.g. one already trained).

        The projection starts as a copy of the trained item `text_projection`, so a profile begins as a
        pseudo-item with the same text (BERT embeddings of texts are close together, and a random start
        learns slowly to tell them apart); fit it with `llmrec.training.profiles.fit_user_profiles`.
        Users without a profile are unaffected either way.
        """
        if self.profile_projection is not None:
            return
        projection = nn.Linear(self.item_encoder.output_size, self.config.hidden_size, device=self.item_text_embeddings.device)
        if self.text_projection is not None:
            projection.load_state_dict(self.text_projection.state_dict())
        else:
            self._init_weights(projection)
        self.profile_projection = projection
        self.config.use_user_profiles = True

    def item_embeddings(
        self, text_embeddings: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Representations of the whole catalogue, (num_items + 1, hidden), or of the item indices `rows` only.

        Item 0 (padding) stays zero. `rows` lets training and `add_items` project just the items they use.
        `text_embeddings` replaces the cached text embeddings of those items (the whole table when `rows`
        is None), e.g. fresh LoRA-encoder outputs that carry gradient.
        """
        every_item = rows is None
        if every_item:
            rows = torch.arange(self.config.num_items + 1, device=self.warm_items.device)
        warm = self.warm_items[rows].unsqueeze(-1)
        if self.text_projection is None:
            # ID-only: no gradient reaches an item unseen in training, so it keeps its random initial vector.
            id_rows = self.item_id_embeddings.weight if every_item else self.item_id_embeddings(rows)
            representations = torch.where(warm, id_rows, id_rows.detach())
        else:
            if text_embeddings is None:
                text_embeddings = self.item_text_embeddings if every_item else self.item_text_embeddings[rows]
            elif len(text_embeddings) != len(rows):
                raise ValueError(f"text_embeddings has {len(text_embeddings)} rows for {len(rows)} items.")
            representations = self.text_projection(text_embeddings.to(self.text_projection.weight.dtype))
        if self.item_id_embeddings is not None and self.text_projection is not None:
            keep = warm.to(representations.dtype)
            if self.training and self.config.id_dropout > 0:
                keep = keep * (torch.rand_like(keep) >= self.config.id_dropout).to(keep.dtype)
            id_rows = self.item_id_embeddings.weight if every_item else self.item_id_embeddings(rows)
            ratio = self.config.id_residual_max_ratio
            if ratio > 0:
                # A residual bounded by the text part keeps a warm vector's direction near its text's, the
                # only direction a new item has, so both are scored on one scale (bench/coldstart.py).
                bound = ratio * representations.norm(dim=-1, keepdim=True)
                id_rows = id_rows * torch.clamp(bound / id_rows.norm(dim=-1, keepdim=True).clamp_min(1e-12), max=1.0)
            representations = representations + id_rows * keep
        return representations.masked_fill((rows == 0).unsqueeze(-1), 0.0)

    # ----- user side ---------------------------------------------------------------------------------

    def encode_users(
        self,
        history_item_indices: torch.Tensor,
        item_embeddings: torch.Tensor,
        profile_text_embeddings: Optional[torch.Tensor] = None,
        has_profile: Optional[torch.Tensor] = None,
        older_item_indices: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Per-slot user states (B, L, hidden); the last slot is the user now (`last_only`: only that slot, (B, 1, hidden)).

        `profile_text_embeddings` (B, encoder hidden) are pooled BERT embeddings of user profiles (see
        `text_encoding.embed_item_texts`); `has_profile` (B,) marks the rows that have one (default: all).
        `older_item_indices` (B, M) holds the history before the window (see `split_histories`); a model
        with `history_summary` reads it as one summary token, others ignore it (the window alone counts).
        """
        history_mask = history_item_indices > 0
        leading, leading_masks = [], []
        if profile_text_embeddings is not None:
            if self.profile_projection is None:
                raise ValueError("This model has no user-profile path; build it with use_user_profiles=True.")
            leading.append(self.profile_projection(profile_text_embeddings.to(self.profile_projection.weight.dtype)))
            leading_masks.append(
                torch.ones(len(history_mask), dtype=torch.bool, device=history_mask.device) if has_profile is None else has_profile
            )
        summary_projection = self.user_encoder.summary_projection
        if summary_projection is not None and older_item_indices is not None and older_item_indices.shape[1] > 0:
            # One pass over the older items (linear in their number): their mean representation.
            older_mean = F.embedding_bag(older_item_indices, item_embeddings, mode="mean", padding_idx=0)
            leading.append(summary_projection(older_mean))
            leading_masks.append((older_item_indices > 0).any(dim=1))
        if not leading:
            return self.user_encoder(item_embeddings[history_item_indices], history_mask, last_only=last_only)
        return self.user_encoder(
            item_embeddings[history_item_indices], history_mask, torch.stack(leading, dim=1), torch.stack(leading_masks, dim=1),
            last_only=last_only,
        )

    def similarity(self, user_embeddings: torch.Tensor, item_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine / temperature: the same ranking FAISS gives with inner product on normalised vectors."""
        return F.normalize(user_embeddings, dim=-1) @ F.normalize(item_embeddings, dim=-1).T / self.config.similarity_temperature

    def score_candidates(
        self,
        history_item_indices: torch.Tensor,
        candidate_item_indices: torch.Tensor,
        item_embeddings: torch.Tensor,
        user_embeddings: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        rerank_cache: Optional[RerankCache] = None,
        older_item_indices: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reranker scores of (B, C) candidates in one batched call; padding candidates (index 0) get -inf.

        `rerank_cache` (from `self.reranker.project_items(item_embeddings)`) holds the head's per-item
        projections, so a request only gathers them; `older_item_indices` is the history before the window.
        """
        if user_embeddings is None:
            user_embeddings = self.encode_users(history_item_indices, item_embeddings, older_item_indices=older_item_indices)[:, -1]
        candidate_embeddings = item_embeddings[candidate_item_indices]
        retrieval_scores = (
            F.normalize(user_embeddings, dim=-1).unsqueeze(1) * F.normalize(candidate_embeddings, dim=-1)
        ).sum(-1) / self.config.similarity_temperature
        scores, attentions = self.reranker(
            candidate_item_indices,
            history_item_indices,
            item_embeddings,
            user_embeddings,
            retrieval_scores,
            output_attentions=output_attentions,
            cache=rerank_cache,
        )
        return scores.masked_fill(candidate_item_indices == 0, float("-inf")), attentions

    def _touched_item_table(
        self, index_tensors: list[Optional[torch.Tensor]], text_inputs: Optional[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations of just the items a batch touches, and those items' indices (sorted, unique).

        Sampled softmax and reranking read a few hundred items; projecting (and, with LoRA, re-encoding)
        only those keeps a training step's cost independent of the catalogue size. Row 0 stays padding.
        An item's row is found by `_table_rows` (a binary search), not a catalogue-sized lookup table.
        """
        device = self.warm_items.device
        touched = [torch.zeros(1, dtype=torch.long, device=device)]
        touched += [indices.flatten() for indices in index_tensors if indices is not None]
        rows = torch.unique(torch.cat(touched))
        rows = rows[rows >= 0]  # IGNORE_INDEX targets
        text_embeddings = None
        if text_inputs is not None:  # LoRA: the batch's texts re-encoded with gradient, the rest from the cache
            fresh = self._encode_texts_by_length(text_inputs["input_ids"], text_inputs["attention_mask"])
            text_embeddings = self.item_text_embeddings[rows].to(fresh.dtype)
            text_embeddings = text_embeddings.index_copy(0, _table_rows(rows, text_inputs["item_indices"]), fresh)
        return self.item_embeddings(text_embeddings, rows=rows), rows

    def forward(
        self,
        history_item_indices: torch.Tensor,
        target_item_indices: Optional[torch.Tensor] = None,
        sampled_item_indices: Optional[torch.Tensor] = None,
        sampled_log_q: Optional[torch.Tensor] = None,
        candidate_item_indices: Optional[torch.Tensor] = None,
        candidate_labels: Optional[torch.Tensor] = None,
        text_inputs: Optional[dict[str, torch.Tensor]] = None,
        output_attentions: bool = False,
        profile_text_embeddings: Optional[torch.Tensor] = None,
        has_profile: Optional[torch.Tensor] = None,
        older_item_indices: Optional[torch.Tensor] = None,
    ) -> LlmRecOutput:
        """Retrieval mode (no candidates) or rerank mode (`candidate_item_indices` given).

        Retrieval: `target_item_indices` (B, L) holds the next item after every slot (IGNORE_INDEX where
        none); the loss is softmax cross-entropy over the whole catalogue, or, when `sampled_item_indices`
        is given, over those items with the logQ correction `sampled_log_q` (sampled softmax); `logits` are
        then None, since scoring the whole catalogue is what sampling avoids. Rerank: the loss is listwise
        cross-entropy over each user's candidates, `candidate_labels` giving the positive's column.
        `profile_text_embeddings` / `has_profile` add user profiles and `older_item_indices` the history
        before the window (see `encode_users`).
        """
        if sampled_item_indices is None and candidate_item_indices is None:
            # Full softmax: every item is a negative, so the whole catalogue is projected.
            item_embeddings = self.item_embeddings(self._fresh_catalogue_text(text_inputs))
            user_states = self.encode_users(
                history_item_indices, item_embeddings, profile_text_embeddings, has_profile, older_item_indices
            )
            user_embeddings = user_states[:, -1]
            loss = None
            if target_item_indices is not None:
                loss = self._retrieval_loss(user_states, item_embeddings, target_item_indices)
            return LlmRecOutput(loss=loss, logits=self.similarity(user_embeddings, item_embeddings), user_embeddings=user_embeddings)

        # Sampled softmax or reranking: only the items this batch touches, indexed by their table row.
        item_table, touched_items = self._touched_item_table(
            [history_item_indices, target_item_indices, sampled_item_indices, candidate_item_indices, older_item_indices],
            text_inputs,
        )
        history_rows = _table_rows(touched_items, history_item_indices)
        older_rows = _table_rows(touched_items, older_item_indices) if older_item_indices is not None else None
        user_states = self.encode_users(history_rows, item_table, profile_text_embeddings, has_profile, older_rows)
        user_embeddings = user_states[:, -1]

        if candidate_item_indices is None:
            loss = None
            if target_item_indices is not None:
                sampled_embeddings = item_table[_table_rows(touched_items, sampled_item_indices)]
                loss = self._retrieval_loss(
                    user_states, sampled_embeddings, target_item_indices, sampled_item_indices, sampled_log_q
                )
            return LlmRecOutput(loss=loss, logits=None, user_embeddings=user_embeddings)

        scores, attentions = self.score_candidates(
            history_rows, _table_rows(touched_items, candidate_item_indices), item_table, user_embeddings, output_attentions
        )
        loss = None
        if candidate_labels is not None:
            loss = F.cross_entropy(scores, candidate_labels, ignore_index=IGNORE_INDEX)
        return LlmRecOutput(loss=loss, logits=scores, user_embeddings=user_embeddings, attentions=attentions)

    def _fresh_catalogue_text(self, text_inputs: Optional[dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """The cached catalogue text embeddings with the rows in `text_inputs` re-encoded (with gradient), for LoRA."""
        if text_inputs is None:
            return None
        fresh = self._encode_texts_by_length(text_inputs["input_ids"], text_inputs["attention_mask"])
        return self.item_text_embeddings.to(fresh.dtype).index_copy(0, text_inputs["item_indices"], fresh)

    def _retrieval_loss(
        self,
        user_states: torch.Tensor,
        item_embeddings: torch.Tensor,
        target_item_indices: torch.Tensor,
        sampled_item_indices: Optional[torch.Tensor] = None,
        sampled_log_q: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Next-item cross-entropy: over the whole catalogue (`item_embeddings` of every item), or sampled.

        For the sampled softmax `item_embeddings` holds the rows of `sampled_item_indices` (sorted, unique
        and holding every target), and `sampled_log_q` their logQ correction.
        """
        has_target = target_item_indices != IGNORE_INDEX
        states = user_states[has_target]
        targets = target_item_indices[has_target]
        if sampled_item_indices is not None:
            logits = self.similarity(states, item_embeddings) - sampled_log_q
            logits = logits.masked_fill(self._excluded_from_loss(targets, sampled_item_indices), float("-inf"))
            target_columns = torch.searchsorted(sampled_item_indices, targets)
            return F.cross_entropy(logits, target_columns)
        logits = self.similarity(states, item_embeddings).masked_fill(self._excluded_from_loss(targets), float("-inf"))
        return F.cross_entropy(logits, targets)

    def _excluded_from_loss(self, targets: torch.Tensor, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Which softmax columns (item indices `columns`, default the whole catalogue) are left out of the loss.

        Items unseen in training are left out, as if added after training: as negatives at every step, the
        model would learn from their text that such items are never chosen, and rank every cold item down
        (see the class docstring). Padding is never a valid next item either; a target always counts.
        Only the `columns` are read, so a sampled step touches no catalogue-sized table.
        """
        warm = self.warm_items if columns is None else self.warm_items[columns]
        # "Is any item warm?" without scanning the catalogue when a target (nearly always warm) answers it.
        any_warm = bool(self.warm_items[targets].any()) or bool(self.warm_items.any())
        excluded = ~warm if self.config.exclude_unseen_items_from_loss and any_warm else torch.zeros_like(warm)
        if columns is None:
            excluded[0] = True
            excluded[targets] = False
            return excluded
        return (excluded | (columns == 0)) & ~torch.isin(columns, targets)


def _table_rows(touched_items: torch.Tensor, item_indices: torch.Tensor) -> torch.Tensor:
    """Rows of `item_indices` in a table of the sorted, unique `touched_items` (each of them is in it)."""
    return torch.searchsorted(touched_items, item_indices)
