"""How histories reach the model: item indices, left-padded so the most recent item sits in the last slot.

Item *indices* are 1-based (index 0 is padding). A history longer than the window is split into the window
and the older items before it, which a model with `history_summary` reads as one summary token.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# Target value of a slot (or candidate label of a row) that has nothing to predict; the losses skip it.
IGNORE_INDEX = -100


def pad_histories(histories: Sequence[Sequence[int]], max_length: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Left-pad (and truncate to the most recent `max_length`) item-index histories into a (B, L) tensor."""
    length = max(1, min(max_length, max((len(history) for history in histories), default=1)))
    padded = torch.zeros(len(histories), length, dtype=torch.long)
    for row, history in enumerate(histories):
        recent = list(history)[-length:]
        if recent:
            padded[row, length - len(recent):] = torch.as_tensor(recent, dtype=torch.long)
    return padded if device is None else padded.to(device)


def split_histories(
    histories: Sequence[Sequence[int]], max_length: int, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The window (`pad_histories`) and, when some history is longer, the older items before it (B, M), 0-padded.

    The older part is None when every history fits the window, so the common case builds nothing extra.
    """
    window = pad_histories(histories, max_length, device)
    older = [list(history)[: max(0, len(history) - max_length)] for history in histories]
    longest = max((len(items) for items in older), default=0)
    if longest == 0:
        return window, None
    padded = torch.zeros(len(histories), longest, dtype=torch.long)
    for row, items in enumerate(older):
        if items:
            padded[row, : len(items)] = torch.as_tensor(items, dtype=torch.long)
    return window, padded if device is None else padded.to(device)
