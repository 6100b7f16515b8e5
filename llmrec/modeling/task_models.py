"""One class per training mode, over a shared `LlmRecModel`.

`LlmRecModel` holds the towers, the reranking head and the item tables, and its `forward` is inference
(user vectors and catalogue scores). Training runs through a task model that wraps it, as transformers'
`BertForMaskedLM` wraps a `BertModel`, so that each `forward` has one meaning and one loss:

- `LlmRecForRetrieval`: the towers' next-item loss, a full softmax over the catalogue or a sampled one
  (chosen when the task is built, not by which arguments are None); `logits` are catalogue scores;
- `LlmRecForReranking`: the head's listwise loss over each user's candidates; `logits` are candidate scores;
- `LlmRecForProfiles`: the profile fit, a user's profile text read as a leading token of the history.

A task model has no weights of its own: it saves and loads as the `LlmRecModel` folder it wraps, so one
trained folder serves every mode, and stage 1 and stage 2 train the same tensors.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .configuration_llmrec import LlmRecConfig
from .histories import IGNORE_INDEX
from .modeling_llmrec import LlmRecModel, LlmRecOutput
from .pretrained import LlmRecPreTrainedModel

RETRIEVAL_LOSSES = ("full_softmax", "sampled_softmax")


class LlmRecTaskModel(LlmRecPreTrainedModel):
    """A training mode over `llmrec`, an `LlmRecModel` (given, or built from a config)."""

    def __init__(self, model: Union[LlmRecModel, LlmRecConfig]) -> None:
        llmrec = model if isinstance(model, LlmRecModel) else LlmRecModel(model)
        # No post_init: it would initialise the weights again, and a task model has none of its own.
        super().__init__(llmrec.config)
        self.llmrec = llmrec

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> "LlmRecTaskModel":
        """The task over `LlmRecModel.from_pretrained(...)`: a task model loads the folder it saves."""
        task_kwargs = {name: kwargs.pop(name) for name in cls._task_arguments() if name in kwargs}
        return cls(LlmRecModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs), **task_kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Saves the wrapped `LlmRecModel`: the folder format does not depend on the mode that trained it."""
        self.llmrec.save_pretrained(*args, **kwargs)

    @staticmethod
    def _task_arguments() -> tuple[str, ...]:
        return ()


class LlmRecForRetrieval(LlmRecTaskModel):
    """Stage 1: next-item prediction at every slot of the history, by full or sampled softmax (`loss`)."""

    def __init__(self, model: Union[LlmRecModel, LlmRecConfig], loss: str = "full_softmax") -> None:
        if loss not in RETRIEVAL_LOSSES:
            raise ValueError(f"loss must be one of {list(RETRIEVAL_LOSSES)}, got {loss!r}.")
        super().__init__(model)
        self.retrieval_loss = loss

    @staticmethod
    def _task_arguments() -> tuple[str, ...]:
        return ("loss",)

    def forward(
        self,
        history_item_indices: torch.Tensor,
        target_item_indices: Optional[torch.Tensor] = None,
        sampled_item_indices: Optional[torch.Tensor] = None,
        sampled_log_q: Optional[torch.Tensor] = None,
        text_inputs: Optional[dict[str, torch.Tensor]] = None,
        profile_text_embeddings: Optional[torch.Tensor] = None,
        has_profile: Optional[torch.Tensor] = None,
        older_item_indices: Optional[torch.Tensor] = None,
    ) -> LlmRecOutput:
        """`target_item_indices` (B, L) holds the next item after every slot (IGNORE_INDEX where none).

        Full softmax: every item is a negative, and `logits` are the users' catalogue scores. Sampled softmax:
        the negatives are `sampled_item_indices` (sorted, unique, holding every target) with their logQ
        correction `sampled_log_q`, and `logits` are None, since scoring the catalogue is what sampling avoids.
        `text_inputs` (LoRA) holds the texts to re-encode with gradient; the rest as in `LlmRecModel.encode_users`.
        """
        sampled = self.retrieval_loss == "sampled_softmax"
        if sampled != (sampled_item_indices is not None):
            raise ValueError(
                f"This LlmRecForRetrieval trains with {self.retrieval_loss}: "
                + ("pass sampled_item_indices and sampled_log_q." if sampled else "do not pass sampled_item_indices.")
            )
        if sampled:
            return self._sampled_softmax(
                history_item_indices, target_item_indices, sampled_item_indices, sampled_log_q, text_inputs,
                profile_text_embeddings, has_profile, older_item_indices,
            )
        model = self.llmrec
        item_embeddings = model.item_embeddings(_fresh_catalogue_text(model, text_inputs))
        user_states = model.encode_users(
            history_item_indices, item_embeddings, profile_text_embeddings, has_profile, older_item_indices
        )
        user_embeddings = user_states[:, -1]
        loss = None if target_item_indices is None else model._retrieval_loss(user_states, item_embeddings, target_item_indices)
        return LlmRecOutput(loss=loss, logits=model.similarity(user_embeddings, item_embeddings), user_embeddings=user_embeddings)

    def _sampled_softmax(
        self, history_item_indices: torch.Tensor, target_item_indices: Optional[torch.Tensor],
        sampled_item_indices: torch.Tensor, sampled_log_q: Optional[torch.Tensor],
        text_inputs: Optional[dict[str, torch.Tensor]], profile_text_embeddings: Optional[torch.Tensor],
        has_profile: Optional[torch.Tensor], older_item_indices: Optional[torch.Tensor],
    ) -> LlmRecOutput:
        batch = encode_touched_batch(
            self.llmrec, history_item_indices, [target_item_indices, sampled_item_indices], text_inputs,
            profile_text_embeddings, has_profile, older_item_indices,
        )
        loss = None
        if target_item_indices is not None:
            sampled_embeddings = batch.item_table[table_rows(batch.touched_items, sampled_item_indices)]
            loss = self.llmrec._retrieval_loss(
                batch.user_states, sampled_embeddings, target_item_indices, sampled_item_indices, sampled_log_q
            )
        return LlmRecOutput(loss=loss, logits=None, user_embeddings=batch.user_states[:, -1])


