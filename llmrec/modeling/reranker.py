"""The reranking head: each candidate attends over the user's history, and a small MLP corrects its retrieval score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .configuration_llmrec import LlmRecConfig


TEXT_SIMILARITY_FEATURES = 3  # max, mean and most recent of a candidate's text cosines with the history items


def text_similarity_features(
    candidate_texts: torch.Tensor, history_texts: torch.Tensor, history_mask: torch.Tensor
) -> torch.Tensor:
    """(B, C, 3): each candidate's cosine with the history items' raw text embeddings: max, mean, most recent.

    `candidate_texts` (B, C, D), `history_texts` (B, L, D) left-padded (`history_mask` True on real items).
    This is the encoder's own similarity, which the towers' projections need not keep; a history without
    items gives zeros.
    """
    cosines = F.normalize(candidate_texts.float(), dim=-1) @ F.normalize(history_texts.float(), dim=-1).transpose(1, 2)
    mask = history_mask[:, None, :]
    count = mask.sum(-1).clamp(min=1)
    best = cosines.masked_fill(~mask, float("-inf")).amax(-1)
    best = torch.where(mask.any(-1), best, torch.zeros_like(best))
    mean = cosines.masked_fill(~mask, 0.0).sum(-1) / count
    latest = cosines[..., -1] * mask[..., -1]  # left padding: the last slot is the most recent item
    return torch.stack([best, mean, latest], dim=-1)


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
        # The text-similarity and popularity features join the scorer's first layer through weights of their own
        # that start at zero (no random draw): switching them on changes neither the towers' initialisation nor
        # the random stream training reads, so stage 1 is the same run with or without them.
        self.text_similarity_weight = (
            nn.Parameter(torch.zeros(hidden, TEXT_SIMILARITY_FEATURES)) if config.rerank_text_similarity else None
        )
        self.popularity_weight = nn.Parameter(torch.zeros(hidden, 1)) if config.rerank_popularity else None
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
        text_similarity: Optional[torch.Tensor] = None,
        popularity: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores (B, C) of candidate item indices for left-padded histories (B, L); `cache` skips the projections.

        `text_similarity` (B, C, TEXT_SIMILARITY_FEATURES) from `text_similarity_features` and `popularity` (B, C),
        each when the head reads it.
        """
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
        first, activation, last = self.scorer
        hidden = first(features)
        if self.text_similarity_weight is not None:
            if text_similarity is None:
                raise ValueError("This head reads text-similarity features (rerank_text_similarity); pass text_similarity.")
            hidden = hidden + F.linear(text_similarity.to(hidden.dtype), self.text_similarity_weight)
        if self.popularity_weight is not None:
            if popularity is None:
                raise ValueError("This head reads item popularity (rerank_popularity); pass popularity.")
            hidden = hidden + F.linear(popularity.to(hidden.dtype).unsqueeze(-1), self.popularity_weight)
        scores = last(activation(hidden)).squeeze(-1) + self.retrieval_weight * retrieval_scores
        return scores, weights
