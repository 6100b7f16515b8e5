"""Batches of similar-length histories for inference: each pads only to its own longest."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Positions of `lengths` in batches of `batch_size`, longest first (ties keep their order).

    Callers score each batch and write the results back at these positions, so the output keeps the
    input order while a batch of short histories no longer pads to the longest history in the input.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
