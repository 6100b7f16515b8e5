"""User embeddings -> FAISS candidates, and candidate reranking, on item indices (no raw ids here)."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..modeling import LlmRecModel, split_histories
from ..utils.length_order import length_sorted_batches
from .index import ItemIndex

# Histories per user-tower call when serving many: each chunk of similar lengths pads to its own longest.
USER_CHUNK_SIZE = 64


def build_item_index(model: LlmRecModel, index_type: str = "flat", **params: Any) -> ItemIndex:
    """A cosine FAISS index of the model's item representations (row r = item index r + 1).

    `index_type` and `params` as in `ItemIndex.build`: exact ("flat") or approximate ("hnsw", "ivf").
    """
    with torch.inference_mode():
        item_embeddings = model.item_embeddings()[1:].float().cpu().numpy()
    return ItemIndex.build(item_embeddings, normalize=True, index_type=index_type, **params)


class CandidatePipeline:
    """Retrieve with the user tower and FAISS, then rerank with the cross-attention head, batch by batch.

    The serving cache: item representations and the reranking head's per-item query/key/value
    projections are computed once here and reused by every call, so a request only encodes the user's
    history, searches FAISS and gathers rows; `extended` builds a grown copy from the new rows alone.
    Requests read item representations from this cache only, never from the model's item buffers; the one
    exception, `item_text_embeddings` (the encoder's pooled item texts, for diversity), is a view of the model's
    buffer taken here, not a copy: `add_items` grows that buffer into a new tensor, so the rows a pipeline
    serves never change under it.
    """

    def __init__(self, model: LlmRecModel, index: ItemIndex, num_candidates: int = 100, exclude_history: bool = True) -> None:
        self.model = model
        self.index = index
        self.num_candidates = num_candidates
        self.exclude_history = exclude_history
        self.refresh()

    def refresh(self) -> None:
        """Recompute the cached item representations and head projections (after training)."""
        with torch.inference_mode():
            item_embeddings = self.model.item_embeddings()
            self.rerank_cache = self.model.reranker.project_items(item_embeddings)
            self.item_embeddings = item_embeddings
            self.item_text_embeddings = self.model.item_text_embeddings[: item_embeddings.shape[0]]

    def extended(self, count: int) -> "CandidatePipeline":
        """A new pipeline whose index and caches also hold the model's last `count` items (just added to it).

        This pipeline is left untouched, so requests running on it meanwhile keep a consistent view; the
        caller publishes the new one. Both share the model, whose serving modules do not change.
        """
        with torch.inference_mode():
            start = self.item_embeddings.shape[0]
            rows = torch.arange(start, start + count, device=self.device)
            new_embeddings = self.model.item_embeddings(rows=rows)
            grown = copy.copy(self)
            grown.rerank_cache = self.rerank_cache.extended(self.model.reranker.project_items(new_embeddings))
            grown.item_embeddings = torch.cat([self.item_embeddings, new_embeddings])
            grown.item_text_embeddings = self.model.item_text_embeddings[: start + count]
        grown.index = self.index.extended(new_embeddings.float().cpu().numpy())
        return grown

    @property
    def num_items(self) -> int:
        """Items this pipeline serves (its cache and index rows), which may trail a model being grown."""
        return self.item_embeddings.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.item_embeddings.device

    def _padded(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return split_histories(histories, self.model.config.max_history_length, self.device)

    @torch.inference_mode()
    def user_embeddings(self, histories: Sequence[Sequence[int]], chunk_size: int = USER_CHUNK_SIZE) -> torch.Tensor:
        """The user now (B, hidden) per history, in length-sorted chunks so short histories skip long ones' padding.

        Positions count from the most recent item, so narrower padding gives the same vectors.
        """
        if len(histories) <= chunk_size:
            return self._last_states(histories)
        embeddings = None
        for positions in length_sorted_batches([len(history) for history in histories], chunk_size):
            chunk = self._last_states([histories[position] for position in positions])
            if embeddings is None:
                embeddings = chunk.new_empty(len(histories), chunk.shape[-1])
            embeddings[torch.as_tensor(positions, device=chunk.device)] = chunk
        return embeddings

    def _last_states(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        window, older = self._padded(histories)
        return self.model.encode_users(window, self.item_embeddings, older_item_indices=older, last_only=True)[:, -1]

    def retrieve(
        self,
        histories: Sequence[Sequence[int]],
        k: int | None = None,
        user_embeddings: torch.Tensor | None = None,
        exclude: Sequence[Iterable[int]] | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, item indices) per history from FAISS; scores are cosine / temperature.

        `exclude` (per history) replaces the default exclusion of the history itself; `allowed` limits
        every history to those item indices.
        """
        if user_embeddings is None:
            user_embeddings = self.user_embeddings(histories)
        if exclude is None and self.exclude_history:
            exclude = histories
        scores, indices = self.index.search(
            user_embeddings.float().cpu().numpy(), k or self.num_candidates, exclude=exclude, allowed=allowed
        )
        return scores / self.model.config.similarity_temperature, indices

    @torch.inference_mode()
    def rerank(
        self,
        histories: Sequence[Sequence[int]],
        candidate_indices: torch.Tensor | np.ndarray,
        output_attentions: bool = False,
        user_embeddings: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of (B, C) candidate item indices (0 = padding -> -inf) for each history, in one batched call.

        `use_cache=False` recomputes the head's projections per call (the reference the benchmarks time).
        """
        candidates = torch.as_tensor(candidate_indices, dtype=torch.long, device=self.device)
        if len(histories) > USER_CHUNK_SIZE and not output_attentions:
            return self._rerank_by_length(histories, candidates, user_embeddings, use_cache), None
        window, older = self._padded(histories)
        return self.model.score_candidates(
            window,
            candidates,
            self.item_embeddings,
            user_embeddings,
            output_attentions,
            rerank_cache=self.rerank_cache if use_cache else None,
            older_item_indices=older,
        )

    def _rerank_by_length(
        self, histories: Sequence[Sequence[int]], candidates: torch.Tensor, user_embeddings: torch.Tensor | None, use_cache: bool
    ) -> torch.Tensor:
        """`rerank`'s scores in length-sorted chunks: the head attends over each chunk's own longest history only.

        Recency counts from the most recent item, so narrower padding gives the same scores.
        """
        scores = torch.empty(candidates.shape, dtype=torch.float32, device=self.device)
        for positions in length_sorted_batches([len(history) for history in histories], USER_CHUNK_SIZE):
            rows = torch.as_tensor(positions, device=self.device)
            chunk_scores, _ = self.rerank(
                [histories[position] for position in positions], candidates[rows],
                user_embeddings=None if user_embeddings is None else user_embeddings[rows], use_cache=use_cache,
            )
            scores = scores.to(chunk_scores.dtype)
            scores[rows] = chunk_scores
        return scores

    @torch.inference_mode()
    def retrieve_and_rerank(
        self,
        histories: Sequence[Sequence[int]],
        k: int | None = None,
        exclude: Sequence[Iterable[int]] | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """FAISS candidates and their reranked scores, encoding each user once for both steps."""
        user_embeddings = self.user_embeddings(histories)
        _, candidate_indices = self.retrieve(histories, k, user_embeddings, exclude=exclude, allowed=allowed)
        scores, _ = self.rerank(histories, candidate_indices, user_embeddings=user_embeddings)
        return candidate_indices, scores