class LlmRecForReranking(LlmRecTaskModel):
    """Stage 2: the cross-attention head scores each user's candidates; listwise cross-entropy over them."""

    def forward(
        self,
        history_item_indices: torch.Tensor,
        candidate_item_indices: torch.Tensor,
        candidate_labels: Optional[torch.Tensor] = None,
        text_inputs: Optional[dict[str, torch.Tensor]] = None,
        output_attentions: bool = False,
        profile_text_embeddings: Optional[torch.Tensor] = None,
        has_profile: Optional[torch.Tensor] = None,
        older_item_indices: Optional[torch.Tensor] = None,
    ) -> LlmRecOutput:
        """`logits` (B, C) are the head's scores of `candidate_item_indices` (-inf for padding candidates, index 0);
        `candidate_labels` (B,) gives each row's positive column (IGNORE_INDEX: no loss term)."""
        batch = encode_touched_batch(
            self.llmrec, history_item_indices, [candidate_item_indices], text_inputs, profile_text_embeddings,
            has_profile, older_item_indices,
        )
        user_embeddings = batch.user_states[:, -1]
        scores, attentions = self.llmrec.score_candidates(
            batch.history_rows, table_rows(batch.touched_items, candidate_item_indices), batch.item_table,
            user_embeddings, output_attentions, row_items=batch.touched_items,
        )
        loss = None
        if candidate_labels is not None:
            loss = F.cross_entropy(scores, candidate_labels, ignore_index=IGNORE_INDEX)
        return LlmRecOutput(loss=loss, logits=scores, user_embeddings=user_embeddings, attentions=attentions)


