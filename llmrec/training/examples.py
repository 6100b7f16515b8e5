"""Training examples for both stages, and their collation into padded tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..modeling import IGNORE_INDEX, pad_histories, split_histories


def next_item_windows(
    train_sequences: Sequence[Sequence[int]], max_history_length: int, keep_older: bool = False
) -> list[list[int]]:
    """Cut each training sequence into windows of at most `max_history_length + 1` items, from the end.

    Every slot of a window predicts the next item (causal mask), so one window trains on all its
    positions in one pass; windows do not overlap, so every target is seen once per epoch. With
    `keep_older` each window comes with everything before it (the model's history summary reads that);
    `collate_next_item` splits it off again.
    """
    windows = []
    for sequence in train_sequences:
        end = len(sequence)
        while end >= 2:
            start = max(0, end - max_history_length - 1)
            windows.append(list(sequence[: end] if keep_older else sequence[start:end]))
            end = start + 1 if start > 0 else 0
    return windows


def collate_next_item(windows: Sequence[Sequence[int]], max_history_length: int) -> dict[str, torch.Tensor]:
    """Left-padded inputs (window[:-1]) and their next-item targets (window[1:], IGNORE_INDEX on padding).

    Items before the last `max_history_length` inputs become `older_item_indices` (absent when none).
    """
    inputs, older = split_histories([window[:-1] for window in windows], max_history_length)
    targets = pad_histories([window[1:] for window in windows], max_history_length)
    targets[inputs == 0] = IGNORE_INDEX
    batch = {"history_item_indices": inputs, "target_item_indices": targets}
    if older is not None:
        batch["older_item_indices"] = older
    return batch


@dataclass
class RerankExample:
    history: list[int]
    candidates: np.ndarray  # (C,) item indices retrieved for this history, best first
    label: int  # column of the true next item in `candidates`


def rerank_prefixes(train_sequences: Sequence[Sequence[int]], positions_per_user: int) -> tuple[list[list[int]], list[int]]:
    """(history, next item) pairs at each user's most recent training positions."""
    histories, targets = [], []
    for sequence in train_sequences:
        for position in range(max(1, len(sequence) - positions_per_user), len(sequence)):
            histories.append(list(sequence[:position]))
            targets.append(sequence[position])
    return histories, targets


def first_held_out_position(length: int, positions_per_user: int) -> int:
    """Where a sequence of `length` items is cut for `training.rerank_holdout`: its last `positions_per_user`
    positions are held out of stage 1, but every user keeps its first target (position 1) there."""
    return max(2, length - positions_per_user)


def retrieval_sequences(train_sequences: Sequence[Sequence[int]], positions_per_user: int) -> list[list[int]]:
    """Stage 1's sequences under `training.rerank_holdout`: each cut before its held-out positions."""
    return [list(sequence[: first_held_out_position(len(sequence), positions_per_user)]) for sequence in train_sequences]


def held_out_prefixes(train_sequences: Sequence[Sequence[int]], positions_per_user: int) -> tuple[list[list[int]], list[int]]:
    """(history, next item) pairs at the positions `retrieval_sequences` held out of stage 1.

    The towers never fitted these targets, so their candidate lists hold the target about as often as
    validation's and test's do; lists from fitted positions hold it more often and teach the head to
    trust retrieval more than serving will bear out.
    """
    histories, targets = [], []
    for sequence in train_sequences:
        for position in range(first_held_out_position(len(sequence), positions_per_user), len(sequence)):
            histories.append(list(sequence[:position]))
            targets.append(sequence[position])
    return histories, targets


def collate_rerank(examples: Sequence[RerankExample], max_history_length: int) -> dict[str, torch.Tensor]:
    histories, older = split_histories([example.history for example in examples], max_history_length)
    batch = {
        "history_item_indices": histories,
        "candidate_item_indices": torch.as_tensor(np.stack([example.candidates for example in examples]), dtype=torch.long),
        "candidate_labels": torch.tensor([example.label for example in examples], dtype=torch.long),
    }
    if older is not None:
        batch["older_item_indices"] = older
    return batch
