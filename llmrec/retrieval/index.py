"""Exact inner-product (or cosine) retrieval over item embeddings, with per-user exclusion of already-seen items."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from llmrec.errors import ModelFolderError
from llmrec.utils.io import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PADDING_INDEX = 0


def _float32_rows(array: np.ndarray, what: str, copy: bool) -> np.ndarray:
    """Return a C-contiguous float32 2-D array, copying only when asked or when the layout requires it."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (rows, dim); got shape {array.shape}.")
    if copy:
        array = np.array(array, dtype=np.float32, order="C", copy=True)
    else:
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values; fix the embeddings before indexing or searching.")
    return array


def sidecar_path(index_path: str | Path) -> Path:
    """Metadata file saved next to the FAISS file (normalisation cannot be read back from FAISS itself)."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".json")


class ItemIndex:
    """FAISS index over item embeddings; row r holds item index r+1."""

    def __init__(self, faiss_index: faiss.Index, normalize: bool = True) -> None:
        self.faiss_index = faiss_index
        self.normalize = bool(normalize)

    @classmethod
    def build(cls, item_embeddings: np.ndarray, normalize: bool = True) -> "ItemIndex":
        """Exact search (IndexFlatIP): catalogues here are small enough that approximate search is not worth its recall loss."""
        embeddings = _float32_rows(item_embeddings, "item_embeddings", copy=False)
        item_index = cls(faiss.IndexFlatIP(embeddings.shape[1]), normalize=normalize)
        item_index.add(embeddings)
        return item_index

    def add(self, item_embeddings: np.ndarray) -> None:
        """Append new items; they get the item indices right after the current last one."""
        embeddings = _float32_rows(item_embeddings, "item_embeddings", copy=self.normalize)
        self._check_dim(embeddings, "item_embeddings")
        if self.normalize and len(embeddings):
            faiss.normalize_L2(embeddings)
        if len(embeddings):
            self.faiss_index.add(embeddings)

    def extended(self, item_embeddings: np.ndarray) -> "ItemIndex":
        """A copy with new items appended; the original stays untouched, so searches running on it are safe."""
        copy = ItemIndex(faiss.clone_index(self.faiss_index), normalize=self.normalize)
        copy.add(item_embeddings)
        return copy

    @property
    def num_items(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def _check_dim(self, array: np.ndarray, what: str) -> None:
        if array.shape[1] != self.dim:
            raise ValueError(f"{what} have dimension {array.shape[1]} but the index stores dimension {self.dim}.")

    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        exclude: Sequence[Iterable[int]] | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per query as (scores float32 (B, k), 1-based item_indices int64 (B, k)), best first.

        `exclude[b]` holds item indices never to return for query b (its history). `allowed`, when given,
        restricts every query to those item indices inside FAISS (an ID selector), so a narrow filter
        needs no over-fetching. Missing slots (catalogue exhausted) are index 0 with score -inf, so
        callers can treat them as misses.
        """
        if int(k) != k or k <= 0:
            raise ValueError(f"k must be a positive integer; got {k!r}.")
        k = int(k)
        queries = _float32_rows(query_embeddings, "query_embeddings", copy=self.normalize)
        self._check_dim(queries, "query_embeddings")
        batch_size = queries.shape[0]

        exclude_arrays: list[np.ndarray] | None = None
        if exclude is not None:
            if len(exclude) != batch_size:
                raise ValueError(f"exclude has {len(exclude)} entries but there are {batch_size} queries.")
            exclude_arrays = [np.fromiter(items, dtype=np.int64) for items in exclude]
        max_excluded = max((len(items) for items in exclude_arrays), default=0) if exclude_arrays else 0

        out_scores = np.full((batch_size, k), -np.inf, dtype=np.float32)
        out_indices = np.full((batch_size, k), PADDING_INDEX, dtype=np.int64)
        params = None
        searchable = self.num_items
        if allowed is not None:
            allowed_rows = np.unique(np.asarray(allowed, dtype=np.int64)) - 1
            allowed_rows = allowed_rows[(allowed_rows >= 0) & (allowed_rows < self.num_items)]
            searchable = len(allowed_rows)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed_rows))
        fetch_k = min(k + max_excluded, searchable)
        if batch_size == 0 or fetch_k == 0:
            return out_scores, out_indices

        if self.normalize:
            faiss.normalize_L2(queries)
        candidate_scores, candidate_rows = self.faiss_index.search(queries, fetch_k, params=params)
        candidate_indices = candidate_rows.astype(np.int64) + 1  # FAISS pads with row -1, which becomes padding index 0
        keep = candidate_indices != PADDING_INDEX
        if exclude_arrays is not None:
            for row, excluded in enumerate(exclude_arrays):
                if len(excluded):
                    keep[row] &= ~np.isin(candidate_indices[row], excluded)

        # Stable sort of "dropped" flags moves kept candidates to the front without disturbing their score order.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, axis=1)
        width = order.shape[1]
        out_scores[:, :width] = np.where(kept, np.take_along_axis(candidate_scores, order, axis=1), -np.inf)
        out_indices[:, :width] = np.where(kept, np.take_along_axis(candidate_indices, order, axis=1), PADDING_INDEX)
        return out_scores, out_indices

    def reconstruct_all(self) -> np.ndarray:
        """Stored (possibly normalised) vectors, row r = item index r+1; for checks and tests."""
        if self.num_items == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.faiss_index.reconstruct_n(0, self.num_items)

    def save(self, path: str | Path) -> None:
        """Write the FAISS file and its metadata sidecar, each atomically, so a crash never leaves a torn index."""
        path = Path(path)
        with atomic_write(path) as temporary:
            faiss.write_index(self.faiss_index, str(temporary))
        write_json_atomic(
            sidecar_path(path),
            {
                "format_version": FORMAT_VERSION,
                "normalize": self.normalize,
                "dim": self.dim,
                "num_items": self.num_items,
            },
        )
        logger.debug("Saved item index with %d items (dim %d) to %s", self.num_items, self.dim, path)

    @classmethod
    def load(cls, path: str | Path) -> "ItemIndex":
        """Load and cross-check against the sidecar, so a mismatched pair from an interrupted save is caught."""
        path = Path(path)
        meta_path = sidecar_path(path)
        if not path.is_file():
            raise ModelFolderError(f"Item index file {path} is missing; rebuild the index or re-save the model.")
        if not meta_path.is_file():
            raise ModelFolderError(f"Item index metadata {meta_path} is missing; re-save the index with ItemIndex.save().")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            normalize = bool(meta["normalize"])
            version = int(meta["format_version"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelFolderError(f"Item index metadata {meta_path} is corrupt ({error}); re-save the index.") from error
        if version != FORMAT_VERSION:
            raise ModelFolderError(
                f"Item index {path} has format version {version}; this llmrec reads version {FORMAT_VERSION}."
            )
        try:
            faiss_index = faiss.read_index(str(path))
        except Exception as error:  # FAISS reports corrupt files as RuntimeError with C++ details
            raise ModelFolderError(f"Item index file {path} is corrupt or unreadable: {error}") from error
        item_index = cls(faiss_index, normalize=normalize)
        if item_index.dim != meta.get("dim") or item_index.num_items != meta.get("num_items"):
            raise ModelFolderError(
                f"Item index file {path} (dim {item_index.dim}, {item_index.num_items} items) does not match "
                f"{meta_path} (dim {meta.get('dim')}, {meta.get('num_items')} items); re-save the index."
            )
        return item_index

    def __repr__(self) -> str:
        return f"ItemIndex(num_items={self.num_items}, dim={self.dim}, normalize={self.normalize})"
