"""Full-catalogue ranking of one held-out item per user: ranks, HR/NDCG/MRR@K, the batched evaluator (which can
also keep each user's top-K list, for `llmrec.evaluation.diversity`), and the candidate pipeline's retrieval /
rerank stages as score functions.

This is the protocol early stopping validates with and the final evaluation reports, so it lives where
training can use it; `llmrec.evaluation` re-exports all of it and builds the evaluation of whole systems on top.
Ties count against the target, so no scorer gets free credit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..retrieval import CandidatePipeline
from ..utils.distributed import gather_rows, is_distributed, shard_batches
from ..utils.length_order import length_sorted_batches

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[list[list[int]]], torch.Tensor]
"""Histories batch (1-based item indices) -> (B, num_items + 1) scores; column 0 is padding and ignored.

`evaluate_ranking` hands a score function its histories in batches of similar length, not in their given
order. One that needs per-example data (a user's profile) sets `takes_positions = True` on itself and is
called as `score_fn(histories, positions)`, with the histories' positions in the evaluated list.
"""


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """0-based rank of each held-out target among all real, non-excluded items.

    Ties count against the target (a constant scorer must not look good), and a non-finite target
    score is a miss at every K (rank = num_items): comparing `scores > target` would otherwise give
    a NaN target rank 0 and inflate untrained models. NaN scores of other items count as -inf.
    (rank num_items is a miss for every K <= num_items; evaluate_ranking also keeps it a miss for larger K.)
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape (batch, num_items + 1) with num_items >= 1; got {tuple(scores.shape)}.")
    batch_size, num_columns = scores.shape
    num_items = num_columns - 1
    if not scores.is_floating_point():
        scores = scores.double()
    targets = torch.as_tensor(targets, device=scores.device).long().reshape(-1)
    if targets.shape[0] != batch_size:
        raise ValueError(f"targets has {targets.shape[0]} entries but scores has {batch_size} rows.")
    if batch_size and (targets.min() < 1 or targets.max() > num_items):
        raise ValueError(f"targets must be 1-based item indices in [1, {num_items}]; index 0 is padding.")

    target_scores = scores.gather(1, targets.unsqueeze(1))
    other_scores = scores.masked_fill(torch.isnan(scores), float("-inf"))

    counted = torch.ones_like(scores, dtype=torch.bool)
    counted[:, 0] = False
    if exclude_mask is not None:
        if exclude_mask.shape != scores.shape:
            raise ValueError(f"exclude_mask shape {tuple(exclude_mask.shape)} does not match scores {tuple(scores.shape)}.")
        counted &= ~exclude_mask.to(device=scores.device, dtype=torch.bool)
    counted.scatter_(1, targets.unsqueeze(1), False)  # the target is never "another item"

    ranks = ((other_scores >= target_scores) & counted).sum(dim=1)
    return torch.where(torch.isfinite(target_scores.squeeze(1)), ranks, torch.full_like(ranks, num_items))


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """HR@K (= Recall@K with one target), NDCG@K and MRR@K averaged over users, as plain floats."""
    ranks = torch.as_tensor(ranks).reshape(-1)
    if ranks.numel() == 0:
        raise ValueError("ranks is empty; there are no users to evaluate.")
    if ranks.is_floating_point() or (ranks < 0).any():
        raise ValueError("ranks must be non-negative integers (0 = the target is the top item).")
    ranks = ranks.to(device="cpu", dtype=torch.float64)
    metrics: dict[str, float] = {}
    for k in ks:
        if int(k) != k or k <= 0:
            raise ValueError(f"Every K must be a positive integer; got {k!r}.")
        k = int(k)
        hit = ranks < k
        metrics[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
        metrics[f"hr@{k}"] = hit.double().mean().item()
        metrics[f"mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), 0.0).mean().item()
    return metrics


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


def top_items(scores: torch.Tensor, k: int, exclude_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k) 1-based indices of each row's k best real, non-excluded items, best first.

    The items `target_ranks` ranks against, ordered the same way: padding, excluded and NaN / -inf scores are
    never listed (their slots are 0 when a row has fewer than k such items), and ties go to the lower item
    index, so a list does not depend on batching. One top-k and a cumulative sum, not a sort of the catalogue.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape (batch, num_items + 1) with num_items >= 1; got {tuple(scores.shape)}.")
    if int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    batch_size, num_columns = scores.shape
    if not scores.is_floating_point():
        scores = scores.double()
    ranked = scores.masked_fill(torch.isnan(scores), float("-inf"))
    ranked[:, 0] = float("-inf")
    if exclude_mask is not None:
        if exclude_mask.shape != scores.shape:
            raise ValueError(f"exclude_mask shape {tuple(exclude_mask.shape)} does not match scores {tuple(scores.shape)}.")
        ranked = ranked.masked_fill(exclude_mask.to(device=scores.device, dtype=torch.bool), float("-inf"))
    width = min(int(k), num_columns - 1)
    kth = ranked.topk(width, dim=1).values[:, -1:]
    above = ranked > kth  # fewer than `width` per row; the rest come from the ties at the k-th score, lowest index first
    tied = ranked == kth
    room = width - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))
    indices = chosen.nonzero()[:, 1].reshape(batch_size, width)  # exactly `width` per row, in index order
    chosen_scores = ranked.gather(1, indices)
    order = chosen_scores.argsort(dim=1, descending=True, stable=True)
    indices = indices.gather(1, order).masked_fill(chosen_scores.gather(1, order) == float("-inf"), 0)
    if width < k:  # k beyond the catalogue: the missing slots are empty
        indices = torch.cat([indices, indices.new_zeros(batch_size, int(k) - width)], dim=1)
    return indices


def _scoring_batches(score_fn: ScoreFunction, histories: Sequence[Sequence[int]], batch_size: int,
                     accelerator: object | None) -> tuple[list[np.ndarray], object | None]:
    """Positions per batch, and the accelerator to share them over (None: every process scores them all).

    A score function tied to the examples' order (`takes_positions`, or the older `scores_in_input_order`)
    gets them in input order; any other is batched by history length, so a batch pads only to its own
    longest history, not to the window.
    """
    if getattr(score_fn, "takes_positions", False) or getattr(score_fn, "scores_in_input_order", False):
        return [np.arange(start, min(start + batch_size, len(histories))) for start in range(0, len(histories), batch_size)], None
    return shard_batches(accelerator, length_sorted_batches([len(history) for history in histories], batch_size)), accelerator


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
    top_items_out: torch.Tensor | None = None,
) -> dict[str, float]:
    """Rank each user's held-out target against the whole catalogue; history items are removed so re-recommending them earns nothing.

    With a multi-process `accelerator` each process scores its share of the batches and the ranks are
    gathered by user position, so every user counts once and every process returns the one-process metrics.
    A score function tied to the examples' order is scored whole in every process.

    `top_items_out`, a (len(histories), K) tensor, is filled with each user's top-K item indices (`top_items`,
    with the history excluded as for the ranks) from the same scores, so diversity metrics need no second
    scoring pass; it is gathered across processes as the ranks are.
    """
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets; they must pair up one to one.")
    if len(histories) == 0:
        raise ValueError("No users to evaluate: histories and targets are empty.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")

    ranks = torch.full((len(histories),), -1, dtype=torch.long)
    kept_top = _top_items_buffer(top_items_out, len(histories))
    batches, accelerator = _scoring_batches(score_fn, histories, batch_size, accelerator)
    takes_positions = getattr(score_fn, "takes_positions", False)
    with torch.no_grad():
        for positions in tqdm(batches, desc=desc, disable=None, unit="batch"):
            batch_histories = [list(histories[position]) for position in positions]
            batch_targets = torch.as_tensor([targets[position] for position in positions], dtype=torch.long)
            scores = score_fn(batch_histories, positions) if takes_positions else score_fn(batch_histories)
            expected_shape = (len(batch_histories), num_items + 1)
            if tuple(scores.shape) != expected_shape:
                raise ValueError(f"score_fn returned shape {tuple(scores.shape)}; expected {expected_shape} (column 0 = padding).")
            scores = scores.detach()
            exclude_mask = history_exclude_mask(batch_histories, num_items, scores.device) if exclude_history else None
            ranks[torch.as_tensor(positions)] = target_ranks(scores, batch_targets.to(scores.device), exclude_mask).cpu()
            if kept_top is not None:
                kept_top[torch.as_tensor(positions)] = top_items(scores, kept_top.shape[1], exclude_mask).cpu()
    if is_distributed(accelerator):
        ranks, kept_top = _gathered(accelerator, batches, ranks, kept_top)
    if kept_top is not None:
        top_items_out.copy_(kept_top)
    metrics = _metrics_from_ranks(ranks, num_items, ks)
    logger.info("%s: %s", desc, ", ".join(f"{name}={value:.4f}" for name, value in metrics.items()))
    return metrics


