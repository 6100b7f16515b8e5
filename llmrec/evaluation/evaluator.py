"""Batched full-ranking evaluation of any scorer (model, popularity, retrieval) on held-out items."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from llmrec.evaluation.metrics import ranking_metrics, target_ranks
from llmrec.utils.distributed import gather_rows, is_distributed, shard_batches
from llmrec.utils.length_order import length_sorted_batches

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[list[list[int]]], torch.Tensor]
"""Histories batch (1-based item indices) -> (B, num_items + 1) scores; column 0 is padding and ignored.

`evaluate_ranking` hands a score function its histories in batches of similar length, not in their given
order; one that pairs rows with per-user data by call order sets `scores_in_input_order = True` on itself.
"""


def history_exclude_mask(histories: Sequence[Sequence[int]], num_items: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, num_items + 1) mask of already-seen items, built with one scatter rather than a Python loop per item."""
    lengths = torch.tensor([len(history) for history in histories], dtype=torch.long)
    mask = torch.zeros((len(histories), num_items + 1), dtype=torch.bool, device=device)
    if int(lengths.sum()) == 0:
        return mask
    history_item_indices = torch.tensor([int(item) for history in histories for item in history], dtype=torch.long)
    if history_item_indices.min() < 0 or history_item_indices.max() > num_items:
        raise ValueError(f"History item indices must lie in [0, {num_items}] (0 = padding).")
    row_indices = torch.repeat_interleave(torch.arange(len(histories)), lengths)
    mask[row_indices.to(device), history_item_indices.to(device)] = True
    return mask


def evaluate_ranking(
    score_fn: ScoreFunction,
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    num_items: int,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 256,
    exclude_history: bool = True,
    desc: str = "evaluate",
    accelerator: object | None = None,
) -> dict[str, float]:
    """Rank each user's held-out target against the whole catalogue; history items are removed so re-recommending them earns nothing.

    With a multi-process `accelerator` each process scores its share of the batches and the ranks are
    gathered by user position, so every user counts once and every process returns the one-process metrics.
    A score function with `scores_in_input_order` pairs rows by call order and is scored whole in every process.
    """
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets; they must pair up one to one.")
    if len(histories) == 0:
        raise ValueError("No users to evaluate: histories and targets are empty.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")

    ranks = torch.full((len(histories),), -1, dtype=torch.long)
    if getattr(score_fn, "scores_in_input_order", False):
        batches = [np.arange(start, min(start + batch_size, len(histories))) for start in range(0, len(histories), batch_size)]
        accelerator = None
    else:  # batched by history length: a batch pads only to its own longest history, not to the window
        batches = shard_batches(accelerator, length_sorted_batches([len(history) for history in histories], batch_size))
    with torch.no_grad():
        for positions in tqdm(batches, desc=desc, disable=None, unit="batch"):
            batch_histories = [list(histories[position]) for position in positions]
            batch_targets = torch.as_tensor([targets[position] for position in positions], dtype=torch.long)
            scores = score_fn(batch_histories)
            expected_shape = (len(batch_histories), num_items + 1)
            if tuple(scores.shape) != expected_shape:
                raise ValueError(f"score_fn returned shape {tuple(scores.shape)}; expected {expected_shape} (column 0 = padding).")
            scores = scores.detach()
            exclude_mask = history_exclude_mask(batch_histories, num_items, scores.device) if exclude_history else None
            ranks[torch.as_tensor(positions)] = target_ranks(scores, batch_targets.to(scores.device), exclude_mask).cpu()
    if is_distributed(accelerator):
        scored = torch.as_tensor(np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64), dtype=torch.long)
        ranks = gather_rows(accelerator, scored, ranks[scored], torch.full_like(ranks, -1))
    if bool((ranks < 0).any()):
        raise RuntimeError(f"{int((ranks < 0).sum())} of {len(ranks)} users were not scored by any process.")

    # target_ranks marks a non-finite target with rank num_items; real ranks are at most num_items - 1.
    # Push that sentinel past every K so it stays a miss even when K exceeds a tiny catalogue.
    miss_rank = max([num_items, *(int(k) for k in ks)])
    ranks = torch.where(ranks >= num_items, torch.full_like(ranks, miss_rank), ranks)
    metrics: dict[str, float] = ranking_metrics(ranks, ks)
    metrics["num_users"] = len(histories)
    logger.info("%s: %s", desc, ", ".join(f"{name}={value:.4f}" for name, value in metrics.items()))
    return metrics


def popularity_scores(popularity: np.ndarray) -> ScoreFunction:
    """Score function for the most-popular baseline, the floor every model should beat."""
    popularity_row = torch.as_tensor(np.asarray(popularity, dtype=np.float32)).clone()
    if popularity_row.ndim != 1 or popularity_row.shape[0] < 2:
        raise ValueError("popularity must be a 1-D array of length num_items + 1 (entry 0 = padding).")
    popularity_row[0] = float("-inf")

    def score_fn(histories: list[list[int]]) -> torch.Tensor:
        return popularity_row.unsqueeze(0).expand(len(histories), -1)

    return score_fn


def scores_from_candidates(candidate_indices: torch.Tensor, candidate_scores: torch.Tensor, num_items: int) -> torch.Tensor:
    """Dense (B, num_items + 1) scores from retrieved candidates; anything not retrieved is -inf, i.e. a miss."""
    candidate_indices = torch.as_tensor(candidate_indices).long()
    candidate_scores = torch.as_tensor(candidate_scores, device=candidate_indices.device)
    if not candidate_scores.is_floating_point():
        candidate_scores = candidate_scores.float()
    if candidate_indices.ndim != 2 or candidate_indices.shape != candidate_scores.shape:
        raise ValueError(
            f"candidate_indices {tuple(candidate_indices.shape)} and candidate_scores {tuple(candidate_scores.shape)} "
            "must both be (batch, num_candidates)."
        )
    if candidate_indices.numel() and (candidate_indices.min() < 0 or candidate_indices.max() > num_items):
        raise ValueError(f"Candidate item indices must lie in [0, {num_items}] (0 = padding).")
    is_padding = candidate_indices == 0
    candidate_scores = candidate_scores.masked_fill(is_padding, float("-inf"))
    dense = torch.full(
        (candidate_indices.shape[0], num_items + 1), float("-inf"), dtype=candidate_scores.dtype, device=candidate_indices.device
    )
    # amax keeps the best score if a candidate appears twice, and keeps column 0 at -inf.
    return dense.scatter_reduce(1, candidate_indices, candidate_scores, reduce="amax", include_self=True)
