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
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from llmrec.errors import ModelFolderError
from llmrec.retrieval import factory as large
from llmrec.utils.io import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

# Flat indexes still write the version-1 sidecar, so folders with the default index stay readable by older
# llmrec; approximate indexes write version 2 (index type and parameters), which older llmrec refuses
# cleanly instead of silently searching with FAISS's own defaults.
FLAT_FORMAT_VERSION = 1
FORMAT_VERSION = 2
PADDING_INDEX = 0

INDEX_TYPES = ("flat", "hnsw", "ivf", "factory")
# Defaults (measured in bench/scaling.py on 64-d item embeddings: 1M synthetic items clustered like the trained
# MovieLens-100k model's, real users as queries, top-100 with the history excluded; bench/results/scaling.md):
# - HNSW M=32: 64 links per item at the base layer, about as many bytes of graph as of vectors at 64-d; fewer
#   links lose recall on clustered catalogues, more cost memory and build time. efConstruction=100: a 1M-item
#   graph builds in ~7 min on one core. efSearch=320: the smallest beam of the sweep with recall@100 >= 0.96
#   at 1M items (0.95 needs 256; 128 gives 0.91), under 1 ms per user. FAISS does not widen the beam to k by
#   itself (a beam of 16 found ~60 % of the top 100 on 100k items), so `search` uses max(efSearch, k), as
#   hnswlib does.
# - IVF nlist=None means 4 * sqrt(num_items) lists (the usual rule of thumb: 4,000 lists of ~250 items at 1M),
#   capped so that each centroid has at least 39 training items (FAISS's own minimum). nprobe=48: the smallest
#   of the sweep with recall@100 >= 0.96 at 1M items (32 gives 0.94), ~0.4 ms per user.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "efConstruction": 100, "efSearch": 320},
    "ivf": {"nlist": None, "nprobe": 48},
    # nprobe: used by the IVF inside the factory string, if any. k_factor: candidates per result a refine stage
    # (`...,Refine(SQ4)`) re-scores; bench/ivfpq.py sweeps it (FAISS's own default, 1, only reorders).
    "factory": {"nprobe": 48, "k_factor": 4},
}
SEARCH_PARAMS = {"flat": (), "hnsw": ("efSearch",), "ivf": ("nprobe",), "factory": ("nprobe", "k_factor")}
IVF_MIN_ITEMS_PER_LIST = 39
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


def sidecar_path(index_path: str | Path) -> Path:
    """Metadata file saved next to the FAISS file (normalisation cannot be read back from FAISS itself)."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".json")


def resolve_index_params(index_type: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of `index_type` overridden by `params`; unknown types, names and non-positive values raise ValueError.

    A value of None keeps the default, so a config can leave any parameter to this module.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index_type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}.")
    resolved = dict(DEFAULT_PARAMS[index_type])
    for name, value in (params or {}).items():
        if name not in resolved:
            valid = ", ".join(DEFAULT_PARAMS[index_type]) or "none"
            raise ValueError(f"Unknown parameter {name!r} for index_type {index_type!r}; valid parameters: {valid}.")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{index_type} parameter {name} must be a positive integer; got {value!r}.")
        resolved[name] = int(value)
    return resolved


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_sidecar(meta: Any) -> dict[str, Any]:
    """The sidecar's fields, each of its type: `bool("false")` is True, so nothing is coerced (ValueError)."""
    if not isinstance(meta, dict):
        raise ValueError(f"it holds a {type(meta).__name__}, not a JSON object")
    for name, kind in (("normalize", bool), ("format_version", int), ("dim", int), ("num_items", int)):
        if name not in meta or not (kind is bool and isinstance(meta[name], bool) or kind is int and _is_count(meta[name])):
            raise ValueError(f"field {name!r} is {meta.get(name, 'missing')!r}")
    if "index_type" in meta and meta["index_type"] not in INDEX_TYPES:
        raise ValueError(f"field 'index_type' is {meta['index_type']!r}, not one of {', '.join(INDEX_TYPES)}")
    params = meta.get("params")
    if params is not None and not (isinstance(params, dict) and all(value is None or _is_count(value) for value in params.values())):
        raise ValueError(f"field 'params' is {params!r}, not a mapping of parameter names to integers")
    return meta