class LlmRecForProfiles(LlmRecTaskModel):
    """The profile fit: towers frozen, a user's profile text as a leading token (`model.use_user_profiles`).

    Each user gives two loss terms, summed over the batch's means:

    - profile + history: next-item softmax at every slot of their most recent window, as in stage 1;
    - profile only (empty history): a softmax whose target is spread over every item the user chose,
      which is what a cold user with nothing but a profile should be recommended.

    The towers stay frozen for the task's lifetime, so the catalogue is projected once, at the first step.
    """

    def __init__(self, model: Union[LlmRecModel, LlmRecConfig]) -> None:
        super().__init__(model)
        self._item_embeddings: Optional[torch.Tensor] = None

    def forward(
        self,
        profile_text_embeddings: torch.Tensor,
        history_item_indices: torch.Tensor,
        target_item_indices: torch.Tensor,
        chosen_item_indices: torch.Tensor,
    ) -> LlmRecOutput:
        """`profile_text_embeddings` (B, encoder hidden); the window and its next items (B, L) as for
        `LlmRecForRetrieval`; `chosen_item_indices` (B, M) every item of the user's sequence, 0-padded."""
        model = self.llmrec
        if model.profile_projection is None:
            raise ValueError("The model has no profile path; call model.enable_user_profiles() first.")
        if self._item_embeddings is None:
            with torch.no_grad():
                self._item_embeddings = model.item_embeddings()
        item_embeddings = self._item_embeddings
        loss = self._profile_only_loss(profile_text_embeddings, chosen_item_indices, item_embeddings)
        with_targets = (target_item_indices != IGNORE_INDEX).any(dim=1)
        if with_targets.any():
            states = model.encode_users(
                history_item_indices[with_targets], item_embeddings, profile_text_embeddings[with_targets]
            )
            loss = loss + model._retrieval_loss(states, item_embeddings, target_item_indices[with_targets])
        return LlmRecOutput(loss=loss)

    def _profile_only_loss(
        self, profiles: torch.Tensor, chosen_item_indices: torch.Tensor, item_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of the profile-only user against the uniform distribution over the items they chose."""
        model = self.llmrec
        empty = torch.zeros(len(profiles), 1, dtype=torch.long, device=profiles.device)
        users = model.encode_users(empty, item_embeddings, profiles)[:, -1]
        log_probabilities = model.similarity(users, item_embeddings)
        log_probabilities[:, 0] = float("-inf")
        log_probabilities = log_probabilities.log_softmax(dim=-1)
        chosen = torch.zeros_like(log_probabilities).scatter_(1, chosen_item_indices, 1.0)
        chosen[:, 0] = 0.0  # padding
        chosen = chosen / chosen.sum(dim=1, keepdim=True)
        return -(chosen * log_probabilities.masked_fill(chosen == 0, 0.0)).sum(dim=1).mean()


class TouchedBatch(NamedTuple):
    """A sampled-softmax or rerank batch after its user states are encoded from the items it touches."""

    item_table: torch.Tensor  # representations of the touched items only
    touched_items: torch.Tensor  # their item indices, sorted and unique (row r of the table is item touched_items[r])
    history_rows: torch.Tensor  # the histories as rows of item_table
    user_states: torch.Tensor  # per-slot user states (B, L, hidden)


def encode_touched_batch(
    model: LlmRecModel, history_item_indices: torch.Tensor, other_item_indices: list[Optional[torch.Tensor]],
    text_inputs: Optional[dict[str, torch.Tensor]], profile_text_embeddings: Optional[torch.Tensor],
    has_profile: Optional[torch.Tensor], older_item_indices: Optional[torch.Tensor],
) -> TouchedBatch:
    """User states from only the items a batch touches (`other_item_indices`: its targets, samples, candidates).

    Sampled softmax and reranking read a few hundred items; projecting (and, with LoRA, re-encoding) only
    those keeps a training step's cost independent of the catalogue size. Row 0 stays padding.
    """
    touched = [torch.zeros(1, dtype=torch.long, device=model.warm_items.device)]
    touched += [indices.flatten() for indices in [history_item_indices, *other_item_indices, older_item_indices]
                if indices is not None]
    rows = torch.unique(torch.cat(touched))
    rows = rows[rows >= 0]  # IGNORE_INDEX targets
    text_embeddings = None
    if text_inputs is not None:  # LoRA: the batch's texts re-encoded with gradient, the rest from the cache
        fresh = encode_texts_by_length(model, text_inputs["input_ids"], text_inputs["attention_mask"])
        text_embeddings = model.item_text_embeddings[rows].to(fresh.dtype)
        text_embeddings = text_embeddings.index_copy(0, table_rows(rows, text_inputs["item_indices"]), fresh)
    item_table = model.item_embeddings(text_embeddings, rows=rows)
    history_rows = table_rows(rows, history_item_indices)
    older_rows = table_rows(rows, older_item_indices) if older_item_indices is not None else None
    user_states = model.encode_users(history_rows, item_table, profile_text_embeddings, has_profile, older_rows)
    return TouchedBatch(item_table, rows, history_rows, user_states)


def encode_texts_by_length(
    model: LlmRecModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int = 128
) -> torch.Tensor:
    """`model.encode_item_texts` in chunks of similar length, each cut to its own longest text.

    A LoRA step re-encodes a few hundred to thousands of item texts; padded together to the longest,
    most of the encoder's work (forward and backward) would go into padding.
    """
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths)
    pooled = []
    for chunk in order.split(chunk_size):
        width = max(1, int(lengths[chunk].max()))
        pooled.append(model.encode_item_texts(input_ids[chunk, :width], attention_mask[chunk, :width]))
    return torch.cat(pooled)[torch.argsort(order)]


def table_rows(touched_items: torch.Tensor, item_indices: torch.Tensor) -> torch.Tensor:
    """Rows of `item_indices` in a table of the sorted, unique `touched_items` (each of them is in it)."""
    return torch.searchsorted(touched_items, item_indices)


def _fresh_catalogue_text(model: LlmRecModel, text_inputs: Optional[dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The cached catalogue text embeddings with the rows in `text_inputs` re-encoded (with gradient), for LoRA."""
    if text_inputs is None:
        return None
    fresh = encode_texts_by_length(model, text_inputs["input_ids"], text_inputs["attention_mask"])
    return model.item_text_embeddings.to(fresh.dtype).index_copy(0, text_inputs["item_indices"], fresh)
