"""Changing a model's catalogue tables in place: more items (`add_items`), the head's popularity feature
(`set_item_popularity`) and a user-profile path (`enable_user_profiles`).

They keep everything already learned, so a served model can grow without retraining.
"""

from __future__ import annotations

import torch
from torch import nn


class CatalogueEditingMixin:
    """`LlmRecModel`'s in-place edits; they read its item tables, `item_encoder` and `config`."""

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
        if self.config.rerank_popularity:
            self.item_popularity_feature = torch.cat([self.item_popularity_feature, torch.zeros(count, device=device)])
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

    @torch.no_grad()
    def set_item_popularity(self, training_counts: torch.Tensor) -> None:
        """Store the head's popularity feature from each item's training interaction count (row 0 = padding).

        log(1 + count) / log(1 + largest count): popular and unpopular items apart, on the [0, 1] scale of
        the head's other inputs; an item added later reads 0, as an item nobody has chosen yet.
        """
        if not self.config.rerank_popularity:
            return
        counts = torch.as_tensor(training_counts, dtype=torch.float32, device=self.item_popularity_feature.device)
        if counts.shape != self.item_popularity_feature.shape:
            raise ValueError(f"training_counts has shape {tuple(counts.shape)}; expected {tuple(self.item_popularity_feature.shape)}.")
        feature = torch.log1p(counts.clamp(min=0))
        feature[0] = 0.0
        self.item_popularity_feature.copy_(feature / feature.max().clamp(min=1e-12))

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
