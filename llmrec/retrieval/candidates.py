"""User embeddings -> FAISS candidates, and candidate reranking, on item indices (no raw ids here)."""

from __future__ import annotations

from typing import Sequence

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

    @torch.inference_mode()
    def user_embeddings(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        padded = pad_histories(histories, self.model.config.max_history_length, self.device)
        return self.model.encode_users(padded, self.item_embeddings)[:, -1]

    def retrieve(self, histories: Sequence[Sequence[int]], k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, item indices) per history from FAISS; scores are cosine / temperature."""
        query = self.user_embeddings(histories).float().cpu().numpy()
        exclude = histories if self.exclude_history else None
        scores, indices = self.index.search(query, k or self.num_candidates, exclude=exclude)
        return scores / self.model.config.similarity_temperature, indices

    @torch.inference_mode()
    def rerank(
        self, histories: Sequence[Sequence[int]], candidate_indices: torch.Tensor | np.ndarray, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of (B, C) candidate item indices (0 = padding -> -inf) for each history, in one batched call."""
        candidates = torch.as_tensor(candidate_indices, dtype=torch.long, device=self.device)
        padded = pad_histories(histories, self.model.config.max_history_length, self.device)
        return self.model.score_candidates(padded, candidates, self.item_embeddings, output_attentions=output_attentions)
