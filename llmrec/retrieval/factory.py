"""FAISS indexes for catalogues beyond memory: factory strings (IVF-PQ, OPQ) and shards.

A factory index (`faiss.index_factory`, e.g. ``IVF4096,PQ16`` or ``OPQ16,IVF4096,PQ16``) is trained on a
random sample of the catalogue and filled in chunks, so the embeddings may be a memory-mapped array: only
the sample and one chunk are ever copied (normalised) into memory. Shards (`faiss.IndexShards`) hold
consecutive item ranges in separate indexes that share one trained template; FAISS searches each and
merges their top-k exactly, so a sharded flat index answers as the unsharded one does, and a sharded IVF
index (one coarse quantizer) as the merged IVF index.
"""

from __future__ import annotations

import logging
from typing import Optional

import faiss
import numpy as np

from llmrec.retrieval.exact import sorted_top_k

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SIZE = 262_144  # 64 training points per list at IVF4096, FAISS's upper bound for k-means
DEFAULT_CHUNK_SIZE = 65_536


def _normalised_rows(embeddings: np.ndarray, start: int, stop: int, normalize: bool) -> np.ndarray:
    chunk = np.array(embeddings[start:stop], dtype=np.float32, order="C", copy=True)
    if not np.isfinite(chunk).all():
        raise ValueError(f"item_embeddings rows {start}-{stop - 1} contain NaN or infinite values; fix them before indexing.")
    if normalize:
        faiss.normalize_L2(chunk)
    return chunk


