"""The index types `ItemIndex` offers, their parameters and defaults, and how given parameters are checked.

Kept apart from the index so that configs, benchmarks and the saved-folder reader can validate parameters
without building anything, and so that the defaults and the measurements behind them are read in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np

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


def checked_search_params(index_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` checked as search-time parameters of `index_type` (ValueError for build-time or unknown names)."""
    allowed = SEARCH_PARAMS[index_type]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) or "none (a flat index is exact)"
        raise ValueError(f"{unknown} cannot be set on a {index_type} index at search time; valid: {valid}.")
    checked = resolve_index_params(index_type, params)
    return {name: checked[name] for name in params}


def default_nlist(num_items: int) -> int:
    """4 * sqrt(n) lists, but never so many that a centroid has fewer than 39 items to train on."""
    return max(1, min(int(round(4 * math.sqrt(num_items))), num_items // IVF_MIN_ITEMS_PER_LIST))


def ivf_nlist(requested: int | None, num_items: int) -> int:
    """The IVF list count for a catalogue: `requested`, or `default_nlist` when None; ValueError when it cannot train."""
    if requested is None:
        if num_items == 0:
            raise ValueError("An IVF index is trained on the catalogue and cannot be built from zero items; use index_type='flat'.")
        return default_nlist(num_items)
    if requested > num_items:
        raise ValueError(
            f"An IVF index with nlist={requested} needs at least that many items to train its "
            f"centroids, but the catalogue has {num_items}; use a smaller nlist (or leave it unset), or index_type='flat'."
        )
    return requested


def index_type_of(faiss_index: faiss.Index) -> str:
    """The `ItemIndex` type of a plain FAISS object (factory indexes cannot be told apart, so they are named)."""
    if isinstance(faiss_index, faiss.IndexFlat):
        return "flat"
    if isinstance(faiss_index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(faiss_index, faiss.IndexIVF):
        return "ivf"
    raise ValueError(f"Unsupported FAISS index {type(faiss_index).__name__}; ItemIndex handles {', '.join(INDEX_TYPES)}.")


def params_of(faiss_index: faiss.Index, index_type: str) -> dict[str, Any]:
    """The parameters stored inside a FAISS object, for indexes handed over without them."""
    if index_type == "hnsw":
        hnsw = faiss_index.hnsw
        return {"M": int(hnsw.nb_neighbors(1)), "efConstruction": int(hnsw.efConstruction), "efSearch": int(hnsw.efSearch)}
    if index_type == "ivf":
        return {"nlist": int(faiss_index.nlist), "nprobe": int(faiss_index.nprobe)}
    if index_type == "factory":
        return dict(DEFAULT_PARAMS["factory"])
    return {}
