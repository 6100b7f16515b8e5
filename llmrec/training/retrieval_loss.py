"""Which loss stage 1 trains with, and what the sampled softmax needs: negative probabilities and the logQ term.

Full softmax scores every catalogue item at every position; it is exact but its logits grow with the
catalogue, and with LoRA it would mean re-encoding the whole catalogue each step. Sampled softmax scores
the batch's targets plus popularity-drawn negatives, corrected by each item's log chance to be drawn.
Large catalogues under sampled softmax also update the item ID table sparsely (`use_sparse_id_gradients`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..config import ExperimentConfig

# Largest full-softmax logits tensor per batch (positions x catalogue, fp32) that `loss: auto` allows: 1 GiB.
FULL_SOFTMAX_MAX_LOGITS = 2**28
# From this catalogue size on, sampled softmax updates the item ID table sparsely by default (`_optimizers`).
SPARSE_ID_GRADIENTS_MIN_ITEMS = 100_000


def log_inclusion_probability(probabilities: torch.Tensor, num_samples: int) -> torch.Tensor:
    """log P(item drawn at least once in `num_samples` draws with replacement) = log(1 - (1 - p)^n).

    This, not log p, is the logQ correction for a deduplicated sample: a popular item that is in nearly
    every sample must not be pushed down by log p (the expected-count form TensorFlow's samplers use).
    """
    return torch.log(-torch.expm1(num_samples * torch.log1p(-probabilities)))


def choose_retrieval_loss(config: ExperimentConfig, num_items: int) -> str:
    """Full softmax over the catalogue where it fits and the item cache is fixed; sampled softmax otherwise.

    With LoRA the item side changes every step, and scoring the whole catalogue would mean re-encoding it.
    """
    if config.training.loss != "auto":
        return config.training.loss
    logits_per_batch = config.training.retrieval_batch_size * config.model.max_history_length * (num_items + 1)
    if config.lora is not None or logits_per_batch > FULL_SOFTMAX_MAX_LOGITS:
        return "sampled_softmax"
    return "full_softmax"


def negative_sampling_probabilities(popularity: Union[Sequence[float], np.ndarray]) -> torch.Tensor:
    """Each item's chance per draw: in proportion to popularity + 1 (so unseen items can be drawn), none for padding.

    The logQ correction subtracts the log of each item's chance to be in the sample, so the sampled
    softmax estimates the full one.
    """
    probabilities = (torch.as_tensor(popularity, dtype=torch.float) + 1).index_fill(0, torch.tensor([0]), 0.0)
    probabilities /= probabilities.sum()
    return probabilities


def use_sparse_id_gradients(requested: Optional[bool], loss_type: str, num_items: int, num_processes: int) -> bool:
    """`training.sparse_id_gradients` (`requested`), or by default: sampled softmax, a large catalogue, one process."""
    if requested is not None:
        return bool(requested) and loss_type == "sampled_softmax"
    return loss_type == "sampled_softmax" and num_items >= SPARSE_ID_GRADIENTS_MIN_ITEMS and num_processes == 1
