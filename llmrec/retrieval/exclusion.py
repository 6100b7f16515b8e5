"""From FAISS candidates to search results: each query's seen items dropped, the rest packed into (B, k) arrays.

`ItemIndex.search` over-fetches k plus the longest excluded history, so that after dropping a query's
history it still has k candidates wherever the catalogue allows; these steps do the dropping and packing.
Results are 1-based item indices; a missing slot (catalogue exhausted) is `PADDING_INDEX` with score -inf.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PADDING_INDEX = 0


def history_arrays(exclude: Sequence[Iterable[int]] | None, batch_size: int) -> list[np.ndarray] | None:
    """`exclude` as one int64 array per query (None stays None); ValueError when it is not one entry per query."""
    if exclude is None:
        return None
    if len(exclude) != batch_size:
        raise ValueError(f"exclude has {len(exclude)} entries but there are {batch_size} queries.")
    return [np.fromiter(items, dtype=np.int64) for items in exclude]


def empty_results(batch_size: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, item_indices) of shape (batch_size, k) with every slot missing: score -inf, padding index."""
    return np.full((batch_size, k), -np.inf, dtype=np.float32), np.full((batch_size, k), PADDING_INDEX, dtype=np.int64)


def excluded_candidates(
    candidate_indices: np.ndarray, exclude_arrays: list[np.ndarray], num_items: int, max_dense_cells: int
) -> np.ndarray:
    """True where a candidate (1-based item index, shape (B, n)) is among its query's excluded items.

    One dense table of seen flags and a single gather when it has at most `max_dense_cells` cells, instead of
    a set lookup per query: the per-query `np.isin` calls were most of what search added to the bare FAISS call.
    """
    batch, width = len(exclude_arrays), num_items + 1
    if batch * width <= max_dense_cells:
        items = exclude_arrays[0] if batch == 1 else np.concatenate(exclude_arrays)
        in_range = (items >= 0) & (items <= num_items)  # other ids can never be candidates
        cells = items if batch == 1 else items + width * np.repeat(np.arange(batch), [len(excluded) for excluded in exclude_arrays])
        seen = np.zeros(batch * width, dtype=bool)
        seen[cells[in_range]] = True
        return seen[candidate_indices if batch == 1 else candidate_indices + width * np.arange(batch)[:, None]]
    excluded_mask = np.zeros(candidate_indices.shape, dtype=bool)
    for row, excluded in enumerate(exclude_arrays):
        if len(excluded):
            excluded_mask[row] = np.isin(candidate_indices[row], excluded)
    return excluded_mask


def first_kept(
    candidate_scores: np.ndarray, candidate_indices: np.ndarray, keep: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` candidates of each row where `keep` is True, in their (score) order, padded when fewer."""
    batch_size = keep.shape[0]
    out_scores, out_indices = empty_results(batch_size, k)
    if keep[:, :k].all():  # nothing to drop among the first k: they are the answer, already in order
        width = min(k, keep.shape[1])
        out_scores[:, :width], out_indices[:, :width] = candidate_scores[:, :width], candidate_indices[:, :width]
        return out_scores, out_indices

    # Stable sort of "dropped" flags moves kept candidates to the front without disturbing their score order.
    if batch_size == 1:  # one request, the serving case: plain boolean selection
        chosen = np.flatnonzero(keep[0])[:k]
        out_scores[0, : len(chosen)], out_indices[0, : len(chosen)] = candidate_scores[0, chosen], candidate_indices[0, chosen]
        return out_scores, out_indices
    # Gathers go through flat positions: `take_along_axis` costs more than the search for one query.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    order += np.arange(batch_size)[:, None] * keep.shape[1]
    kept = keep.ravel()[order]
    width = order.shape[1]
    out_scores[:, :width] = np.where(kept, candidate_scores.ravel()[order], -np.inf)
    out_indices[:, :width] = np.where(kept, candidate_indices.ravel()[order], PADDING_INDEX)
    return out_scores, out_indices
