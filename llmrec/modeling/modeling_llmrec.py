"""The llmrec model: item text encoder, self-attentive user encoder and cross-attention reranking head.

`LlmRecModel` puts the parts together, and its `forward` runs the three training modes (full softmax,
sampled softmax, reranking). The parts live beside it: `item_encoder`, `user_encoder` (over `attention`),
`reranker`, `histories` (padding and splitting them), `losses`, `catalogue` (adding items to a trained
model) and `pretrained` (saving and loading). Item *indices* are 1-based (row 0 is padding); histories are
left-padded with 0 so the most recent item always sits in the last slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .attention import MultiHeadAttention, plain_attention
from .catalogue import CatalogueEditingMixin
from .configuration_llmrec import LlmRecConfig
from .histories import IGNORE_INDEX, pad_histories, split_histories
from .item_encoder import ItemTextEncoder
from .losses import RetrievalLossMixin
from .pretrained import ENCODER_ADAPTER_FOLDER, LlmRecPreTrainedModel
from .reranker import CrossAttentionReranker, RerankCache, text_similarity_features
from .user_encoder import TransformerBlock, UserEncoder

# Names defined in the modules above, still importable from here (their home before the split).
__all__ = [
    "ENCODER_ADAPTER_FOLDER", "IGNORE_INDEX", "CrossAttentionReranker", "ItemTextEncoder", "LlmRecModel", "LlmRecOutput",
    "LlmRecPreTrainedModel", "MultiHeadAttention", "RerankCache", "TransformerBlock", "UserEncoder", "pad_histories",
    "plain_attention", "split_histories",
]


@dataclass
class LlmRecOutput(ModelOutput):
    """`loss` when targets/labels are given; `logits` are catalogue scores (retrieval) or candidate scores (rerank)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    user_embeddings: Optional[torch.Tensor] = None
    attentions: Optional[torch.Tensor] = None


class _TouchedBatch(NamedTuple):
    """A sampled-softmax or rerank batch after its user states are encoded from the items it touches."""

    item_table: torch.Tensor  # representations of the touched items only
    touched_items: torch.Tensor  # their item indices, sorted and unique (row r of the table is item touched_items[r])
    history_rows: torch.Tensor  # the histories as rows of item_table
    user_states: torch.Tensor  # per-slot user states (B, L, hidden)