def default_nlist(num_items: int) -> int:
    """4 * sqrt(n) lists, but never so many that a centroid has fewer than 39 items to train on."""
    return max(1, min(int(round(4 * math.sqrt(num_items))), num_items // IVF_MIN_ITEMS_PER_LIST))


def _index_type_of(faiss_index: faiss.Index) -> str:
    if isinstance(faiss_index, faiss.IndexFlat):
        return "flat"
    if isinstance(faiss_index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(faiss_index, faiss.IndexIVF):
        return "ivf"
    raise ValueError(f"Unsupported FAISS index {type(faiss_index).__name__}; ItemIndex handles {', '.join(INDEX_TYPES)}.")


def _params_of(faiss_index: faiss.Index, index_type: str) -> dict[str, Any]:
    """The parameters stored inside a FAISS object, for indexes handed over without them."""
    if index_type == "hnsw":
        hnsw = faiss_index.hnsw
        return {"M": int(hnsw.nb_neighbors(1)), "efConstruction": int(hnsw.efConstruction), "efSearch": int(hnsw.efSearch)}
    if index_type == "ivf":
        return {"nlist": int(faiss_index.nlist), "nprobe": int(faiss_index.nprobe)}
    if index_type == "factory":
        return dict(DEFAULT_PARAMS["factory"])
    return {}


def _excluded_candidates(candidate_indices: np.ndarray, exclude_arrays: list[np.ndarray], num_items: int) -> np.ndarray:
    """True where a candidate (1-based item index, shape (B, n)) is among its query's excluded items.

    One dense table of seen flags and a single gather when it is small, instead of a set lookup per query:
    the per-query `np.isin` calls were most of what search added to the bare FAISS call.
    """
    batch, width = len(exclude_arrays), num_items + 1
    if batch * width <= DENSE_EXCLUSION_MAX_CELLS:
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
        self.index_type = index_type or _index_type_of(shards[0] if shards else faiss_index)
        if self.index_type == "factory" and not factory:
            raise ValueError("A factory ItemIndex needs the factory string it was built from (factory=...).")
        self.params = {**_params_of(faiss_index, self.index_type), **dict(params or {})}
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
            if resolved["nlist"] is None:
                resolved["nlist"] = default_nlist(num_items)
                if num_items == 0:
                    raise ValueError("An IVF index is trained on the catalogue and cannot be built from zero items; use index_type='flat'.")
            elif resolved["nlist"] > num_items:
                raise ValueError(
                    f"An IVF index with nlist={resolved['nlist']} needs at least that many items to train its "
                    f"centroids, but the catalogue has {num_items}; use a smaller nlist (or leave it unset), or index_type='flat'."
                )
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
        dim = int(item_embeddings.shape[1])
        if factory is None:
            template, index_type = faiss.IndexFlatIP(dim), "flat"
        else:
            template, index_type = large.empty_factory_index(factory, dim), "factory"
            large.train_factory_index(template, item_embeddings, normalize)
        faiss_index = large.build_faiss_index(item_embeddings, template, normalize, num_shards)
        item_index = cls(faiss_index, normalize=normalize, index_type=index_type, params=params, factory=factory)
        logger.info("Built %r", item_index)
        return item_index

    def set_search_params(self, **params: Any) -> None:
        """Change the search-time parameters (efSearch for HNSW, nprobe for IVF, nprobe and k_factor for a factory
        index) without rebuilding."""
        allowed = SEARCH_PARAMS[self.index_type]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            valid = ", ".join(allowed) or "none (a flat index is exact)"
            raise ValueError(f"{unknown} cannot be set on a {self.index_type} index at search time; valid: {valid}.")
        checked = resolve_index_params(self.index_type, params)
        self.params.update({name: checked[name] for name in params})
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
        if int(k) != k or k <= 0:
            raise ValueError(f"k must be a positive integer; got {k!r}.")
        k = min(int(k), self.num_items)
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
        allowed_rows = None
        searchable = self.num_items
        if allowed is not None:
            allowed_rows = np.unique(np.asarray(allowed, dtype=np.int64)) - 1
            allowed_rows = allowed_rows[(allowed_rows >= 0) & (allowed_rows < self.num_items)]
            searchable = len(allowed_rows)
        fetch_k = min(k + max_excluded, searchable)
        if batch_size == 0 or fetch_k == 0:
            return out_scores, out_indices

        if self.normalize:
            faiss.normalize_L2(queries)
        candidate_scores, candidate_rows = self._search_rows(queries, k, fetch_k, allowed_rows)
        candidate_indices = candidate_rows.astype(np.int64) + 1  # FAISS pads with row -1, which becomes padding index 0
        keep = candidate_indices != PADDING_INDEX
        if exclude_arrays is not None and max_excluded:
            keep &= ~_excluded_candidates(candidate_indices, exclude_arrays, self.num_items)
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
            return self._exact_rows(queries, fetch_k, allowed_rows)
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
            scores[short], rows[short] = self._exact_rows(queries[short], fetch_k, every_row)
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
            return self._exact_rows(queries, fetch_k, allowed_rows)
        scores, rows = self.faiss_index.search(queries, fetch_k)
        short = (rows < 0).any(axis=1)
        if short.any() and self.num_shards == 1:  # too few lists probed for k + history: score those queries exactly
            scores[short], rows[short] = self._exact_rows(queries[short], fetch_k, np.arange(self.num_items, dtype=np.int64))
        return scores, rows

    def _exact_rows(self, queries: np.ndarray, fetch_k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top `fetch_k` among the stored vectors of `rows` (fetch_k <= len(rows))."""
        vectors = self.faiss_index.reconstruct_batch(rows)
        scores = queries @ vectors.T
        top = np.argpartition(-scores, fetch_k - 1, axis=1)[:, :fetch_k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), rows[np.take_along_axis(top, order, axis=1)]

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
        meta: dict[str, Any] = {
            "format_version": FLAT_FORMAT_VERSION if self.index_type == "flat" else FORMAT_VERSION,
            "normalize": self.normalize,
            "dim": self.dim,
            "num_items": self.num_items,
        }
        if self.index_type != "flat" or self.num_shards > 1:
            meta.update(format_version=FORMAT_VERSION, index_type=self.index_type, params=self.params)
        if self.factory is not None:
            meta["factory"] = self.factory
        if self.num_shards > 1:
            meta["num_shards"] = self.num_shards
        write_json_atomic(sidecar_path(path), meta)
        logger.debug("Saved %r to %s", self, path)

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
            meta = _checked_sidecar(json.loads(meta_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, RecursionError) as error:
            raise ModelFolderError(f"Item index metadata {meta_path} is corrupt ({error}); re-save the index.") from error
        normalize, version = meta["normalize"], meta["format_version"]
        index_type, params = meta.get("index_type", "flat"), dict(meta.get("params") or {})
        if version not in (FLAT_FORMAT_VERSION, FORMAT_VERSION):
            raise ModelFolderError(
                f"Item index {path} has format version {version}; this llmrec reads versions "
                f"{FLAT_FORMAT_VERSION} and {FORMAT_VERSION}. Upgrade llmrec, or rebuild the index (`llmrec index MODEL --rebuild`)."
            )
        try:
            faiss_index = faiss.read_index(str(path))
        except Exception as error:  # FAISS reports corrupt files as RuntimeError with C++ details
            raise ModelFolderError(f"Item index file {path} is corrupt or unreadable: {error}") from error
        try:
            factory = meta.get("factory")
            if index_type == "factory":
                if not isinstance(factory, str):
                    raise ValueError(f"field 'factory' is {factory!r}, not the factory string")
            else:
                stored_type = _index_type_of(faiss_index)
                if stored_type != index_type:
                    raise ValueError(f"the file holds a {stored_type} index but the metadata says {index_type}")
            item_index = cls(faiss_index, normalize=normalize, index_type=index_type, params=params, factory=factory)
            item_index.saved_num_shards = int(meta.get("num_shards", 1))
            resolve_index_params(index_type, {name: value for name, value in params.items()})
        except ValueError as error:
            raise ModelFolderError(f"Item index {path} does not match {meta_path} ({error}); re-save the index.") from error
        if item_index.dim != meta.get("dim") or item_index.num_items != meta.get("num_items"):
            raise ModelFolderError(
                f"Item index file {path} (dim {item_index.dim}, {item_index.num_items} items) does not match "
                f"{meta_path} (dim {meta.get('dim')}, {meta.get('num_items')} items); re-save the index."
            )
        return item_index

    def __repr__(self) -> str:
        params = "".join(f", {name}={value}" for name, value in self.params.items())
        params += f", factory={self.factory!r}" if self.factory else ""
        params += f", num_shards={self.num_shards}" if self.num_shards > 1 else ""
        return f"ItemIndex({self.index_type}, num_items={self.num_items}, dim={self.dim}, normalize={self.normalize}{params})"
