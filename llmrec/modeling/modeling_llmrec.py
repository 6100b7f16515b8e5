"""The llmrec model: item text encoder, self-attentive user encoder and cross-attention reranking head.

`LlmRecModel` puts the parts together, and its `forward` is inference (user vectors and catalogue scores);
each training mode is a class of its own around it (`task_models`: `LlmRecForRetrieval`, `LlmRecForReranking`).
The parts live beside it: `item_encoder`, `user_encoder` (over `attention`), `reranker`, `histories`
(padding and splitting them), `losses`, `catalogue` (adding items to a trained model) and `pretrained`
(saving and loading). Item *indices* are 1-based (row 0 is padding); histories are left-padded with 0 so
the most recent item always sits in the last slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
    """`loss` when targets/labels are given (task models); `logits` are catalogue scores (`LlmRecModel`,
    `LlmRecForRetrieval`) or candidate scores (`LlmRecForReranking`)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    user_embeddings: Optional[torch.Tensor] = None
    attentions: Optional[torch.Tensor] = None


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

    - `impute_missing_ids`: such an item's ID part is predicted from its projected text by a linear map,
      trained on the warm items whose ID embedding ID dropout removes, instead of being left out.

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
        # Predicts a missing ID embedding from the projected text (`impute_missing_ids`). Built after post_init
        # and outside the global random stream, so the rest of the model starts and trains as without it; it
        # starts at zero, the ID part a new item has without it.
        self.id_imputer = None
        if config.impute_missing_ids:
            with torch.random.fork_rng(devices=[]):
                self.id_imputer = nn.Linear(config.hidden_size, config.hidden_size)
            nn.init.zeros_(self.id_imputer.weight)
            nn.init.zeros_(self.id_imputer.bias)

    # ----- item side -------------------------------------------------------------------------------

    def encode_item_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.item_encoder(input_ids, attention_mask)

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
            missing_id = self.id_imputer(representations) * (1.0 - keep) if self.id_imputer is not None else 0.0
            representations = representations + id_rows * keep + missing_id
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

    def forward(
        self, history_item_indices: torch.Tensor, profile_text_embeddings: Optional[torch.Tensor] = None,
        has_profile: Optional[torch.Tensor] = None, older_item_indices: Optional[torch.Tensor] = None,
        **training_inputs: Any,
    ) -> LlmRecOutput:
        """Inference: the users' embeddings and their cosine scores over the whole catalogue (`logits`).

        Training has a class per mode around this model (`task_models`): `LlmRecForRetrieval` for the towers'
        next-item loss, `LlmRecForReranking` for the head's.
        """
        if training_inputs:
            raise TypeError(
                f"LlmRecModel.forward is inference only and takes no {sorted(training_inputs)}: train the towers "
                "through LlmRecForRetrieval(model) and the head through LlmRecForReranking(model) "
                "(llmrec.modeling), which share this model's weights."
            )
        item_embeddings = self.item_embeddings()
        user_embeddings = self.encode_users(
            history_item_indices, item_embeddings, profile_text_embeddings, has_profile, older_item_indices, last_only=True
        )[:, -1]
        return LlmRecOutput(logits=self.similarity(user_embeddings, item_embeddings), user_embeddings=user_embeddings)