def _metrics_from_ranks(ranks: torch.Tensor, num_items: int, ks: Sequence[int]) -> dict[str, float]:
    """HR / NDCG / MRR at each K from every user's 0-based target rank, and the user count."""
    if bool((ranks < 0).any()):
        raise RuntimeError(f"{int((ranks < 0).sum())} of {len(ranks)} users were not scored by any process.")
    # target_ranks marks a non-finite target with rank num_items; real ranks are at most num_items - 1.
    # Push that sentinel past every K so it stays a miss even when K exceeds a tiny catalogue.
    miss_rank = max([num_items, *(int(k) for k in ks)])
    ranks = torch.where(ranks >= num_items, torch.full_like(ranks, miss_rank), ranks)
    metrics: dict[str, float] = ranking_metrics(ranks, ks)
    metrics["num_users"] = len(ranks)
    return metrics


def _gathered(accelerator: object, batches: list[np.ndarray], ranks: torch.Tensor,
              kept_top: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every process's ranks (and top-K lists) written at their users' positions, on every process."""
    scored = torch.as_tensor(np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64), dtype=torch.long)
    ranks = gather_rows(accelerator, scored, ranks[scored], torch.full_like(ranks, -1))
    if kept_top is not None:
        kept_top = gather_rows(accelerator, scored, kept_top[scored], torch.zeros_like(kept_top))
    return ranks, kept_top


def _top_items_buffer(top_items_out: torch.Tensor | None, num_users: int) -> torch.Tensor | None:
    """A CPU table for the top-K lists `evaluate_ranking` is asked to keep (None: it keeps none)."""
    if top_items_out is None:
        return None
    if top_items_out.ndim != 2 or top_items_out.shape[0] != num_users or top_items_out.shape[1] < 1:
        raise ValueError(f"top_items_out must have shape ({num_users}, K) with K >= 1; got {tuple(top_items_out.shape)}.")
    if top_items_out.is_floating_point() or top_items_out.dtype == torch.bool:
        raise ValueError(f"top_items_out must hold integers (item indices); got {top_items_out.dtype}.")
    return torch.zeros(tuple(top_items_out.shape), dtype=torch.long)


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


def retrieval_score_function(pipeline: CandidatePipeline, num_items: int) -> ScoreFunction:
    """FAISS top-N as a full-catalogue score row (-inf outside the candidates)."""

    def score(histories: list[list[int]]) -> torch.Tensor:
        candidate_scores, candidate_indices = pipeline.retrieve(histories)
        return scores_from_candidates(torch.as_tensor(candidate_indices), torch.as_tensor(candidate_scores), num_items)

    return score


def rerank_score_function(pipeline: CandidatePipeline, num_items: int) -> ScoreFunction:
    """FAISS top-N reranked by the head; an item the retriever missed stays at -inf, i.e. a miss."""

    def score(histories: list[list[int]]) -> torch.Tensor:
        candidate_indices, candidate_scores = pipeline.retrieve_and_rerank(histories)
        return scores_from_candidates(torch.as_tensor(candidate_indices), candidate_scores.cpu(), num_items)

    return score