def empty_factory_index(description: str, dim: int) -> faiss.Index:
    """An untrained inner-product index of `description`, or ValueError naming the string and FAISS's reason."""
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"retrieval.index_factory must be a FAISS factory string such as 'IVF4096,PQ16'; got {description!r}.")
    try:
        return faiss.index_factory(int(dim), description.strip(), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        reason = str(error).split("failed:")[-1].split(": ")[-1].strip()[:200]
        raise ValueError(
            f"FAISS cannot build the index factory string {description!r} for {dim}-d vectors ({reason}). "
            "Use a string like 'IVF4096,PQ16' or 'OPQ16,IVF4096,PQ16' (PQ/OPQ sub-quantizers must divide the "
            "dimension); see the FAISS wiki page 'The index factory'."
        ) from None


def train_factory_index(
    template: faiss.Index, embeddings: np.ndarray, normalize: bool, train_size: int = DEFAULT_TRAIN_SIZE, seed: int = 0
) -> None:
    """Train `template` on up to `train_size` rows drawn at random (sorted, so a memory map reads forward)."""
    if template.is_trained:
        return
    num_items = len(embeddings)
    if num_items == 0:
        raise ValueError("A factory index is trained on the catalogue and cannot be built from zero items; use index_type 'flat'.")
    rows = np.sort(np.random.default_rng(seed).choice(num_items, size=min(train_size, num_items), replace=False))
    sample = np.array(embeddings[rows], dtype=np.float32, order="C", copy=True)
    if normalize:
        faiss.normalize_L2(sample)
    ivf = _ivf_of(template)
    if ivf is not None and ivf.nlist > len(sample):
        raise ValueError(
            f"The factory index has {ivf.nlist} IVF lists but only {len(sample)} items to train them on; use "
            "fewer lists (IVFn with n at most the catalogue size, ideally 39 items or more per list)."
        )
    template.train(sample)


def fill_index(index: faiss.Index, embeddings: np.ndarray, start: int, stop: int, normalize: bool, chunk_size: int) -> None:
    """Add rows [start, stop) of `embeddings` in chunks of `chunk_size`."""
    for chunk_start in range(start, stop, chunk_size):
        index.add(_normalised_rows(embeddings, chunk_start, min(chunk_start + chunk_size, stop), normalize))


def build_faiss_index(
    embeddings: np.ndarray,
    template: faiss.Index,
    normalize: bool,
    num_shards: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> faiss.Index:
    """`template` (trained) filled with every row; with `num_shards` > 1 an `IndexShards` of consecutive ranges."""
    if num_shards < 1 or int(num_shards) != num_shards:
        raise ValueError(f"num_shards must be a positive integer; got {num_shards!r}.")
    num_items = len(embeddings)
    if num_shards == 1:
        index = faiss.clone_index(template)
        fill_index(index, embeddings, 0, num_items, normalize, chunk_size)
        return index
    if num_shards > max(num_items, 1):
        raise ValueError(f"num_shards={num_shards} is more than the {num_items} items to shard; use fewer shards.")
    shards = faiss.IndexShards(template.d, False, True)  # successive_ids: shard s's row r is item offset_s + r
    bounds = np.linspace(0, num_items, num_shards + 1).astype(np.int64)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        shard = faiss.clone_index(template)
        fill_index(shard, embeddings, int(start), int(stop), normalize, chunk_size)
        shards.add_shard(shard)  # FAISS's Python wrapper keeps a reference, so the shard lives with `shards`
    return shards


def build_large_index(embeddings: np.ndarray, normalize: bool, factory: str | None, num_shards: int) -> faiss.Index:
    """A trained and filled index of `factory` (flat when None), in `num_shards` shards when more than one."""
    dim = int(embeddings.shape[1])
    if factory is None:
        template = faiss.IndexFlatIP(dim)
    else:
        template = empty_factory_index(factory, dim)
        train_factory_index(template, embeddings, normalize)
    return build_faiss_index(embeddings, template, normalize, num_shards)


def shards_of(index: faiss.Index) -> Optional[list[faiss.Index]]:
    """The sub-indexes of an `IndexShards`, else None."""
    if not isinstance(index, faiss.IndexShards):
        return None
    return [index.at(position) for position in range(index.count())]


def merged_index(index: faiss.Index) -> faiss.Index:
    """One index equal to `index` for searching: shards merged in order (what is written to disk)."""
    shards = shards_of(index)
    if shards is None:
        return index
    merged = faiss.clone_index(shards[0])
    for shard in shards[1:]:
        target = faiss.downcast_index(merged)
        if isinstance(target, faiss.IndexFlat):
            merged.add(shard.reconstruct_n(0, shard.ntotal))
        elif isinstance(target, faiss.IndexRefine):
            _merge_refine(target, shard)
        else:
            _merge_ivf(merged, shard)
    return merged


def _merge_refine(target: faiss.IndexRefine, source: faiss.Index) -> None:
    # Both stages move: the IVF first stage by its lists, the refine codes (stored by position) appended.
    # merge_from empties its source, so a clone is merged; it is held here while its parts are in use.
    source_copy = faiss.clone_index(source)
    source_refine = faiss.downcast_index(source_copy)
    _merge_ivf(target.base_index, source_refine.base_index)
    refine_codes = faiss.downcast_index(target.refine_index)
    refine_codes.merge_from(faiss.downcast_index(source_refine.refine_index), 0)
    target.ntotal = refine_codes.ntotal


def _merge_ivf(target: faiss.Index, source: faiss.Index) -> None:
    # merge_from moves the source's lists, so a clone is merged and the shard keeps its items.
    source_copy = faiss.clone_index(source)  # held here: the extracted IVF below points into it
    target_ivf, source_ivf = _ivf_of(target), _ivf_of(source_copy)
    if target_ivf is None or source_ivf is None:
        raise ValueError(f"Cannot merge shards of {type(faiss.downcast_index(target)).__name__}; only flat and IVF shards merge.")
    if target_ivf.direct_map.type != faiss.DirectMap.NoMap:
        target_ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    target_ivf.merge_from(source_ivf, target_ivf.ntotal)
    target.ntotal = target_ivf.ntotal


def _ivf_of(index: faiss.Index) -> Optional[faiss.IndexIVF]:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Lists scanned per query of every IVF inside `index` (through a pre-transform such as OPQ, and in each shard)."""
    for part in shards_of(index) or [index]:
        ivf = _ivf_of(part)
        if ivf is not None:
            ivf.nprobe = min(int(nprobe), int(ivf.nlist))


def set_k_factor(index: faiss.Index, k_factor: int) -> None:
    """Candidates a refine stage (``...,Refine(SQ4)``) re-scores per result wanted, in every shard.

    With FAISS's default of 1 the refine stage only reorders the k results the first stage found, so it cannot
    raise recall; k_factor 4 re-scores 4k candidates with the finer codes."""
    for part in shards_of(index) or [index]:
        refine = faiss.downcast_index(part)
        if isinstance(refine, faiss.IndexRefine):
            refine.k_factor = float(k_factor)


def make_direct_map(index: faiss.Index) -> None:
    """Let an unsharded IVF index reconstruct stored vectors by id (exact fallbacks, filters).

    An index with a refine stage reconstructs from its refine codes, which are stored by id already, so the
    map (8 bytes per item, saved with the index) is not built for it."""
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        return
    ivf = _ivf_of(index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()


def bytes_per_vector(index: faiss.Index) -> float:
    """Serialized size over the item count (codes, ids, lists and quantizers), what a saved folder pays per item."""
    index = merged_index(index)
    return len(faiss.serialize_index(index)) / max(1, index.ntotal)


def rescore_exactly(
    queries: np.ndarray, candidate_rows: np.ndarray, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` of each query's candidates by exact inner product with `vectors` (rows -1: no candidate).

    Compressed codes (PQ) bound an index's recall however many lists it probes; re-scoring a few times `k`
    of its candidates with the full vectors lifts it to what the candidate set holds. `vectors` may be a
    memory-mapped array (only the candidates' rows are read) or a table a caller already keeps, such as the
    item embeddings a serving pipeline holds for its reranker, so the index itself stays small.
    """
    rows = np.asarray(candidate_rows, dtype=np.int64)
    present = rows >= 0
    gathered = np.asarray(vectors[np.where(present, rows, 0).ravel()], dtype=np.float32).reshape(*rows.shape, -1)
    scores = np.einsum("qcd,qd->qc", gathered, np.asarray(queries, dtype=np.float32))
    scores[~present] = -np.inf
    top_scores, top = sorted_top_k(scores, min(k, rows.shape[1]))
    top_rows = np.take_along_axis(rows, top, axis=1)
    top_rows[~np.isfinite(top_scores)] = -1
    return top_scores, top_rows