class LlmRecModel(CatalogueEditingMixin, RetrievalLossMixin, LlmRecPreTrainedModel):
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
        if config.rerank_popularity:  # the head's per-item popularity (`set_item_popularity`)
            self.register_buffer("item_popularity_feature", torch.zeros(config.num_items + 1))
        self.user_encoder = UserEncoder(config)
        self.reranker = CrossAttentionReranker(config)
        self.post_init()
        # An untrained head adds exactly zero, so reranking starts as the retrieval ranking.
        nn.init.zeros_(self.reranker.scorer[-1].weight)
        nn.init.zeros_(self.reranker.scorer[-1].bias)

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
        row_items: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reranker scores of (B, C) candidates in one batched call; padding candidates (index 0) get -inf.

        `rerank_cache` (from `self.reranker.project_items(item_embeddings)`) holds the head's per-item
        projections, so a request only gathers them; `older_item_indices` is the history before the window.
        `row_items` gives the item index of each row of `item_embeddings` the indices point at, when those rows
        are a batch's own table (training) rather than the catalogue's (serving: row r is item r); the head's
        per-item features (`rerank_text_similarity`, `rerank_popularity`) are looked up through it.
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
            text_similarity=self._text_similarity(candidate_item_indices, history_item_indices, row_items),
            popularity=self._popularity(candidate_item_indices, row_items),
        )
        return scores.masked_fill(candidate_item_indices == 0, float("-inf")), attentions

    def _text_similarity(
        self, candidate_item_indices: torch.Tensor, history_item_indices: torch.Tensor, row_items: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """The head's text-similarity features (`rerank_text_similarity`), or None when it does not read them."""
        if not self.config.rerank_text_similarity:
            return None
        table = self.item_text_embeddings if row_items is None else self.item_text_embeddings[row_items]
        return text_similarity_features(table[candidate_item_indices], table[history_item_indices], history_item_indices > 0)

    def _popularity(self, candidate_item_indices: torch.Tensor, row_items: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The candidates' popularity feature (`rerank_popularity`), or None when the head does not read it."""
        if not self.config.rerank_popularity:
            return None
        table = self.item_popularity_feature if row_items is None else self.item_popularity_feature[row_items]
        return table[candidate_item_indices]

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
            return self._full_softmax_forward(
                history_item_indices, target_item_indices, text_inputs, profile_text_embeddings, has_profile, older_item_indices
            )
        batch = self._encode_touched_batch(
            history_item_indices, [target_item_indices, sampled_item_indices, candidate_item_indices], text_inputs,
            profile_text_embeddings, has_profile, older_item_indices,
        )
        if candidate_item_indices is None:
            return self._sampled_softmax_forward(batch, target_item_indices, sampled_item_indices, sampled_log_q)
        return self._rerank_forward(batch, candidate_item_indices, candidate_labels, output_attentions)

    def _full_softmax_forward(
        self, history_item_indices: torch.Tensor, target_item_indices: Optional[torch.Tensor],
        text_inputs: Optional[dict[str, torch.Tensor]], profile_text_embeddings: Optional[torch.Tensor],
        has_profile: Optional[torch.Tensor], older_item_indices: Optional[torch.Tensor],
    ) -> LlmRecOutput:
        """Full softmax: every item is a negative, so the whole catalogue is projected (and scored: `logits`)."""
        item_embeddings = self.item_embeddings(self._fresh_catalogue_text(text_inputs))
        user_states = self.encode_users(
            history_item_indices, item_embeddings, profile_text_embeddings, has_profile, older_item_indices
        )
        user_embeddings = user_states[:, -1]
        loss = None
        if target_item_indices is not None:
            loss = self._retrieval_loss(user_states, item_embeddings, target_item_indices)
        return LlmRecOutput(loss=loss, logits=self.similarity(user_embeddings, item_embeddings), user_embeddings=user_embeddings)

    def _encode_touched_batch(
        self, history_item_indices: torch.Tensor, other_item_indices: list[Optional[torch.Tensor]],
        text_inputs: Optional[dict[str, torch.Tensor]], profile_text_embeddings: Optional[torch.Tensor],
        has_profile: Optional[torch.Tensor], older_item_indices: Optional[torch.Tensor],
    ) -> _TouchedBatch:
        """Sampled softmax or reranking: only the items this batch touches, indexed by their table row.

        `other_item_indices` are the batch's targets, sampled items and candidates (None where absent).
        """
        item_table, touched_items = self._touched_item_table(
            [history_item_indices, *other_item_indices, older_item_indices], text_inputs
        )
        history_rows = _table_rows(touched_items, history_item_indices)
        older_rows = _table_rows(touched_items, older_item_indices) if older_item_indices is not None else None
        user_states = self.encode_users(history_rows, item_table, profile_text_embeddings, has_profile, older_rows)
        return _TouchedBatch(item_table, touched_items, history_rows, user_states)

    def _sampled_softmax_forward(
        self, batch: _TouchedBatch, target_item_indices: Optional[torch.Tensor], sampled_item_indices: torch.Tensor,
        sampled_log_q: Optional[torch.Tensor],
    ) -> LlmRecOutput:
        """Sampled softmax over `sampled_item_indices` with logQ correction; no `logits` (no catalogue scoring)."""
        loss = None
        if target_item_indices is not None:
            sampled_embeddings = batch.item_table[_table_rows(batch.touched_items, sampled_item_indices)]
            loss = self._retrieval_loss(
                batch.user_states, sampled_embeddings, target_item_indices, sampled_item_indices, sampled_log_q
            )
        return LlmRecOutput(loss=loss, logits=None, user_embeddings=batch.user_states[:, -1])

    def _rerank_forward(
        self, batch: _TouchedBatch, candidate_item_indices: torch.Tensor, candidate_labels: Optional[torch.Tensor],
        output_attentions: bool,
    ) -> LlmRecOutput:
        """Reranking: head scores of each user's candidates (`logits`), listwise cross-entropy against `candidate_labels`."""
        user_embeddings = batch.user_states[:, -1]
        scores, attentions = self.score_candidates(
            batch.history_rows, _table_rows(batch.touched_items, candidate_item_indices), batch.item_table, user_embeddings,
            output_attentions,
            row_items=batch.touched_items,
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


def _table_rows(touched_items: torch.Tensor, item_indices: torch.Tensor) -> torch.Tensor:
    """Rows of `item_indices` in a table of the sorted, unique `touched_items` (each of them is in it)."""
    return torch.searchsorted(touched_items, item_indices)
