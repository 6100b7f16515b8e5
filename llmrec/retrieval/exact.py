"""Exact inner-product scoring, for where an approximate index's answer cannot be used as it is.

Approximate indexes fall back to it for narrow filters and for queries that came back short, and
`factory.rescore_exactly` re-scores compressed (PQ) candidates with the full vectors; both rank the same way.
"""

from __future__ import annotations

import faiss
import numpy as np


def sorted_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` (<= columns) best scores per row, best first, and their column positions.

    A partial partition then a sort of the k winners only, so it costs far less than sorting every row;
    the stable sort keeps tied scores in their partition order.
    """
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)


def exact_top_rows(
    faiss_index: faiss.Index, queries: np.ndarray, fetch_k: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top `fetch_k` (<= len(rows)) among the stored vectors of `rows`, as (scores, rows) best first."""
    vectors = faiss_index.reconstruct_batch(rows)
    top_scores, top = sorted_top_k(queries @ vectors.T, fetch_k)
    return top_scores, rows[top]
