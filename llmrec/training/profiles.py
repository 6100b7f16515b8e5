"""Fitting the user-profile path: free-text profiles as a leading token of the user sequence.

The profile projection is fitted after both stages with every other weight frozen, so a user without a
profile is served exactly as before, and a profile can only add to what the history says. The loss is
`LlmRecForProfiles`'s; a training run fits it as its third stage (`LlmRecTrainer.train_profiles`, with the
loop, checkpoints and early stopping of the other two); `fit_user_profiles` fits an already loaded model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..modeling import LlmRecModel, pad_histories
from ..modeling.task_models import LlmRecForProfiles
from ..modeling.text_encoding import embed_item_texts
from .examples import collate_next_item

logger = logging.getLogger(__name__)


@dataclass
class ProfileExample:
    """A user with a profile and a training sequence: the profile-fit example of one epoch."""

    user_index: int
    sequence: Sequence[int]


def profile_examples(train_sequences: Sequence[Sequence[int]], has_profile: torch.Tensor) -> list[ProfileExample]:
    """One example per user with a profile and a training sequence (users without one teach nothing)."""
    examples = [
        ProfileExample(user, sequence) for user, (sequence, has) in enumerate(zip(train_sequences, has_profile.tolist()))
        if has and len(sequence) > 0
    ]
    if not examples:
        raise ValueError("No user has both a profile and a training sequence to fit profiles on.")
    return examples


def collate_profiles(
    examples: Sequence[ProfileExample], profile_text_embeddings: torch.Tensor, max_history_length: int
) -> dict[str, torch.Tensor]:
    """`LlmRecForProfiles`'s inputs: each user's profile, most recent window and every item they chose."""
    windows = [list(example.sequence[-(max_history_length + 1):]) for example in examples]
    batch = collate_next_item(windows, max_history_length)
    batch.pop("older_item_indices", None)  # windows are cut to the model's window
    batch["profile_text_embeddings"] = profile_text_embeddings[[example.user_index for example in examples]]
    sequences = [list(example.sequence) for example in examples]
    batch["chosen_item_indices"] = pad_histories(sequences, max(len(sequence) for sequence in sequences))
    return batch


def fit_user_profiles(
    model: LlmRecModel,
    train_sequences: Sequence[Sequence[int]],
    profile_text_embeddings: torch.Tensor,
    epochs: int = 20,
    learning_rate: float = 1e-2,
    batch_size: int = 64,
    seed: int = 42,
) -> list[float]:
    """Fit `model.profile_projection` of a loaded model (towers frozen); returns each epoch's mean training loss.

    `profile_text_embeddings` (num_users, encoder hidden) holds the pooled BERT embeddings of the users'
    profile texts, aligned with `train_sequences` (see `embed_user_profiles`). Users with an empty
    training sequence (e.g. the held-out users of a cold_users split) are skipped. Every epoch runs in
    full: without a split there is no validation to stop on (a training run has it: `train_profiles`).
    """
    if model.profile_projection is None:
        raise ValueError("The model has no profile path; build it with use_user_profiles=True.")
    if len(profile_text_embeddings) != len(train_sequences):
        raise ValueError(f"{len(profile_text_embeddings)} profiles for {len(train_sequences)} users; pass one per user.")
    examples = profile_examples(train_sequences, torch.ones(len(train_sequences), dtype=torch.bool))
    task = LlmRecForProfiles(model)
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("profile_projection."))
    was_training = model.training
    model.eval()  # frozen towers: no dropout, no ID dropout
    optimizer = torch.optim.AdamW(model.profile_projection.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    device = model.item_text_embeddings.device
    epoch_losses = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), batch_size):
                chosen = [examples[position] for position in order[start : start + batch_size]]
                batch = collate_profiles(chosen, profile_text_embeddings, model.config.max_history_length)
                loss = task(**{name: tensor.to(device) for name, tensor in batch.items()}).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            epoch_losses.append(sum(losses) / len(losses))
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        model.train(was_training)
    logger.info("User profiles: %d users, loss %.4f -> %.4f over %d epochs.", len(examples), epoch_losses[0], epoch_losses[-1], epochs)
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
