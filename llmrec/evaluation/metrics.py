"""Full-catalogue ranking metrics for one held-out item per user, with pessimistic tie-breaking so no scorer gets free credit."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
