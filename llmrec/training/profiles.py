"""Fitting the user-profile path: free-text profiles as a leading token of the user sequence.

The profile projection is fitted after stage 1 with every other weight frozen, so a user without a
profile is served exactly as before, and a profile can only add to what the history says. Each user
with a profile and a training sequence gives two examples per epoch:

- profile + history: next-item softmax at every slot of their most recent window, as in stage 1;
- profile only (empty history): a softmax whose target is spread over every item of their training
  sequence, which is what a cold user with nothing but a profile should be recommended.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..modeling import LlmRecModel, pad_histories
from ..modeling.text_encoding import embed_item_texts
from .examples import collate_next_item

logger = logging.getLogger(__name__)


def fit_user_profiles(
    model: LlmRecModel,
    train_sequences: Sequence[Sequence[int]],
    profile_text_embeddings: torch.Tensor,
    epochs: int = 20,
    learning_rate: float = 1e-2,
    batch_size: int = 64,
    seed: int = 42,
) -> list[float]:
    """Fit `model.profile_projection` (towers frozen); returns the mean training loss of each epoch.

    `profile_text_embeddings` (num_users, encoder hidden) holds the pooled BERT embeddings of the users'
    profile texts, aligned with `train_sequences` (see `embed_user_profiles`). Users with an
    empty training sequence (e.g. the held-out users of a cold_users split) are skipped.
    """
    if model.profile_projection is None:
        raise ValueError("The model has no profile path; build it with use_user_profiles=True.")
    if len(profile_text_embeddings) != len(train_sequences):
        raise ValueError(f"{len(profile_text_embeddings)} profiles for {len(train_sequences)} users; pass one per user.")
    users = [user for user, sequence in enumerate(train_sequences) if len(sequence) > 0]
    if not users:
        raise ValueError("No user has a training sequence to fit profiles on.")
    device = model.item_text_embeddings.device
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("profile_projection."))
    was_training = model.training
    model.eval()  # frozen towers: no dropout, no ID dropout
    optimizer = torch.optim.AdamW(model.profile_projection.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    max_length = model.config.max_history_length
    with torch.no_grad():
        item_embeddings = model.item_embeddings()
    epoch_losses = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(users), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), batch_size):
                batch_users = [users[position] for position in order[start : start + batch_size]]
                profiles = profile_text_embeddings[batch_users].to(device)
                loss = _history_loss(model, item_embeddings, [train_sequences[user] for user in batch_users], profiles, max_length)
                loss = loss + _profile_only_loss(model, item_embeddings, [train_sequences[user] for user in batch_users], profiles)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            epoch_losses.append(sum(losses) / len(losses))
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        model.train(was_training)
    logger.info("User profiles: %d users, loss %.4f -> %.4f over %d epochs.", len(users), epoch_losses[0], epoch_losses[-1], epochs)
    return epoch_losses


def embed_user_profiles(
    model: LlmRecModel, tokenizer: PreTrainedTokenizerBase, profiles: Sequence[Optional[str]], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled BERT embeddings (num users, encoder hidden) of profile texts, and which users have one.

    A user without a profile (None) gets the embedding of an empty text, which `has_profile` masks out.
    """
    texts = [profile if profile is not None else "" for profile in profiles]
    embeddings = embed_item_texts(model, tokenizer, texts, batch_size)
    has_profile = torch.tensor([profile is not None for profile in profiles], dtype=torch.bool)
    return embeddings, has_profile


def _history_loss(
    model: LlmRecModel, item_embeddings: torch.Tensor, sequences: list[Sequence[int]], profiles: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Next-item loss of each user's most recent window, read with the profile token in front."""
    windows = [list(sequence[-(max_length + 1):]) for sequence in sequences]
    keep = [row for row, window in enumerate(windows) if len(window) >= 2]
    if not keep:
        return profiles.new_zeros(())
    batch = collate_next_item([windows[row] for row in keep], max_length)
    device = profiles.device
    states = model.encode_users(batch["history_item_indices"].to(device), item_embeddings, profiles[keep])
    return model._retrieval_loss(states, item_embeddings, batch["target_item_indices"].to(device), None, None)


def _profile_only_loss(
    model: LlmRecModel, item_embeddings: torch.Tensor, sequences: list[Sequence[int]], profiles: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the profile-only user against the uniform distribution over the items they chose."""
    device = profiles.device
    empty = pad_histories([[] for _ in sequences], 1, device)
    users = model.encode_users(empty, item_embeddings, profiles)[:, -1]
    log_probabilities = model.similarity(users, item_embeddings)
    log_probabilities[:, 0] = float("-inf")
    log_probabilities = log_probabilities.log_softmax(dim=-1)
    chosen = torch.zeros_like(log_probabilities)
    for row, sequence in enumerate(sequences):
        chosen[row, torch.as_tensor(list(sequence), dtype=torch.long, device=device)] = 1.0
    chosen = chosen / chosen.sum(dim=1, keepdim=True)
    return -(chosen * log_probabilities.masked_fill(chosen == 0, 0.0)).sum(dim=1).mean()
