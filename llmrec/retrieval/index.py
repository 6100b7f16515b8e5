"""Inner-product (or cosine) retrieval over item embeddings, exact or approximate, with per-user exclusion of seen items.

Three FAISS index types sit behind one `ItemIndex`:

- ``flat`` (IndexFlatIP, the default): exact. Its cost grows linearly with the catalogue and is bound by
  memory bandwidth; it is the right choice up to a few hundred thousand items.
- ``hnsw`` (IndexHNSWFlat): a navigable small-world graph; sub-millisecond top-100 at a million items with
  high recall, at about twice flat's memory (the graph links) and a build that takes minutes at 1M items.
- ``ivf`` (IndexIVFFlat): items bucketed by k-means centroids and only the ``nprobe`` nearest buckets
  scanned; cheap to build and to store, needs training data (the catalogue itself).

`bench/scaling.py` measures all three on catalogues up to 1M items and is where the defaults come from.
Beyond memory, ``factory`` takes any FAISS factory string (IVF-PQ, OPQ; `retrieval.index_factory`), and any
flat or factory index can be split into shards whose top-k FAISS merges exactly.

Pieces live beside this module: types and defaults in `params`, the saved metadata in `sidecar`, dropping
seen items in `exclusion`, exact scoring in `exact`, beyond-memory (factory, sharded) indexes in `factory`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from llmrec.errors import ModelFolderError
from llmrec.retrieval import exclusion
from llmrec.retrieval import factory as large
from llmrec.retrieval import sidecar
from llmrec.retrieval.exact import exact_top_rows
from llmrec.retrieval.exclusion import PADDING_INDEX
from llmrec.retrieval.params import (
    DEFAULT_PARAMS,
    INDEX_TYPES,
    IVF_MIN_ITEMS_PER_LIST,
    SEARCH_PARAMS,
    checked_search_params,
    default_nlist,
    index_type_of,
    ivf_nlist,
    params_of,
    resolve_index_params,
)
from llmrec.retrieval.sidecar import FLAT_FORMAT_VERSION, FORMAT_VERSION, sidecar_path
from llmrec.utils.io import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

# Includes names that moved to params, sidecar and exclusion: model_folder, cli and bench import them from here.
__all__ = [
    "DEFAULT_PARAMS", "DENSE_EXCLUSION_MAX_CELLS", "EXACT_FILTER_MAX_ITEMS", "FLAT_FORMAT_VERSION", "FORMAT_VERSION",
    "INDEX_TYPES", "IVF_MIN_ITEMS_PER_LIST", "ItemIndex", "MAX_WIDENING", "PADDING_INDEX", "SEARCH_PARAMS",
    "default_nlist", "resolve_index_params", "sidecar_path",
]

# The search-time thresholds stay here, read at each call, so tests (and tuners) can patch them on this module.
# With an `allowed` filter this narrow, approximate indexes score the allowed items exactly: a graph or
# bucket search that must skip most of what it visits would come back short, and scoring a few thousand
# vectors directly costs less than a millisecond.
EXACT_FILTER_MAX_ITEMS = 16_384
# An approximate search that comes back with fewer results than asked (too narrow a beam or too few buckets
# for k + history, or a filter) is repeated for those queries with efSearch / nprobe doubled, up to this
# factor, and then exactly.
MAX_WIDENING = 16
# History exclusion looks candidates up in a dense (queries x catalogue) table of "seen" flags while it has at
# most this many cells (16 MB); bigger batches over big catalogues fall back to one `np.isin` per query.
DENSE_EXCLUSION_MAX_CELLS = 1 << 24


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


class ItemIndex:
    """FAISS index over item embeddings; row r holds item index r+1.

    `index_type` and `params` describe the FAISS object (see `build`); when not given they are read from it.
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        normalize: bool = True,
        index_type: str | None = None,
        params: Mapping[str, Any] | None = None,
        factory: str | None = None,
    ) -> None:
        self.faiss_index = faiss_index
        self.normalize = bool(normalize)
        self.factory = factory
        shards = large.shards_of(faiss_index)
        self.num_shards = 1 if shards is None else len(shards)
        self.index_type = index_type or index_type_of(shards[0] if shards else faiss_index)
        if self.index_type == "factory" and not factory:
            raise ValueError("A factory ItemIndex needs the factory string it was built from (factory=...).")
        self.params = {**params_of(faiss_index, self.index_type), **dict(params or {})}
        if self.index_type == "ivf" and faiss_index.direct_map.type == faiss.DirectMap.NoMap:
            # Lets exact fallbacks fetch stored vectors by id (8 bytes per item).
            faiss_index.make_direct_map()
        if self.index_type == "factory" and self.num_shards == 1:
            large.make_direct_map(faiss_index)
        self._apply_search_params()

    @classmethod
    def build(
        cls, item_embeddings: np.ndarray, normalize: bool = True, index_type: str = "flat", **params: Any
    ) -> "ItemIndex":
        """Index `item_embeddings` (row r = item index r+1) for cosine (`normalize`) or inner-product search.

        `index_type` is "flat" (exact), "hnsw" (params M, efConstruction, efSearch) or "ivf" (params nlist,
        nprobe); unset params take `DEFAULT_PARAMS`. IVF trains its centroids on the catalogue itself, so it
        needs at least `nlist` items: an explicit `nlist` larger than the catalogue raises ValueError, and the
        automatic one shrinks with it, down to one list (then it is an exact search) for catalogues under 78
        items. Items added later are put in the nearest existing list; rebuild after the catalogue has grown
        several-fold, or the lists get long and slow.
        """
        factory, num_shards = params.pop("factory", None), int(params.pop("num_shards", None) or 1)
        if index_type == "factory" or num_shards > 1:
            if index_type not in ("flat", "factory"):
                raise ValueError(f"Only flat and factory indexes can be sharded; got index_type {index_type!r} with num_shards={num_shards}.")
            return cls._build_large(item_embeddings, normalize, factory, num_shards, resolve_index_params(index_type, params))
        if factory is not None:
            raise ValueError(f"factory={factory!r} is given but index_type is {index_type!r}; use index_type='factory'.")
        resolved = resolve_index_params(index_type, params)
        if index_type != "flat" and not normalize:
            logger.warning(
                "An approximate (%s) index over unnormalised vectors searches by raw inner product, which graph and "
                "bucket methods approximate poorly; use normalize=True (cosine) unless the norms carry meaning.",
                index_type,
            )
        embeddings = _float32_rows(item_embeddings, "item_embeddings", copy=normalize)
        if normalize and len(embeddings):
            faiss.normalize_L2(embeddings)
        dim, num_items = embeddings.shape[1], embeddings.shape[0]
        if index_type == "flat":
            faiss_index = faiss.IndexFlatIP(dim)
        elif index_type == "hnsw":
            faiss_index = faiss.IndexHNSWFlat(dim, resolved["M"], faiss.METRIC_INNER_PRODUCT)
            faiss_index.hnsw.efConstruction = resolved["efConstruction"]
        else:
            resolved["nlist"] = ivf_nlist(resolved["nlist"], num_items)
            faiss_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, resolved["nlist"], faiss.METRIC_INNER_PRODUCT)
            faiss_index.train(embeddings)
        if len(embeddings):
            faiss_index.add(embeddings)
        item_index = cls(faiss_index, normalize=normalize, index_type=index_type, params=resolved)
        logger.info("Built %r", item_index)
        return item_index

    @classmethod
    def _build_large(
        cls, item_embeddings: np.ndarray, normalize: bool, factory: str | None, num_shards: int, params: dict[str, Any]
    ) -> "ItemIndex":
        """A factory and/or sharded index, trained on a sample and filled in chunks (a memory map stays on disk)."""
        if np.ndim(item_embeddings) != 2:
            raise ValueError(f"item_embeddings must be a 2-D array (rows, dim); got shape {np.shape(item_embeddings)}.")
        faiss_index = large.build_large_index(item_embeddings, normalize, factory, num_shards)
        index_type = "flat" if factory is None else "factory"
        item_index = cls(faiss_index, normalize=normalize, index_type=index_type, params=params, factory=factory)
        logger.info("Built %r", item_index)
        return item_index

    def set_search_params(self, **params: Any) -> None:
        """Change the search-time parameters (efSearch for HNSW, nprobe for IVF, nprobe and k_factor for a factory
        index) without rebuilding."""
        self.params.update(checked_search_params(self.index_type, params))
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.index_type == "hnsw":
            self.faiss_index.hnsw.efSearch = int(self.params["efSearch"])
        elif self.index_type == "ivf":
            self.faiss_index.nprobe = int(self.params["nprobe"])
        elif self.index_type == "factory":
            large.set_nprobe(self.faiss_index, int(self.params["nprobe"]))
            large.set_k_factor(self.faiss_index, int(self.params["k_factor"]))

    def _search_parameters(
        self, selector: faiss.IDSelector | None, k: int, widen: int = 1
    ) -> faiss.SearchParameters | None:
        """FAISS needs the parameter class of the index type; passing one overrides every value on the index."""
        beam = max(int(self.params.get("efSearch", 0)), k)
        if selector is None and widen == 1 and (self.index_type != "hnsw" or beam == self.params["efSearch"]):
            return None
        if self.index_type == "hnsw":
            parameters = faiss.SearchParametersHNSW()
            parameters.efSearch = beam * widen
        elif self.index_type == "ivf":
            parameters = faiss.SearchParametersIVF()
            parameters.nprobe = min(int(self.params["nprobe"]) * widen, int(self.faiss_index.nlist))
        else:
            parameters = faiss.SearchParameters()
        if selector is not None:
            parameters.sel = selector
        return parameters

    def add(self, item_embeddings: np.ndarray) -> None:
        """Append new items; they get the item indices right after the current last one."""
        if self.num_shards > 1:
            raise ValueError("Items cannot be added to a sharded index; rebuild it (ItemIndex.build with num_shards) with the new items.")
        embeddings = _float32_rows(item_embeddings, "item_embeddings", copy=self.normalize)
        self._check_dim(embeddings, "item_embeddings")
        if self.normalize and len(embeddings):
            faiss.normalize_L2(embeddings)
        if len(embeddings):
            self.faiss_index.add(embeddings)

    def extended(self, item_embeddings: np.ndarray) -> "ItemIndex":
        """A copy with new items appended; the original stays untouched, so searches running on it are safe."""
        copy = ItemIndex(
            faiss.clone_index(large.merged_index(self.faiss_index)), normalize=self.normalize, index_type=self.index_type,
            params=self.params, factory=self.factory,
        )
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
        """Top-k items per query as (scores float32 (B, k'), 1-based item_indices int64 (B, k')), best first.

        k' = min(k, num_items): no query can have more results than the catalogue holds, so a huge k costs
        no more memory than the whole catalogue.

        `exclude[b]` holds item indices never to return for query b (its history). `allowed`, when given,
        restricts every query to those item indices inside FAISS (an ID selector), so a filter needs no
        over-fetching; approximate indexes score a narrow `allowed` set (up to `EXACT_FILTER_MAX_ITEMS`)
        exactly. Missing slots (catalogue exhausted) are index 0 with score -inf, so callers can treat them
        as misses.
        """
        k = self._result_width(k)
        queries = _float32_rows(query_embeddings, "query_embeddings", copy=self.normalize)
        self._check_dim(queries, "query_embeddings")
        batch_size = queries.shape[0]
        exclude_arrays = exclusion.history_arrays(exclude, batch_size)
        max_excluded = max((len(items) for items in exclude_arrays), default=0) if exclude_arrays else 0
        allowed_rows = None if allowed is None else self._allowed_rows(allowed)
        searchable = self.num_items if allowed_rows is None else len(allowed_rows)
        fetch_k = min(k + max_excluded, searchable)  # over-fetch so that k remain after dropping the history
        if batch_size == 0 or fetch_k == 0:
            return exclusion.empty_results(batch_size, k)

        if self.normalize:
            faiss.normalize_L2(queries)
        candidate_scores, candidate_rows = self._search_rows(queries, k, fetch_k, allowed_rows)
        candidate_indices = candidate_rows.astype(np.int64) + 1  # FAISS pads with row -1, which becomes padding index 0
        keep = candidate_indices != PADDING_INDEX
        if exclude_arrays is not None and max_excluded:
            keep &= ~exclusion.excluded_candidates(candidate_indices, exclude_arrays, self.num_items, DENSE_EXCLUSION_MAX_CELLS)
        return exclusion.first_kept(candidate_scores, candidate_indices, keep, k)

    def _result_width(self, k: int) -> int:
        """k' = min(k, num_items) for a positive integer k (ValueError otherwise)."""
        if int(k) != k or k <= 0:
            raise ValueError(f"k must be a positive integer; got {k!r}.")
        return min(int(k), self.num_items)

    def _allowed_rows(self, allowed: np.ndarray) -> np.ndarray:
        """The 0-based rows of the `allowed` item indices, sorted and unique; indices outside the catalogue are dropped."""
        allowed_rows = np.unique(np.asarray(allowed, dtype=np.int64)) - 1
        return allowed_rows[(allowed_rows >= 0) & (allowed_rows < self.num_items)]

    def _search_rows(
        self, queries: np.ndarray, k: int, fetch_k: int, allowed_rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `fetch_k` best rows per (normalised) query; approximate results that come back short are searched again wider.

        `fetch_k` is k plus the longest excluded history. The HNSW beam is max(efSearch, k), not fetch_k: the
        beam decides which items are found, so over-fetching with the same beam returns the same top k after
        exclusion as leaving the history out inside FAISS would (measured), and a longer history costs only a
        longer result list.
        """
        if self.num_shards > 1 or self.index_type == "factory":
            return self._search_rows_large(queries, fetch_k, allowed_rows)
        if self.index_type != "flat" and allowed_rows is not None and len(allowed_rows) <= EXACT_FILTER_MAX_ITEMS:
            return exact_top_rows(self.faiss_index, queries, fetch_k, allowed_rows)
        selector = None if allowed_rows is None else faiss.IDSelectorBatch(allowed_rows)
        scores, rows = self.faiss_index.search(queries, fetch_k, params=self._search_parameters(selector, k))
        if self.index_type == "flat":
            return scores, rows
        widen = 2
        short = (rows < 0).any(axis=1)
        while short.any() and widen <= MAX_WIDENING:
            scores[short], rows[short] = self.faiss_index.search(
                queries[short], fetch_k, params=self._search_parameters(selector, k, widen)
            )
            short = (rows < 0).any(axis=1)
            widen *= 2
        if short.any():
            logger.debug("%d queries came back short from the %s index; scoring them exactly", int(short.sum()), self.index_type)
            every_row = np.arange(self.num_items, dtype=np.int64) if allowed_rows is None else allowed_rows
            scores[short], rows[short] = exact_top_rows(self.faiss_index, queries[short], fetch_k, every_row)
        return scores, rows

    def _search_rows_large(
        self, queries: np.ndarray, fetch_k: int, allowed_rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Factory and sharded indexes: one plain search; a filter scores the allowed items' stored (PQ) vectors."""
        if allowed_rows is not None:
            if self.num_shards > 1:
                raise ValueError(
                    "A sharded index cannot search a subset of items (`allowed`); build it unsharded (num_shards=1) to filter."
                )
            return exact_top_rows(self.faiss_index, queries, fetch_k, allowed_rows)
        scores, rows = self.faiss_index.search(queries, fetch_k)
        short = (rows < 0).any(axis=1)
        if short.any() and self.num_shards == 1:  # too few lists probed for k + history: score those queries exactly
            every_row = np.arange(self.num_items, dtype=np.int64)
            scores[short], rows[short] = exact_top_rows(self.faiss_index, queries[short], fetch_k, every_row)
        return scores, rows

    def reconstruct_all(self) -> np.ndarray:
        """Stored (possibly normalised) vectors, row r = item index r+1; for checks and tests."""
        if self.num_items == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return large.merged_index(self.faiss_index).reconstruct_n(0, self.num_items)

    def save(self, path: str | Path) -> None:
        """Write the FAISS file and its metadata sidecar, each atomically, so a crash never leaves a torn index."""
        path = Path(path)
        with atomic_write(path) as temporary:  # shards are written merged: FAISS cannot serialise IndexShards
            faiss.write_index(large.merged_index(self.faiss_index), str(temporary))
        meta = sidecar.sidecar_fields(
            self.index_type, self.normalize, self.dim, self.num_items, self.params, self.factory, self.num_shards
        )
        write_json_atomic(sidecar_path(path), meta)
        logger.debug("Saved %r to %s", self, path)

    @classmethod
    def load(cls, path: str | Path) -> "ItemIndex":
        """Load and cross-check against the sidecar, so a mismatched pair from an interrupted save is caught."""
        path = Path(path)
        meta = sidecar.read_sidecar(path)
        normalize, index_type, params = meta["normalize"], meta.get("index_type", "flat"), dict(meta.get("params") or {})
        try:
            faiss_index = faiss.read_index(str(path))
        except Exception as error:  # FAISS reports corrupt files as RuntimeError with C++ details
            raise ModelFolderError(f"Item index file {path} is corrupt or unreadable: {error}") from error
        try:
            sidecar.check_index_type(meta, faiss_index)
            item_index = cls(faiss_index, normalize=normalize, index_type=index_type, params=params, factory=meta.get("factory"))
            item_index.saved_num_shards = int(meta.get("num_shards", 1))
            resolve_index_params(index_type, {name: value for name, value in params.items()})
        except ValueError as error:
            raise ModelFolderError(f"Item index {path} does not match {sidecar_path(path)} ({error}); re-save the index.") from error
        sidecar.check_size(path, meta, item_index.dim, item_index.num_items)
        return item_index

    def __repr__(self) -> str:
        params = "".join(f", {name}={value}" for name, value in self.params.items())
        params += f", factory={self.factory!r}" if self.factory else ""
        params += f", num_shards={self.num_shards}" if self.num_shards > 1 else ""
        return f"ItemIndex({self.index_type}, num_items={self.num_items}, dim={self.dim}, normalize={self.normalize}{params})"
