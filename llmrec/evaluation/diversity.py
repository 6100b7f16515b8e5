"""Beyond-accuracy metrics of the top-k lists `evaluate_ranking` keeps: catalogue coverage, intra-list diversity
in the encoder's text space, and how far the lists lean towards popular items.

HR and NDCG reward a recommender that shows everyone the same few hits; these say how much of the catalogue
the lists reach (`coverage@k`), how unlike one another the items of a list are (`ild@k`) and how popular the
recommended items are (`popularity_percentile@k`). A list is a row of 1-based item indices, best first, with
0 in the slots of a user who had fewer than k eligible items (`llmrec.training.ranking.top_items`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# Users per batched Gram matrix in `intra_list_diversity`: (chunk, k, k) floats, and (chunk, k, dim) gathered rows.
ILD_CHUNK_SIZE = 256


def check_top_items(top_items: torch.Tensor, num_items: int) -> torch.Tensor:
    """`top_items` as a (users, k) long tensor of indices in [0, num_items] (0 = an empty slot)."""
    top_items = torch.as_tensor(top_items)
    if top_items.ndim != 2 or top_items.shape[0] == 0 or top_items.shape[1] == 0:
        raise ValueError(f"top_items must have shape (num_users, k) with both at least 1; got {tuple(top_items.shape)}.")
    if top_items.is_floating_point() or top_items.dtype == torch.bool:
        raise ValueError(f"top_items must hold integer item indices; got {top_items.dtype}.")
    top_items = top_items.long().cpu()
    if int(top_items.min()) < 0 or int(top_items.max()) > num_items:
        raise ValueError(f"top_items must be item indices in [0, {num_items}] (1..{num_items} items, 0 = empty slot).")
    return top_items


def catalogue_coverage(top_items: torch.Tensor, num_items: int) -> float:
    """Share of the catalogue (items 1..num_items) that is in at least one user's list."""
    top_items = check_top_items(top_items, num_items)
    listed = torch.unique(top_items)
    return float((listed > 0).sum()) / num_items


def intra_list_diversity(
    top_items: torch.Tensor, item_text_embeddings: torch.Tensor, chunk_size: int = ILD_CHUNK_SIZE
) -> float:
    """Mean over users of the mean pairwise cosine distance (1 - cosine) among the items of their list.

    `item_text_embeddings` is (num_items + 1, dim), row = item index. A list with fewer than two items has no
    pair and is left out of the mean; with no such list at all the result is 0.0. A zero vector is at
    distance 1 from everything (its cosine is taken as 0).
    """
    if item_text_embeddings.ndim != 2:
        raise ValueError(f"item_text_embeddings must be (num_items + 1, dim); got {tuple(item_text_embeddings.shape)}.")
    top_items = check_top_items(top_items, item_text_embeddings.shape[0] - 1)
    device = item_text_embeddings.device
    total, lists = 0.0, 0
    for chunk in top_items.split(chunk_size):
        chunk = chunk.to(device)
        vectors = F.normalize(item_text_embeddings[chunk].float(), dim=-1)
        similarities = vectors @ vectors.transpose(1, 2)  # (users, k, k)
        present = chunk > 0
        pairs = present.unsqueeze(2) & present.unsqueeze(1)
        pairs &= ~torch.eye(chunk.shape[1], dtype=torch.bool, device=device)
        pair_counts = pairs.sum(dim=(1, 2))
        distances = ((1.0 - similarities.double()) * pairs).sum(dim=(1, 2))
        has_pairs = pair_counts > 0
        total += float((distances[has_pairs] / pair_counts[has_pairs]).sum())
        lists += int(has_pairs.sum())
    return total / lists if lists else 0.0


def popularity_percentiles(item_popularity: np.ndarray) -> np.ndarray:
    """(num_items + 1,) each item's popularity percentile: the share of catalogue items at most as popular as it.

    In (0, 1]; the most popular item (and every item tied with it) is 1. `item_popularity` is indexed by item
    index with entry 0 for padding (as `SequentialSplit.item_popularity()`); entry 0 of the result is 0.
    """
    popularity = np.asarray(item_popularity, dtype=np.float64)
    if popularity.ndim != 1 or popularity.shape[0] < 2:
        raise ValueError("item_popularity must be a 1-D array of length num_items + 1 (entry 0 = padding).")
    if not np.isfinite(popularity[1:]).all():
        raise ValueError("item_popularity must be finite (training interaction counts).")
    counts = popularity[1:]
    at_most = np.searchsorted(np.sort(counts), counts, side="right")
    return np.concatenate([[0.0], at_most / len(counts)])


def mean_popularity_percentile(top_items: torch.Tensor, percentiles: np.ndarray) -> float:
    """Mean popularity percentile over every listed item of every list (empty slots left out); 0.0 if none."""
    top_items = check_top_items(top_items, len(percentiles) - 1).numpy()
    listed = top_items[top_items > 0]
    return float(np.asarray(percentiles)[listed].mean()) if listed.size else 0.0


def diversity_metrics(
    top_items: torch.Tensor,
    num_items: int,
    ks: Sequence[int] = (10,),
    item_text_embeddings: Optional[torch.Tensor] = None,
    item_popularity: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """coverage@k for each k, and ild@k / popularity_percentile@k when the text embeddings / popularity are given.

    Each k reads the first k columns of `top_items`, which must be at least max(ks) wide: a top-k list is
    the start of a longer one, so one pass of `evaluate_ranking` serves every k.
    """
    top_items = check_top_items(top_items, num_items)
    if any(int(k) != k or k <= 0 for k in ks):
        raise ValueError(f"Every K must be a positive integer; got {list(ks)!r}.")
    if max(ks) > top_items.shape[1]:
        raise ValueError(f"top_items holds {top_items.shape[1]} items per user; ks {list(ks)} need {max(ks)}.")
    if item_text_embeddings is not None and item_text_embeddings.shape[0] != num_items + 1:
        raise ValueError(f"item_text_embeddings has {item_text_embeddings.shape[0]} rows; expected num_items + 1 = {num_items + 1}.")
    percentiles = None
    if item_popularity is not None:
        if len(item_popularity) != num_items + 1:
            raise ValueError(f"item_popularity has {len(item_popularity)} entries; expected num_items + 1 = {num_items + 1}.")
        percentiles = popularity_percentiles(item_popularity)
    metrics: dict[str, float] = {}
    for k in (int(k) for k in ks):
        lists = top_items[:, :k]
        metrics[f"coverage@{k}"] = catalogue_coverage(lists, num_items)
        if item_text_embeddings is not None:
            metrics[f"ild@{k}"] = intra_list_diversity(lists, item_text_embeddings)
        if percentiles is not None:
            metrics[f"popularity_percentile@{k}"] = mean_popularity_percentile(lists, percentiles)
    return metrics
