"""The retrieval loss: next-item softmax cross-entropy over the whole catalogue or a sample of it (logQ-corrected)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .histories import IGNORE_INDEX


class RetrievalLossMixin:
    """`LlmRecModel`'s next-item loss; it reads the model's `similarity`, `warm_items` and `config`."""

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
        (see `LlmRecModel`'s docstring). Padding is never a valid next item either; a target always counts.
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
