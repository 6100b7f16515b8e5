"""User embeddings -> FAISS candidates, and candidate reranking, on item indices (no raw ids here)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from ..modeling import LlmRecModel, pad_histories
from .index import ItemIndex


def build_item_index(model: LlmRecModel) -> ItemIndex:
    """A FAISS index of the model's item representations (row r = item index r + 1), cosine by default."""
    with torch.inference_mode():
        item_embeddings = model.item_embeddings()[1:].float().cpu().numpy()
    return ItemIndex.build(item_embeddings, normalize=True)


class CandidatePipeline:
    """Retrieve with the user tower and FAISS, then rerank with the cross-attention head, batch by batch.

    Item representations are computed once here and reused by every call, so serving never re-encodes
    the catalogue.
    """

    def __init__(self, model: LlmRecModel, index: ItemIndex, num_candidates: int = 100, exclude_history: bool = True) -> None:
        self.model = model
        self.index = index
        self.num_candidates = num_candidates
        self.exclude_history = exclude_history
        self.refresh()

    def refresh(self) -> None:
        """Recompute cached item representations (after training or adding items)."""
        with torch.inference_mode():
            self.item_embeddings = self.model.item_embeddings()

    @property
    def device(self) -> torch.device:
        return self.item_embeddings.device

    def _padded(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return pad_histories(histories, self.model.config.max_history_length, self.device)

    @torch.inference_mode()
    def user_embeddings(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.model.encode_users(self._padded(histories), self.item_embeddings)[:, -1]

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of (B, C) candidate item indices (0 = padding -> -inf) for each history, in one batched call."""
        candidates = torch.as_tensor(candidate_indices, dtype=torch.long, device=self.device)
        return self.model.score_candidates(
            self._padded(histories), candidates, self.item_embeddings, user_embeddings, output_attentions
        )

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
