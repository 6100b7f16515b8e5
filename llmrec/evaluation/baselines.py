"""Non-neural baselines fitted on training sequences only, scored by the same full-ranking evaluator as llmrec.

`ItemKNN` is the classic item-to-item collaborative filter: two items are similar when the same users
interacted with both. It ignores order and text, so it is the yardstick a sequential, text-aware model has to
beat to justify itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch

logger = logging.getLogger(__name__)


class ItemKNN:
    """Item-item cosine similarity of co-occurrence counts, with optional shrinkage and top-k neighbours.

    Fitting builds the binary user x item matrix ``X`` of the training sequences (an item a user met twice
    counts once), the co-occurrence counts ``C = XᵀX`` (``C[i, j]`` = users who interacted with both ``i``
    and ``j``; ``C[i, i]`` = item ``i``'s user count ``n_i``) and

        sim[i, j] = C[i, j] / (sqrt(n_i * n_j) + shrinkage)       (0 on the diagonal and for unseen items)

    Shrinkage pulls similarities resting on few shared users towards 0. Each row ``i`` then keeps only its
    ``num_neighbors`` largest entries, the items most similar to ``i``. A user's score for item ``j`` is the
    sum of the rows of the distinct items in their history: ``score[j] = Σ_{i ∈ history} sim[i, j]``.

    The object is a `ScoreFunction` (histories of 1-based item indices -> ``(B, num_items + 1)`` scores,
    column 0 = padding at -inf), so it plugs straight into `evaluate_ranking`. Items no history item points
    to score 0 and tie; the evaluator counts ties against the target. Memory is a dense
    ``(num_items + 1)²`` float64 matrix: fine for catalogues up to a few tens of thousands of items.

    Example:
        >>> knn = ItemKNN(num_neighbors=50, shrinkage=10.0).fit(split.train_sequences, split.num_items)
        >>> evaluate_ranking(knn, split.test.histories, split.test.targets, split.num_items)
    """

    def __init__(self, num_neighbors: Optional[int] = None, shrinkage: float = 0.0) -> None:
        if num_neighbors is not None and (int(num_neighbors) != num_neighbors or num_neighbors <= 0):
            raise ValueError(f"num_neighbors must be a positive integer or None (all items); got {num_neighbors!r}.")
        if shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0; got {shrinkage}.")
        self.num_neighbors = None if num_neighbors is None else int(num_neighbors)
        self.shrinkage = float(shrinkage)
        self.num_items: Optional[int] = None
        self.similarity: Optional[torch.Tensor] = None  # (num_items + 1, num_items + 1); row/column 0 = padding

    def __repr__(self) -> str:
        return f"ItemKNN(num_neighbors={self.num_neighbors}, shrinkage={self.shrinkage})"

    def fit(self, train_sequences: Sequence[Sequence[int]], num_items: int) -> "ItemKNN":
        """Count co-occurrences over `train_sequences` (1-based item indices; 0 = padding is ignored)."""
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1; got {num_items}.")
        interactions = _binary_rows(train_sequences, num_items)
        interactions[:, 0] = 0.0
        co_occurrence = interactions.T @ interactions
        user_counts = co_occurrence.diagonal().clone()
        denominator = torch.sqrt(user_counts.unsqueeze(1) * user_counts.unsqueeze(0)) + self.shrinkage
        similarity = torch.where(denominator > 0, co_occurrence / denominator.clamp_min(1e-12), 0.0)
        similarity.fill_diagonal_(0.0)
        if self.num_neighbors is not None and self.num_neighbors < num_items:
            top = similarity.topk(self.num_neighbors, dim=1)
            similarity = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
        self.num_items = num_items
        self.similarity = similarity
        logger.info("%r fitted on %d sequences, %d items; %d non-zero similarities.",
                    self, len(train_sequences), num_items, int((similarity != 0).sum()))
        return self

    def __call__(self, histories: list[list[int]]) -> torch.Tensor:
        """(B, num_items + 1) float64 scores: the summed similarity rows of each history's distinct items."""
        if self.similarity is None or self.num_items is None:
            raise RuntimeError("ItemKNN is not fitted; call fit(train_sequences, num_items) first.")
        scores = _binary_rows(histories, self.num_items) @ self.similarity
        scores[:, 0] = float("-inf")
        return scores


def _binary_rows(sequences: Sequence[Sequence[int]], num_items: int) -> torch.Tensor:
    """(len(sequences), num_items + 1) float64 0/1 matrix: which items each sequence holds (duplicates once)."""
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
    rows = torch.zeros((len(sequences), num_items + 1), dtype=torch.float64)
    if int(lengths.sum()) == 0:
        return rows
    item_indices = torch.tensor([int(item) for sequence in sequences for item in sequence], dtype=torch.long)
    if item_indices.min() < 0 or item_indices.max() > num_items:
        raise ValueError(f"Item indices must lie in [0, {num_items}] (0 = padding); got "
                         f"{int(item_indices.min())}..{int(item_indices.max())}.")
    rows[torch.repeat_interleave(torch.arange(len(sequences)), lengths), item_indices] = 1.0
    return rows
